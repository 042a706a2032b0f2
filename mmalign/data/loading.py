"""The resumable loader: a DataLoader over a :class:`~mmalign.data.pipeline.ShardPipeline` whose
batches come in a fixed order, each carrying the loader state after it (what a checkpoint saves
to resume exactly), with every rank yielding the same number of batches under torch.distributed
and a stop when too much of the data is damaged (:class:`ShardLoader`, :func:`make_loader`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader
from webdataset.utils import pytorch_worker_info

from mmalign.data.pipeline import END, ShardPipeline
from mmalign.data.skips import FILTER_REASONS, DataQualityError, SkipCounter
from mmalign.data.stages import EpochState

log = logging.getLogger(__name__)


class ShardLoader(DataLoader):
    """DataLoader for a :class:`ShardPipeline` (use ``batch_size=None``) that starts a new epoch
    of the pipeline on every ``iter()`` and makes what it yields exact and resumable:

    - batches come from the workers in a fixed round-robin order (worker 0, 1, ...; a worker
      leaves the cycle once it sends its end marker), whatever order they finish in, so a run
      is a function of its seed alone;
    - every batch's ``position`` becomes the loader state *after* it (epoch, batches taken
      from each worker, the worker next in turn): the state to save in a checkpoint;
    - under torch.distributed every rank yields the same number of batches: a rank that runs
      out yields copies of its last batch marked ``pad: True`` (weight 0) until all are done,
      so no collective call hangs at epoch end;
    - ``max_skip_rate`` stops the run with :class:`DataQualityError` when more than that share
      of the samples read so far were damaged (filters such as
      ``max_audio_seconds`` aside; checked once ``min_samples`` were read).
    """

    def __init__(
        self,
        *args: Any,
        max_skip_rate: float | None = None,
        min_samples: int = 200,
        split: str = "data",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.max_skip_rate, self.min_samples, self.split = max_skip_rate, min_samples, split
        if isinstance(self.dataset, ShardPipeline):
            self.dataset.state.sentinels = True

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        dataset = self.dataset
        if not isinstance(dataset, ShardPipeline):
            return super().__iter__()
        state = dataset.state
        state.current = state.next
        state.next += 1
        state.started = True
        workers = max(1, self.num_workers)
        resume = _rank_resume(state, workers)
        merged = _round_robin(super().__iter__(), workers, state.current, resume)
        return self._finish(_even_ranks(merged), dataset)

    def _finish(
        self, batches: Iterator[dict[str, Any]], dataset: ShardPipeline
    ) -> Iterator[dict[str, Any]]:
        counter, epoch = dataset.counter, dataset.state.current
        before = counter.totals_by_reason()
        for i, batch in enumerate(batches):
            if self.max_skip_rate is not None and i % 10 == 0:
                self.check_skip_rate(counter)
            yield batch
        if self.max_skip_rate is not None:
            self.check_skip_rate(counter)
        dataset.state.finished = epoch
        after = counter.totals_by_reason()
        per_epoch = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
        if per_epoch:
            log.warning(
                "%s epoch %d (rank %d): skipped %d samples: %s",
                self.split,
                epoch,
                _rank_world()[0],
                sum(per_epoch.values()),
                ", ".join(f"{k}: {v}" for k, v in sorted(per_epoch.items())),
            )

    def check_skip_rate(self, counter: SkipCounter) -> None:
        """Raise :class:`DataQualityError` when the share of skipped samples is too high."""
        seen = counter.seen
        if self.max_skip_rate is None or seen < self.min_samples or not seen:
            return
        by_reason = counter.totals_by_reason()
        skipped = sum(v for k, v in by_reason.items() if k not in FILTER_REASONS)
        if skipped / seen > self.max_skip_rate:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(by_reason.items()))
            raise DataQualityError(
                f"{self.split}: {skipped} of {seen} samples read so far were damaged "
                f"({skipped / seen:.1%} > max_skip_rate={self.max_skip_rate}); by reason: "
                f"{reasons}. The log names each skipped shard and key; fix the shards, or raise "
                "data.max_skip_rate"
            )


def _rank_resume(state: EpochState, workers: int) -> dict[str, Any] | None:
    """This rank's saved position if it belongs to the epoch starting now and still fits."""
    resume = state.resume
    if not resume or resume.get("epoch") != state.current:
        return None
    rank, world = _rank_world()
    ranks = resume.get("ranks") or []
    if len(ranks) != world or any(r is None or int(r["workers"]) != workers for r in ranks):
        log.warning(
            "data position of epoch %d was saved with %d rank(s) and workers %s; this run has "
            "%d x %d, so the epoch restarts from its beginning",
            state.current,
            len(ranks),
            [r and r["workers"] for r in ranks],
            world,
            workers,
        )
        state.resume = None
        return None
    return ranks[rank]


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _round_robin(
    items: Iterator[dict[str, Any]], workers: int, epoch: int, resume: dict[str, Any] | None
) -> Iterator[dict[str, Any]]:
    """Batches in worker order 0, 1, ..., skipping workers that have ended; each batch's
    ``position`` replaced by the loader state after it."""
    seqs = {w: 0 for w in range(workers)}
    turn = 0
    if resume is not None:
        seqs.update({int(w): int(n) for w, n in resume["seqs"].items()})
        turn = int(resume["next_worker"])
    alive = set(range(workers))
    pending: dict[int, list[dict[str, Any]]] = {w: [] for w in range(workers)}
    while alive:
        if turn not in alive:
            turn = (turn + 1) % workers
            continue
        while not pending[turn]:
            try:
                item = next(items)
            except StopIteration:
                raise RuntimeError(
                    f"data worker {turn} stopped without its end marker (epoch {epoch})"
                ) from None
            owner = int(item[END]) if END in item else int(item["position"][2])
            pending[owner].append(item)
        item = pending[turn].pop(0)
        if END in item:
            alive.discard(turn)
        else:
            seqs[turn] = int(item["position"][3]) + 1
            item["position"] = {
                "epoch": epoch,
                "workers": workers,
                "seqs": dict(seqs),
                "next_worker": (turn + 1) % workers,
            }
            yield item
        turn = (turn + 1) % workers


def _even_ranks(batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Under torch.distributed, pad ranks that run out with weight-0 copies of their last batch
    until every rank is done (one tiny all-reduce per batch)."""
    rank, world = _rank_world()
    if world == 1:
        yield from batches
        return
    backend = str(torch.distributed.get_backend())
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if "nccl" in backend and torch.cuda.is_available()
        else torch.device("cpu")
    )
    last: dict[str, Any] | None = None
    while True:
        batch = next(batches, None)
        flag = torch.tensor([0 if batch is None else 1], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if int(flag.item()) == 0:
            return
        if batch is not None:
            last = batch
            yield batch
            continue
        if last is None:
            raise RuntimeError(
                f"rank {rank} received no data this epoch while other ranks did: fewer usable "
                "samples than ranks x workers; use fewer devices/workers or more data"
            )
        yield {**last, "pad": True}


class _PinRank:
    """DataLoader ``worker_init_fn``: the main process's rank and world size, for the worker.

    A worker finds its rank through webdataset's ``pytorch_worker_info`` (shard split, seeds,
    resume), which reads ``RANK``/``WORLD_SIZE`` or torch.distributed. Lightning's launchers do
    not always set both variables, and spawn/forkserver workers have no process group, so
    every rank's workers would read the same shards with the same seeds.
    """

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def __call__(self, worker_id: int) -> None:
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(self.rank), str(self.world)


def make_loader(
    pipeline: ShardPipeline,
    num_workers: int = 0,
    *,
    max_skip_rate: float | None = None,
    min_samples: int = 200,
    split: str = "data",
    worker_context: str | None = None,
) -> ShardLoader:
    """A :class:`ShardLoader` over ``pipeline``: batching happens in the pipeline.

    ``worker_context`` is the workers' start method (``fork``, ``spawn``, ``forkserver``;
    None: torch's default); whichever it is, workers know this process's rank and world size.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = _rank_world()
    else:
        rank, world, _, _ = pytorch_worker_info()
    return ShardLoader(
        pipeline,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=_PinRank(rank, world) if num_workers > 0 else None,
        multiprocessing_context=worker_context if num_workers > 0 else None,
        max_skip_rate=max_skip_rate,
        min_samples=min_samples,
        split=split,
    )
