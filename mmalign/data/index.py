"""A shard folder's ``index.json``: what ``prepare`` and ``cache-features`` wrote, checked before
anything reads it.

The index lists every shard with its sample count, seconds, byte size and SHA-256, plus a
checksum of that list, and is written last, after every shard is complete: a folder with an
index is a finished folder. :func:`check_shards` compares the shards on disk with it at start-up,
before a model loads: a missing shard, a shard larger than listed or holding more samples than
listed (an undercounting index quietly shrinks every epoch), or a list that fails its checksum
(edited by hand) is an :class:`IndexMismatchError` naming the shard. A shard *shorter* than
listed was truncated after prepare: its surviving samples are still read, and readers count the
rest as lost, exactly (see :mod:`mmalign.data.reading`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mmalign.atomic import atomic_write_text

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
INDEX_FORMAT = "mmalign-shards/2"


class IndexMismatchError(ValueError):
    """The shards on disk are not the ones ``index.json`` describes."""


@dataclass(frozen=True)
class SkippedItem:
    """One corpus item left out of the shards, with where it came from and why."""

    source: str
    line: int | None
    reason: str

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        return f"{where}: {self.reason}"


@dataclass(frozen=True)
class ShardInfo:
    """One written shard: path relative to its folder, samples, seconds of audio, bytes, SHA-256."""

    path: str
    samples: int
    seconds: float
    bytes: int = 0
    sha256: str = ""

    @classmethod
    def of(cls, path: Path, samples: int, seconds: float) -> ShardInfo:
        """The entry of a finished shard file (size and checksum read from disk)."""
        return cls(path.name, samples, round(seconds, 6), path.stat().st_size, file_sha256(path))


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _list_checksum(shards: list[dict[str, Any]]) -> str:
    canon = json.dumps(shards, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def write_index(folder: Path, fields: dict[str, Any], shards: list[ShardInfo]) -> Path:
    """Write ``folder/index.json`` atomically: ``fields`` plus the shard list and its checksum."""
    listed = [asdict(s) for s in shards]
    index = {
        "format": INDEX_FORMAT,
        **fields,
        "shards": listed,
        "shards_sha256": _list_checksum(listed),
    }
    path = folder / INDEX_NAME
    atomic_write_text(path, json.dumps(index, indent=2, ensure_ascii=False) + "\n")
    return path


def read_index(path: str | Path) -> dict[str, Any]:
    """Load an ``index.json`` (or the one inside a shard folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / INDEX_NAME
    with open(path, encoding="utf-8") as fh:
        index = json.load(fh)
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list):
        raise ValueError(f"{path} is not a shard index (no 'shards' list)")
    return index


def sample_key(name: str) -> str:
    """webdataset's sample key of a member name: up to the first dot of its base name."""
    base = name.rsplit("/", 1)[-1]
    return name[: len(name) - len(base)] + base.split(".", 1)[0]


def tar_samples_count(path: str | Path) -> tuple[int, bool]:
    """``(samples, intact)`` of a tar shard from its headers alone (seeks over the data): samples
    are distinct webdataset keys whose members all arrived; ``intact`` is false for a shard cut
    short or damaged, whose last, partial sample is then not counted."""
    keys: list[str] = []
    intact = True
    size = Path(path).stat().st_size
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if info.offset_data + info.size > size:
                    intact = False
                    break
                key = sample_key(info.name)
                if not keys or keys[-1] != key:
                    keys.append(key)
                tar.members = []
    except (tarfile.TarError, OSError):
        intact = False
    return len(keys), intact


@functools.cache
def _samples_on_disk(path: str, size: int, mtime_ns: int, want: int, recorded: int) -> int:
    """The complete samples of a shard whose size disagrees with its index (or that has none),
    counted once per process and file state, however often its folder is resolved; a shard
    holding fewer than ``want`` is logged as truncated, once."""
    found, intact = tar_samples_count(path)
    if found < want or (found == want and not intact):
        log.warning(
            "shard %s is truncated (%d of %d bytes): %d of its %d samples are lost",
            path,
            size,
            recorded or size,
            want - found,
            want,
        )
    return found


def check_shards(index_path: Path) -> tuple[dict[str, int], dict[str, Any]]:
    """Each listed shard's URL and the samples it should hold, after checking the folder against
    its index (module doc), and the index itself."""
    index = read_index(index_path)
    shards = index["shards"]
    folder = index_path.parent
    if not shards:
        raise FileNotFoundError(f"{index_path} lists no shards (did prepare write anything?)")
    listed = index.get("shards_sha256")
    if listed is not None and listed != _list_checksum(shards):
        raise IndexMismatchError(
            f"{index_path}: the shard list does not match its checksum (edited after prepare?); "
            "rerun prepare rather than editing the index"
        )
    if not all(entry.get("bytes") for entry in shards):
        log.info(
            "%s lists no shard sizes (an older prepare): counting each shard's samples instead; "
            "rerun prepare to skip this",
            index_path,
        )
    expected: dict[str, int] = {}
    for entry in shards:
        path = folder / entry["path"]
        want = int(entry["samples"])
        if not path.is_file():
            raise IndexMismatchError(f"{index_path}: shard {entry['path']} is missing on disk")
        size = path.stat().st_size
        recorded = int(entry.get("bytes") or 0)
        if recorded and size == recorded:
            expected[str(path)] = want
            continue
        if recorded and size > recorded:
            raise IndexMismatchError(
                f"{path}: {size} bytes but {index_path} lists {recorded}: not the shard the "
                "index describes; rerun prepare"
            )
        # truncated, or an index without sizes
        found = _samples_on_disk(str(path), size, path.stat().st_mtime_ns, want, recorded)
        if found > want:
            raise IndexMismatchError(
                f"{path}: holds {found} samples but {index_path} lists {want}: the index "
                "undercounts it; rerun prepare"
            )
        expected[str(path)] = want
    return expected, index
