"""Duration-based batching with length bucketing, as a streaming webdataset stage.

Speech batches cost what their *padded* length costs: ``max duration x batch size``. So, as in
lhotse's samplers, duration rather than a sample count decides what goes into a batch. The
batcher reads ``buffer_size`` samples, sorts them by duration (so similar lengths share a batch
and little padding is wasted), and cuts the sorted run greedily into batches whose padded
duration stays within ``max_batch_seconds`` (and whose size stays within ``max_batch_size``).
A single sample longer than ``max_batch_seconds`` becomes a batch of one rather than being
dropped. For training the batches of each buffer are emitted in a seeded random order; for
evaluation they come out in sorted order, so a run is reproducible.

The stage runs inside the webdataset pipeline, i.e. in the DataLoader workers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import webdataset as wds

Sample = dict[str, Any]


def _duration(sample: Sample) -> float:
    return float(sample["duration"])


def pack_sorted(
    samples: list[Sample],
    max_batch_seconds: float,
    max_batch_size: int | None = None,
    duration: Callable[[Sample], float] = _duration,
) -> list[list[Sample]]:
    """Cut ``samples`` (sorted by ascending duration) greedily into batches whose padded duration,
    longest x count, is at most ``max_batch_seconds``."""
    batches: list[list[Sample]] = []
    current: list[Sample] = []
    longest = 0.0
    for sample in samples:
        d = duration(sample)
        new_longest = max(longest, d)
        full = max_batch_size is not None and len(current) >= max_batch_size
        if current and (full or new_longest * (len(current) + 1) > max_batch_seconds):
            batches.append(current)
            current, new_longest = [], d
        current.append(sample)
        longest = new_longest
    if current:
        batches.append(current)
    return batches


class DurationBatcher(wds.PipelineStage):
    """Streaming bucketing batcher: iterator of samples in, iterator of sample lists out.

    Use it as a stage of a ``wds.DataPipeline`` (or call it on any iterator). ``shuffle`` permutes
    the batches of each buffer with a generator seeded by ``seed``, the epoch and the number of
    runs so far, plus whatever ``seed_parts`` returns (the data pipeline passes rank and worker),
    so every epoch differs and a rerun repeats exactly.
    """

    def __init__(
        self,
        max_batch_seconds: float,
        max_batch_size: int | None = None,
        buffer_size: int = 200,
        shuffle: bool = False,
        seed: int = 0,
        duration: Callable[[Sample], float] = _duration,
        seed_parts: Callable[[], tuple[int, ...]] | None = None,
    ) -> None:
        if max_batch_seconds <= 0:
            raise ValueError(f"max_batch_seconds must be positive, got {max_batch_seconds}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.max_batch_seconds = float(max_batch_seconds)
        self.max_batch_size = max_batch_size
        self.buffer_size = max(1, int(buffer_size))
        self.shuffle = shuffle
        self.seed = seed
        self.duration = duration
        self.seed_parts = seed_parts
        self.runs = 0

    def run(self, src: Iterable[Sample]) -> Iterator[list[Sample]]:
        """Batch one pass over ``src``."""
        parts = self.seed_parts() if self.seed_parts is not None else ()
        rng = random.Random(f"batcher-{self.seed}-{self.runs}-{parts}")
        self.runs += 1
        buffer: list[Sample] = []
        for sample in src:
            buffer.append(sample)
            if len(buffer) >= self.buffer_size:
                yield from self._flush(buffer, rng)
                buffer = []
        if buffer:
            yield from self._flush(buffer, rng)

    __call__ = run

    def _flush(self, buffer: list[Sample], rng: random.Random) -> list[list[Sample]]:
        buffer.sort(key=self.duration)
        batches = pack_sorted(buffer, self.max_batch_seconds, self.max_batch_size, self.duration)
        if self.shuffle:
            rng.shuffle(batches)
        return batches


def estimate_num_batches(
    num_samples: int,
    total_seconds: float | None,
    max_batch_seconds: float,
    max_batch_size: int | None = None,
) -> int:
    """Expected number of batches for ``num_samples`` clips lasting ``total_seconds`` together,
    used to turn an epoch measured in samples into batches. A sorted batch wastes about half a
    clip of padding plus a little spread, so each batch holds ``max_batch_seconds`` minus half a
    mean clip, at 95 %; the size cap gives a second lower bound. An estimate: with clips long
    relative to ``max_batch_seconds`` and a wide spread of durations, fewer samples fit."""
    if num_samples <= 0:
        return 0
    by_count = math.ceil(num_samples / max_batch_size) if max_batch_size else 1
    if not total_seconds or total_seconds <= 0:  # no durations known: assume full size-capped
        return by_count if max_batch_size else num_samples
    mean = total_seconds / num_samples
    usable = max(mean, max_batch_seconds - mean / 2) * 0.95
    by_seconds = math.ceil(total_seconds / usable)
    return max(1, by_count, min(by_seconds, num_samples))
