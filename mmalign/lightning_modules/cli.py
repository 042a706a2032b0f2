"""LightningCLI with mmalign's checkpoint IO, checkpoint-path errors and start-up checks.

A module-level class (not one made inside a function), so that launchers that pickle the trainer
(``strategy: ddp_spawn``) can pickle what refers to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI

from mmalign.checkpoint_io import CheckpointLoadError, checkpoint_plugins, load_checkpoint_file
from mmalign.lightning_modules.config_check import check_config


class MMAlignCLI(LightningCLI):
    def before_instantiate_classes(self) -> None:
        check_config(self.config[self.subcommand] if self.subcommand else self.config)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        plugins = checkpoint_plugins(config.get("plugins"), config.get("strategy"))
        if plugins is not None:
            kwargs["plugins"] = plugins
        return super().instantiate_trainer(**kwargs)

    def _parse_ckpt_path(self) -> None:
        # Lightning reads --ckpt_path's hparams here, before any trainer exists; when that
        # fails, say which file and why as the trainer would
        try:
            super()._parse_ckpt_path()
        except Exception:
            subcommand = self.config.get("subcommand")
            ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
            if ckpt_path and Path(ckpt_path).is_file():
                try:
                    load_checkpoint_file(ckpt_path)
                except CheckpointLoadError as exn:
                    raise SystemExit(f"mmalign {subcommand}: {exn}") from exn
            raise


def run_cli(args: list[str] | None = None, run: bool = True, exit_on_error: bool = True) -> Any:
    """The Lightning CLI over :class:`AlignmentModule` and :class:`ShardDataModule`.

    Trainers write checkpoints atomically and load them with ``weights_only=True``
    (:mod:`mmalign.checkpoint_io`) unless the config brings its own checkpoint IO.
    ``exit_on_error=False`` raises jsonargparse's ``ArgumentError`` instead of printing usage.
    """
    import mmalign.lightning_modules.strategies  # noqa: F401  (registers `llm_fsdp` names)
    from mmalign.data.datamodule import ShardDataModule
    from mmalign.lightning_modules.alignment import AlignmentModule

    return MMAlignCLI(
        AlignmentModule,
        ShardDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False, "exit_on_error": exit_on_error},
    )
