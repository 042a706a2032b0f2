"""LightningCLI with mmalign's checkpoint IO, checkpoint-path errors and start-up checks.

A module-level class (not one made inside a function), so that launchers that pickle the trainer
(``strategy: ddp_spawn``) can pickle what refers to it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI

from mmalign.assets import check_source
from mmalign.checkpoint_io import CheckpointLoadError, checkpoint_plugins, load_checkpoint_file

SPLITS = ("train", "val", "test", "predict")


class ConfigError(ValueError):
    """A config value that cannot work; the message names its field."""


def _leaves(value: Any, key: str) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf under ``value``, lists included (``a.b[0].c``)."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, f"{key}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{key}[{i}]")
    else:
        yield key, value


def check_config(config: Namespace) -> None:
    """What the config alone can tell, checked before any class is built: the learning rate,
    that model sources exist (or can be fetched) and that every data split has shards. Each of
    these otherwise fails only after the models have loaded, or after a minute of hub retries."""
    from mmalign.data.shardset import resolve_shards

    lr = config.get("model.optimizer.init_args.lr")
    if isinstance(lr, (int, float)) and not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"model.optimizer.init_args.lr={lr}: the learning rate must be > 0")
    for key, value in _leaves(config.get("model"), "model"):
        if key.rsplit(".", 1)[-1] in ("source", "tokenizer") and isinstance(value, str):
            check_source(value, key)
    for split in SPLITS:
        spec = config.get(f"data.{split}")
        sources = spec if isinstance(spec, list) else [] if spec is None else [spec]
        for i, src in enumerate(sources):
            shards = src if isinstance(src, str) else src.get("shards")
            try:
                resolve_shards(shards)
            except (OSError, ValueError) as exn:
                key = f"data.{split}" + (f"[{i}].shards" if isinstance(spec, list) else "")
                raise ConfigError(f"{key}={shards!r}: {exn}") from exn


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
