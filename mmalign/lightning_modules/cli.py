"""LightningCLI with mmalign's checkpoint IO and checkpoint-path errors.

A module-level class (not one made inside a function), so that launchers that pickle the trainer
(``strategy: ddp_spawn``) can pickle what refers to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI

from mmalign.checkpoint_io import CheckpointLoadError, checkpoint_plugins, load_checkpoint_file


class MMAlignCLI(LightningCLI):
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
