"""Start-up checks of a fit/validate/test/predict config, before any model loads.

:func:`check_config` runs inside the Lightning CLI on the parsed config. :func:`precheck` runs the
same checks, plus the projector rates, on the ``--config`` files and ``--key=value`` overrides
alone, before Lightning is even imported (importing it takes about 3 s here), so that a wrong
value fails in about two seconds instead of six. It never rejects what it cannot read: anything
it does not understand is left to the full parser.
"""

from __future__ import annotations

import math
from argparse import ArgumentError
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace

from mmalign.assets import check_source

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


def _get(config: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(config, dict):
            return None
        config = config.get(key)
    return config


def check_config(config: Namespace | dict[str, Any]) -> None:
    """What the config alone can tell, checked before any class is built: the learning rate,
    that model sources exist (or can be fetched) and that every data split has shards. Each of
    these otherwise fails only after the models have loaded, or after a minute of hub retries."""
    from mmalign.data.shardset import resolve_shards

    if isinstance(config, Namespace):
        config = config.as_dict()

    lr = _get(config, "model.optimizer.init_args.lr")
    if isinstance(lr, (int, float)) and not (math.isfinite(lr) and lr > 0):
        raise ConfigError(
            f"model.optimizer.init_args.lr={float(lr)}: the learning rate must be > 0"
        )
    for key, value in _leaves(config.get("model"), "model"):
        if key.rsplit(".", 1)[-1] in ("source", "tokenizer") and isinstance(value, str):
            check_source(value, key)
    for split in SPLITS:
        spec = _get(config, f"data.{split}")
        sources = spec if isinstance(spec, list) else [] if spec is None else [spec]
        for i, src in enumerate(sources):
            shards = src if isinstance(src, str) else src.get("shards")
            try:
                resolve_shards(shards)
            except (OSError, ValueError) as exn:
                key = f"data.{split}" + (f"[{i}].shards" if isinstance(spec, list) else "")
                raise ConfigError(f"{key}={shards!r}: {exn}") from exn


def _set(config: dict[str, Any], dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    node = config
    for key in path:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[last] = value


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _read_args(args: list[str]) -> dict[str, Any] | None:
    """The config the Lightning CLI would see from ``--config`` files and ``--key=value``
    overrides, in order; None when something here is beyond this reader."""
    config: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            return None
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                i += 1  # a flag such as --print_config
                continue
            value, i = args[i + 1], i + 1
        i += 1
        try:
            if key == "config":
                loaded = yaml.safe_load(Path(value).read_text())
                if not isinstance(loaded, dict):
                    return None
                _merge(config, loaded)
            else:
                _set(config, key, yaml.safe_load(value))
        except (OSError, yaml.YAMLError):
            return None
    return config


def _check_rates(config: dict[str, Any]) -> None:
    for part in ("projector", "video_projector"):
        node = _get(config, f"model.{part}")
        args = node.get("init_args") if isinstance(node, dict) else None
        if not isinstance(args, dict):
            continue
        rates = [("rate", args["rate"])] if "rate" in args else []
        if isinstance(args.get("rates"), list):
            rates += [("rates", r) for r in args["rates"]]
        for name, rate in rates:
            if isinstance(rate, bool) or not isinstance(rate, int) or rate < 1:
                key = f"model.{part}.init_args.{name}"
                raise ArgumentError(None, f"{key}: {rate!r} is not an int >= 1")


def _check_rank(config: dict[str, Any]) -> None:
    """A LoRA-family rank is a positive int (against the weights' shapes it is checked once the
    frozen LLM is built, before peft allocates anything)."""
    key = "model.llm.init_args.adapter.init_args.r"
    r = _get(config, key)
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
        raise ArgumentError(None, f"{key}: {r!r} is not an int >= 1")


def precheck(args: list[str]) -> None:
    """:func:`check_config`, the projector rates and the adapter rank on the raw arguments."""
    config = _read_args(args)
    if config is None:
        return
    _check_rates(config)
    _check_rank(config)
    check_config(config)
