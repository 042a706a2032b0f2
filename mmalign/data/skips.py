"""Skip accounting: which samples were dropped and why, counted across DataLoader workers.

*Corrupt data never stops an epoch.* Undecodable audio or video, bad JSON, missing fields and clips
smaller than the video crop are skipped; each skip logs a warning naming the shard URL and key and
is counted by the pipeline's :class:`SkipCounter`, in total and per reason (the text before the
first colon, e.g. ``undecodable video``). A shard cut short or damaged counts, when its folder's
``index.json`` gives its size, every sample it lost (``lost in damaged shard``), not one; the
index itself is checked against the shards when they are resolved (:mod:`mmalign.data.index`).
DataLoader workers are other processes, so the counter
keeps its counts in shared memory (a ``multiprocessing.RawArray`` with one slot per worker,
created in the main process and inherited by the workers): the data module reads exact totals at
any time (``ShardDataModule.skipped``, ``skipped_by_reason``), including drops after a worker's
last batch or in a worker that yields no batch at all. For per-step logging each batch
also carries ``skipped``, the drops its worker saw since that worker's previous batch (deltas, so
a consumer simply sums them, e.g. ``self.log(..., reduce_fx="sum")``).
"""

from __future__ import annotations

import logging
import multiprocessing
from collections import Counter
from multiprocessing.context import get_spawning_popen
from typing import Any

import torch

log = logging.getLogger(__name__)

SKIP_REASONS = (
    "missing json",
    "bad json",
    "missing text",
    "missing audio",
    "missing translation",
    "missing target_lang",
    "undecodable audio",
    "empty audio",
    "audio too long",
    "audio too short",
    "text too long",
    "missing video",
    "undecodable video",
    "video smaller than crop",
    "bad video",
    "missing features",
    "undecodable features",
    "unreadable shard data",
    "lost in damaged shard",
    "collate failed",
    "other",
)
"""Reasons counted across worker processes (:meth:`SkipCounter.totals_by_reason`); the rest are
counted as ``other`` there (and under their own name in the per-process ``by_reason``)."""


FILTER_REASONS = frozenset(
    {
        "missing translation",
        "missing target_lang",
        "missing video",
        "audio too long",
        "audio too short",
        "text too long",
        "video smaller than crop",
    }
)
"""Skips that filter by configuration (task, limits, crop) rather than damage; ``max_skip_rate``
does not count them."""


class SampleError(ValueError):
    """A sample that cannot be used (bad audio, JSON or fields)."""


class SkipCounter:
    """Counts and logs samples dropped by a pipeline, across DataLoader worker processes.

    ``total`` sums a shared-memory array that every copy made when workers start (fork or spawn)
    writes into, one slot per worker (slot 0: the main process), so no lock is needed;
    :meth:`totals_by_reason` does the same per reason (:data:`SKIP_REASONS`).
    ``by_reason`` is this process's own breakdown; :meth:`take` hands out the drops not yet put
    into a batch. A copy pickled outside process start (``copy.deepcopy``) counts on its own.
    """

    SLOTS = 1024

    def __init__(self) -> None:
        self.by_reason: Counter[str] = Counter()
        self._unreported = 0
        self._local_total = 0
        self._local_reasons: Counter[str] = Counter()
        self._shared: Any = multiprocessing.RawArray("q", self.SLOTS)
        self._shared_reasons: Any = multiprocessing.RawArray("q", self.SLOTS * len(SKIP_REASONS))
        self._shared_seen: Any = multiprocessing.RawArray("q", self.SLOTS)
        self._local_seen = 0

    @property
    def total(self) -> int:
        """Drops counted by all processes sharing this counter."""
        if self._shared is None:
            return self._local_total
        return int(sum(self._shared))

    @property
    def seen(self) -> int:
        """Samples read by all processes sharing this counter (used or skipped)."""
        if self._shared_seen is None:
            return self._local_seen
        return int(sum(self._shared_seen))

    def saw(self) -> None:
        """Count one sample read (the denominator of the skip rate)."""
        self._local_seen += 1
        if self._shared_seen is not None:
            self._shared_seen[self._slot()] += 1

    @staticmethod
    def _slot() -> int:
        info = torch.utils.data.get_worker_info()
        return 0 if info is None else 1 + info.id % (SkipCounter.SLOTS - 1)

    def totals_by_reason(self) -> dict[str, int]:
        """Drops per reason counted by all processes sharing this counter (nonzero ones)."""
        if self._shared_reasons is None:
            return dict(self._local_reasons)
        n = len(SKIP_REASONS)
        sums = [0] * n
        values = self._shared_reasons[:]
        for slot in range(self.SLOTS):
            row = values[slot * n : (slot + 1) * n]
            if any(row):
                sums = [a + b for a, b in zip(sums, row, strict=True)]
        return {r: int(v) for r, v in zip(SKIP_REASONS, sums, strict=True) if v}

    def _count(self, reason: str) -> None:
        self.by_reason[reason] += 1
        self._unreported += 1
        self._local_total += 1
        known = reason if reason in SKIP_REASONS else "other"
        self._local_reasons[known] += 1
        if self._shared is not None:
            slot = self._slot()
            self._shared[slot] += 1
            self._shared_reasons[slot * len(SKIP_REASONS) + SKIP_REASONS.index(known)] += 1

    def skip(self, reason: str, *, url: str | None = None, key: str | None = None) -> None:
        """Record one dropped sample and log where it came from."""
        log.warning("skipping sample %r in shard %s: %s", key, url, reason)
        self._count(reason.split(":")[0])

    def handler(self, exn: BaseException) -> bool:
        """webdataset ``handler=`` for tar-level errors: log, count, keep going. (webdataset's own
        ``warn_and_continue`` sleeps half a second per error.)"""
        log.warning("skipping unreadable shard data: %r", exn)
        self.saw()
        self._count("unreadable shard data")
        return True

    def lose(self, n: int, url: str, why: str) -> None:
        """Record ``n`` samples an index lists for shard ``url`` that never arrived (the shard is
        cut short or damaged): each counts as read and skipped, so ``max_skip_rate`` weighs a
        half-lost shard by the samples lost, not as one."""
        log.warning("shard %s: %s; %d samples lost", url, why, n)
        for _ in range(n):
            self.saw()
            self._count("lost in damaged shard")

    def take(self) -> int:
        """Drops since the previous call; resets that count."""
        n, self._unreported = self._unreported, 0
        return n

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if get_spawning_popen() is None:  # shared memory only travels to new processes
            state["_shared"] = None
            state["_shared_reasons"] = None
            state["_shared_seen"] = None
            state["_local_seen"] = self.seen
            state["_local_total"] = self.total
            state["_local_reasons"] = Counter(self.totals_by_reason())
        return state


class DataQualityError(RuntimeError):
    """Too many samples of a split were skipped as unusable (see ``max_skip_rate``)."""
