"""Describe a component as {class_path, init_args} and build it back (checkpoints, export)."""

from __future__ import annotations

import importlib
import inspect
import os
from typing import Any

import torch

PREFIXES_ENV = "MMALIGN_COMPONENT_PREFIXES"
"""Extra module prefixes (comma-separated) whose classes a checkpoint or export may name."""


def spec(obj: Any) -> dict[str, Any]:
    """``{"class_path", "init_args"}`` of an object exposing ``init_config()``."""
    cls = type(obj)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": obj.init_config()}


def build(component: dict[str, Any], *args: Any, **overrides: Any) -> Any:
    """Instantiate a ``spec`` dict; a bad class path names itself in the error.

    A spec read from a checkpoint or export is data from whoever wrote the file, so only
    ``torch.nn.Module`` classes under ``mmalign.`` (or a prefix listed in
    ``$MMALIGN_COMPONENT_PREFIXES``, for your own components) are imported and built: any other
    callable (``subprocess.run`` ...) would run code on load.
    """
    path = str(component["class_path"])
    prefixes = ["mmalign."] + [
        p.strip() for p in os.environ.get(PREFIXES_ENV, "").split(",") if p.strip()
    ]
    if not any(path.startswith(p) for p in prefixes):
        raise ValueError(
            f"component class {path!r} is outside {prefixes}: a checkpoint or export may only "
            f"name mmalign components; add trusted prefixes to ${PREFIXES_ENV} (comma-separated)"
        )
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise ImportError(f"cannot import component class {path!r}: {e}") from e
    if not (inspect.isclass(cls) and issubclass(cls, torch.nn.Module)):
        raise ValueError(f"component class {path!r} is not a torch.nn.Module class")
    init_args = component.get("init_args", {})
    if init_args.get("trust_remote_code") and os.environ.get("MMALIGN_TRUST_REMOTE_CODE") != "1":
        raise ValueError(
            f"{path} asks for trust_remote_code (running code from its model repo); set "
            "MMALIGN_TRUST_REMOTE_CODE=1 if you trust that repo"
        )
    return cls(*args, **{**init_args, **overrides})
