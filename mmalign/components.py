"""Describe a component as {class_path, init_args} and build it back (checkpoints, export)."""

from __future__ import annotations

import importlib
from typing import Any


def spec(obj: Any) -> dict[str, Any]:
    """``{"class_path", "init_args"}`` of an object exposing ``init_config()``."""
    cls = type(obj)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": obj.init_config()}


def build(component: dict[str, Any], *args: Any, **overrides: Any) -> Any:
    """Instantiate a ``spec`` dict; a bad class path names itself in the error."""
    path = component["class_path"]
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise ImportError(f"cannot import component class {path!r}: {e}") from e
    return cls(*args, **{**component.get("init_args", {}), **overrides})
