"""Checkpoint files that survive a hard kill and load without running pickled code.

:class:`AtomicCheckpointIO` is the Lightning checkpoint plugin every ``mmalign fit/validate/test/
predict`` trainer gets (see :func:`checkpoint_plugins`):

* a save goes to a hidden temporary file beside the target (``.last.ckpt.tmp-<host>-<pid>``), is
  flushed and fsynced, checked to hold nothing that ``torch.load(weights_only=True)`` would refuse,
  and only then renamed onto the target (``os.replace``, atomic on POSIX). A SIGKILL mid-save, a
  full disk or an unloadable object leaves the previous checkpoint as it was, never half a file;
* hyperparameters (``hyper_parameters``, ``datamodule_hyper_parameters``) are stored as plain
  types: dataclasses (``MixSource``), Namespaces, paths and configs become dicts and strings,
  since the CLI only ever rebuilds from such values;
* loading always uses ``weights_only=True``: unpickling a ``.ckpt`` may otherwise run any code
  its author put in it. ``weights_only=False`` is refused.

:func:`load_checkpoint_file` is the same safe load for code outside Lightning (export, decoding).
"""

from __future__ import annotations

import dataclasses
import enum
import glob
import logging
import os
import pickle
import socket
import zipfile
from argparse import Namespace
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

log = logging.getLogger(__name__)

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointLoadError",
    "CheckpointSaveError",
    "checkpoint_plugins",
    "load_checkpoint_file",
    "plain_hparams",
]

HPARAM_KEYS = ("hyper_parameters", "datamodule_hyper_parameters")
_WHY = (
    "mmalign loads checkpoints with weights_only=True only, because unpickling anything else can "
    "run arbitrary code from the file"
)


class CheckpointLoadError(RuntimeError):
    """A file is not a checkpoint that loads with ``weights_only=True``."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint would not load back with ``weights_only=True``; it was not written."""


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``, with an error naming the file when it fails."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exn:
        if not zipfile.is_zipfile(path):  # torch.save has written zip archives since 1.6
            raise CheckpointLoadError(
                f"{path}: not a readable checkpoint (not a torch.save zip archive): "
                f"{_first_line(exn)}"
            ) from exn
        unsafe = _unsafe_globals(path)
        what = f" (it holds {', '.join(sorted(unsafe))})" if unsafe else ""
        raise CheckpointLoadError(
            f"{path}: refused: not loadable with weights_only=True{what}. {_WHY}. Load only "
            "checkpoints written by mmalign fit, or re-save a file you trust as tensors and "
            f"plain types. torch said: {_first_line(exn)}"
        ) from exn
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exn:
        raise CheckpointLoadError(
            f"{path}: not a readable checkpoint (truncated, or not written by torch.save): "
            f"{_first_line(exn)}"
        ) from exn
    if not isinstance(ckpt, dict):
        raise CheckpointLoadError(f"{path}: holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def _first_line(exn: BaseException) -> str:
    lines = [ln.strip() for ln in str(exn).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "Unsupported global" in ln or "WeightsUnpickler" in ln]
    return (useful or lines or [type(exn).__name__])[0][:500]


def _unsafe_globals(path: str | Path) -> list[str]:
    """Classes and functions the file's pickle names that weights_only refuses (static scan)."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # not a zip checkpoint at all: the load error says so
        return []


def plain_hparams(value: Any) -> Any:
    """``value`` with dataclasses, Namespaces, configs, paths and enums turned into plain types.

    Hyperparameters are descriptive (the CLI re-parses them); anything else unknown becomes its
    ``repr`` with a warning, so that it cannot make a checkpoint unloadable with weights_only.
    """
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, (torch.Tensor, torch.dtype, torch.device, torch.Size)):
        return value
    if type(value).__module__ == "numpy" and callable(getattr(value, "tolist", None)):
        return value.tolist()  # numpy scalars and arrays
    if isinstance(value, enum.Enum):
        return plain_hparams(value.value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_hparams(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Namespace) or type(value).__name__ == "Namespace":
        as_dict = getattr(value, "as_dict", None)  # jsonargparse's nests Namespaces
        return plain_hparams(as_dict() if callable(as_dict) else vars(value))
    if isinstance(value, Mapping):
        return {plain_hparams(k): plain_hparams(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_asdict"):  # a namedtuple
        return plain_hparams(value._asdict())
    if isinstance(value, (list, tuple)):
        items = [plain_hparams(v) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    if isinstance(value, (set, frozenset)):
        return [plain_hparams(v) for v in sorted(value, key=repr)]
    if isinstance(value, type) or (callable(value) and hasattr(value, "__qualname__")):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    to_dict = getattr(value, "to_dict", None)  # peft and transformers configs
    if callable(to_dict):
        try:
            return {"class_path": _qualname(value), "init_args": plain_hparams(to_dict())}
        except Exception:
            pass
    log.warning("checkpoint hyperparameter of type %s stored as its repr", _qualname(value))
    return repr(value)


def _qualname(value: Any) -> str:
    cls = type(value)
    return f"{cls.__module__}.{cls.__qualname__}"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes atomically and durably and loads with weights_only.

    Args:
        verify: before replacing the target, scan the written file for classes that
            ``weights_only=True`` refuses and fail (keeping the old file) if there are any.
    """

    def __init__(self, verify: bool = True) -> None:
        super().__init__()
        self.verify = verify

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` to ``path`` through a temporary file and ``os.replace``."""
        if storage_options is not None or _is_remote(path):
            super().save_checkpoint(checkpoint, path, storage_options)  # fsspec's transaction
            return
        checkpoint = {k: plain_hparams(v) if k in HPARAM_KEYS else v for k, v in checkpoint.items()}
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(target)
        tmp = target.with_name(f".{target.name}{_temp_suffix()}")
        try:
            with open(tmp, "wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            if self.verify:
                unsafe = _unsafe_globals(tmp)
                if unsafe:
                    raise CheckpointSaveError(
                        f"not writing {target}: the checkpoint holds {', '.join(sorted(unsafe))} "
                        f"(in {_where(checkpoint, set(unsafe))}), which torch.load(weights_only="
                        "True) refuses; store tensors and plain types (dict, list, str, numbers) "
                        f"instead. {target.name} is left as it was."
                    )
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)

    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable | Any = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Load with ``weights_only=True``; ``weights_only=False`` is refused."""
        if weights_only is False:
            raise ValueError(
                f"refusing to load {path} with weights_only=False: {_WHY}. Checkpoints written "
                "by mmalign fit load with weights_only=True; drop --weights_only false."
            )
        if _is_remote(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return load_checkpoint_file(path, map_location=map_location)


def _is_remote(path: Any) -> bool:
    text = str(path)
    return "://" in text and not text.startswith("file://")


def _temp_suffix() -> str:
    return f".tmp-{socket.gethostname()}-{os.getpid()}"


def _remove_stale_temps(target: Path) -> None:
    """Delete temporaries of ``target`` left by killed processes of this host."""
    host_prefix = f".{target.name}.tmp-{socket.gethostname()}-"
    for stale in target.parent.glob(f".{glob.escape(target.name)}.tmp-*"):
        pid = stale.name.removeprefix(host_prefix)
        if stale.name.startswith(host_prefix) and pid.isdigit() and not _alive(int(pid)):
            log.info("removing %s, left by a killed save", stale)
            stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a crash right after it keeps the new file)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _where(checkpoint: dict[str, Any], unsafe: set[str]) -> str:
    """Top-level checkpoint keys whose value holds one of the ``unsafe`` classes."""
    keys = []
    for key, value in checkpoint.items():
        if key in ("state_dict", "optimizer_states"):
            continue
        if _holds(value, unsafe):
            keys.append(repr(key))
    return ", ".join(keys) or "a part of it"


def _holds(value: Any, unsafe: set[str]) -> bool:
    name = f"{type(value).__module__}.{type(value).__qualname__}"
    if name in unsafe:
        return True
    if isinstance(value, Mapping):
        return any(_holds(k, unsafe) or _holds(v, unsafe) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(_holds(v, unsafe) for v in value)
    return False


def checkpoint_plugins(plugins: Any, strategy: Any) -> list[Any] | None:
    """``plugins`` plus an :class:`AtomicCheckpointIO`, or None to leave them as they are.

    Left alone: a config that brings its own checkpoint IO (as a plugin or inside a strategy
    object) and DeepSpeed, which writes its own sharded checkpoint folders.
    """
    given = [] if plugins is None else list(plugins) if isinstance(plugins, list) else [plugins]
    if any(isinstance(p, CheckpointIO) for p in given):
        return None
    if isinstance(strategy, str):
        if "deepspeed" in strategy.lower():
            return None
    elif strategy is not None:
        if "deepspeed" in type(strategy).__name__.lower():
            return None
        if getattr(strategy, "_checkpoint_io", None) is not None:
            return None
    return [*given, AtomicCheckpointIO()]
