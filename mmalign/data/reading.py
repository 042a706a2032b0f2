"""Strict tar reading: shards as raw samples (bytes per member), damage accounted for exactly.

webdataset's tar reader ends a shard quietly at a damaged header; :func:`tar_samples` ends it
loudly. A shard its index sizes (``index.json``, see :mod:`mmalign.data.shardset`) then reports
exactly how many samples never arrived, so a half-lost shard weighs as the samples it lost
(:mod:`mmalign.data.skips`). :func:`read_shard_samples` reads and decodes whole shards at once
(evaluation sets, noise clips).
"""

from __future__ import annotations

import logging
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import webdataset as wds
from webdataset.filters import pipelinefilter
from webdataset.tariterators import group_by_keys, url_opener
from webdataset.utils import pytorch_worker_info

from mmalign.data.decoding import decode_sample
from mmalign.data.index import sample_key
from mmalign.data.shardset import resolve_shards
from mmalign.data.skips import SampleError

log = logging.getLogger(__name__)


def worker_slots(n_urls: int) -> tuple[bool, int, int]:
    """(split shards?, this slot, number of slots) for the calling rank and worker."""
    rank, world, worker, workers = pytorch_worker_info()
    slots = max(1, world) * max(1, workers)
    return n_urls >= slots, rank * max(1, workers) + worker, slots


class _StrictTarInfo(tarfile.TarInfo):
    """Tar headers that are damaged (bad checksum) or cut short raise instead of ending the
    archive quietly, as ``tarfile`` does for any header after the first one."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except (
            tarfile.InvalidHeaderError,
            tarfile.TruncatedHeaderError,
            tarfile.EmptyHeaderError,
        ) as exn:
            where = f"tar header at byte {tarfile_.offset}"
            raise tarfile.SubsequentHeaderError(f"{where}: {exn or 'file ends'}") from exn


def _tar_files(
    sources: Iterable[dict[str, Any]],
    handler: Any,
    expected: dict[str, int] | None = None,
    lose: Callable[[int, str, str], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Each opened shard's regular members as ``{"fname", "data", "__url__"}``, then ``{}`` (end
    of shard), as webdataset's ``tar_file_expander``; but damage anywhere in a shard (a bad or
    truncated header, truncated data) ends the shard. A shard ``expected`` lists (its index's
    count) then reports exactly the samples that never arrived, ``lose(n, url, why)``; any
    other shard costs one ``handler`` call, since nothing says how much of it is missing."""
    expected = expected or {}
    split_shards, slot, _ = worker_slots(len(expected))
    for source in sources:
        url, stream = source["url"], source["stream"]
        keys, last = 0, None
        failure: Exception | None = None
        try:
            with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictTarInfo) as tar:
                for info in tar:
                    name = info.name
                    if info.isreg() and not re.match(r"__[^/]*__($|/)", name):  # metadata
                        data = tar.extractfile(info).read()
                        if (key := sample_key(name)) != last:
                            keys, last = keys + 1, key
                        yield {"fname": name, "data": data, "__url__": url}
                    tar.members = []
        except Exception as exn:
            failure = exn
        want = expected.get(url)
        if want is None or lose is None:
            if failure is not None:
                failure.args = (*failure.args, url)
                if not handler(failure):
                    return
        elif keys < want and (split_shards or slot == 0):  # every slot reads a shared shard
            why = f"cut short or damaged ({failure!r})" if failure else "ends early"
            lose(want - keys, url, f"{why} after {keys} of {want} samples")
        elif failure is not None:
            log.warning("shard %s: damaged after its %d samples: %r", url, keys, failure)
        yield {}


def _tar_samples(
    src: Iterable[dict[str, Any]],
    handler: Any,
    expected: dict[str, int] | None = None,
    lose: Callable[[int, str, str], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """webdataset's ``tarfile_to_samples`` with :func:`_tar_files`' strict reading."""
    files = _tar_files(url_opener(src, handler=handler), handler, expected, lose)
    return group_by_keys(files, handler=handler)


tar_samples = pipelinefilter(_tar_samples)


def read_shard_samples(
    spec: str | Path, sample_rate: int = 16000, limit: int | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """Decoded samples of shards (in shard order) and a reason for each one skipped (each
    sample a damaged shard lost, when its index says how many)."""
    shards = resolve_shards(spec)
    skipped: list[str] = []

    def handler(exn: BaseException) -> bool:
        log.warning("skipping unreadable shard data in %s: %r", spec, exn)
        skipped.append(f"unreadable shard data: {exn!r}")
        return True

    def lose(n: int, url: str, why: str) -> None:
        log.warning("shard %s: %s; %d samples lost", url, why, n)
        skipped.extend([f"{url}: lost in damaged shard ({why})"] * n)

    reader = tar_samples(handler=handler, expected=shards.expected, lose=lose)
    pipeline = wds.DataPipeline(wds.SimpleShardList(shards.urls), reader)
    samples: list[dict[str, Any]] = []
    for raw in pipeline:
        try:
            samples.append(decode_sample(raw, sample_rate))
        except SampleError as exn:
            where = f"{raw.get('__url__')}:{raw.get('__key__')}"
            log.warning("skipping sample %s: %s", where, exn)
            skipped.append(f"{where}: {exn}")
        if limit is not None and len(samples) >= limit:
            break
    return samples, skipped
