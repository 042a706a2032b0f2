"""The seeded stages :func:`mmalign.data.pipeline.build_pipeline` chains: shard order, sample
split, shuffle buffer, decode, mixing of sources, video and noise augmentation.

*Seeds.* Shard order uses ``seed`` and the epoch only, so every rank and worker permutes the shard
list identically before taking its slice. The sample buffer, batch order, video augmentation and
noise augmentation also mix in rank and worker. The epoch is counted in the main process by
:class:`~mmalign.data.loading.ShardLoader` (each ``iter()`` is one epoch) and reaches workers
because they receive a fresh copy of the pipeline every epoch; each stage also counts its own
passes, so repeated passes inside one epoch and persistent workers still differ.

*Few shards.* With fewer shards than ``world_size x num_workers`` slots, splitting shards would
leave some workers (or ranks) idle, so every slot reads all shards and keeps every k-th sample.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import webdataset as wds
from webdataset.utils import pytorch_worker_info

from mmalign.data.augment import NoiseAugment
from mmalign.data.decoding import decode_cached_sample, decode_sample
from mmalign.data.reading import worker_slots
from mmalign.data.skips import SkipCounter
from mmalign.data.video import VideoTransform


class EpochState:
    """Epoch number shared by the stages of one pipeline copy; advanced by
    :class:`~mmalign.data.loading.ShardLoader`.

    ``resume`` holds a saved data position (a batch's ``position``, see ``ShardLoader``): in epoch
    ``resume["epoch"]`` every worker skips the batches the checkpointed run had consumed.
    ``finished`` is the last epoch whose loader ran to its end.
    """

    def __init__(self) -> None:
        self.current = 0
        self.next = 0
        self.started = False
        self.finished: int | None = None
        self.resume: dict[str, Any] | None = None
        self.sentinels = False

    def skip(self, rank: int, worker: int) -> int:
        """Batches worker ``worker`` of ``rank`` skips in the current epoch (resume)."""
        resume = self.resume
        if not resume or resume.get("epoch") != self.current:
            return 0
        ranks = resume.get("ranks") or []
        if rank >= len(ranks) or ranks[rank] is None:
            return 0
        return int(ranks[rank]["seqs"].get(worker, ranks[rank]["seqs"].get(str(worker), 0)))


class SeedParts:
    """Epoch, rank and worker, mixed into per-worker seeds (a class so that it pickles)."""

    def __init__(self, state: EpochState) -> None:
        self.state = state

    def __call__(self) -> tuple[int, ...]:
        rank, _, worker, _ = pytorch_worker_info()
        return (self.state.current, rank, worker)


@dataclass
class MixSource:
    """One shard set of a training mixture: its share of the samples and what it is used for.

    ``shards`` is anything :func:`~mmalign.data.shardset.resolve_shards` takes; ``weight`` its
    relative sampling probability; ``task``/``target_lang`` override the samples' own (e.g. the
    same shards once as ``asr`` and once as ``st`` into ``de``).
    """

    shards: str
    weight: float = 1.0
    task: str | None = None
    target_lang: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.weight, (int, float)) or not self.weight > 0:
            raise ValueError(
                f"mixture source {self.shards!r}: weight must be > 0, got {self.weight}"
            )


def _forever(chain: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Pass after pass over ``chain`` (reshuffled each time); stops if a pass yields nothing."""
    while True:
        n = 0
        for sample in chain:
            n += 1
            yield sample
        if n == 0:
            return


class Mix(wds.PipelineStage):
    """Samples drawn from several decoded streams by weight (training; each stream repeats, so
    the mixture never runs dry and the epoch is cut by batch count), or the streams one after
    the other (evaluation: every sample once). webdataset's ``RandomMix`` draws from the global
    ``random`` module, which nothing seeds per worker and epoch, hence this seeded draw."""

    def __init__(
        self,
        chains: list[wds.DataPipeline],
        weights: list[float],
        train: bool,
        seed: int,
        seed_parts: SeedParts,
    ) -> None:
        self.chains, self.weights, self.train = chains, weights, train
        self.seed, self.seed_parts = seed, seed_parts
        self.runs = 0

    def run(self) -> Iterator[dict[str, Any]]:
        if not self.train:
            for chain in self.chains:
                yield from chain
            return
        rng = random.Random(f"mix-{self.seed}-{self.runs}-{self.seed_parts()}")
        self.runs += 1
        streams = [_forever(c) for c in self.chains]
        alive = list(range(len(streams)))
        while alive:
            i = rng.choices(alive, weights=[self.weights[j] for j in alive])[0]
            try:
                yield next(streams[i])
            except StopIteration:  # a source with no usable sample at all
                alive.remove(i)


class ShardSource(wds.PipelineStage):
    """Shard URLs for this rank and worker, seeded-shuffled identically on all of them."""

    def __init__(self, urls: list[str], shuffle: bool, seed: int, state: EpochState) -> None:
        self.urls, self.shuffle, self.seed, self.state = list(urls), shuffle, seed, state
        self.runs = 0

    def run(self) -> Iterator[dict[str, str]]:
        urls = list(self.urls)
        if self.shuffle:
            random.Random(f"shards-{self.seed}-{self.state.current}-{self.runs}").shuffle(urls)
        self.runs += 1
        split_shards, _, _ = worker_slots(len(urls))
        if split_shards:
            urls = list(wds.split_by_worker(wds.split_by_node(urls)))
        for url in urls:
            yield {"url": url}


class SampleSplit(wds.PipelineStage):
    """Every k-th sample per slot when there are too few shards to split (see module doc)."""

    def __init__(self, n_urls: int) -> None:
        self.n_urls = n_urls

    def run(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        split_shards, slot, slots = worker_slots(self.n_urls)
        if split_shards or slots == 1:
            yield from src
            return
        for i, sample in enumerate(src):
            if i % slots == slot:
                yield sample


class SeededShuffle(wds.PipelineStage):
    """webdataset's shuffle buffer with a reproducible per-epoch, per-worker seed."""

    def __init__(self, bufsize: int, seed: int, seed_parts: SeedParts) -> None:
        self.bufsize, self.seed, self.seed_parts = bufsize, seed, seed_parts
        self.runs = 0

    def run(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        rng = random.Random(f"samples-{self.seed}-{self.runs}-{self.seed_parts()}")
        self.runs += 1
        return wds.shuffle(self.bufsize, initial=self.bufsize, rng=rng)(iter(src))


class Decode(wds.PipelineStage):
    """Decode samples, dropping (and counting) the ones that fail; ``task`` overrides theirs."""

    def __init__(
        self,
        sample_rate: int,
        counter: SkipCounter,
        require_video: bool = False,
        task: str | None = None,
        target_lang: str | None = None,
        limits: dict[str, Any] | None = None,
        cached: bool = False,
    ) -> None:
        self.sample_rate, self.counter = sample_rate, counter
        self.require_video, self.task, self.target_lang = require_video, task, target_lang
        self.limits = dict(limits or {})
        self.cached = cached  # a feature cache: encoder output in place of audio

    def run(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for raw in src:
            self.counter.saw()
            try:
                if self.cached:
                    sample = decode_cached_sample(
                        raw, task=self.task, target_lang=self.target_lang, **self.limits
                    )
                else:
                    sample = decode_sample(
                        raw,
                        self.sample_rate,
                        require_video=self.require_video,
                        task=self.task,
                        target_lang=self.target_lang,
                        **self.limits,
                    )
            except Exception as exn:
                self.counter.skip(str(exn), url=raw.get("__url__"), key=raw.get("__key__"))
                continue
            yield sample


class VideoAugment(wds.PipelineStage):
    """Per-clip :class:`VideoTransform`, seeded per epoch, pass, rank and worker; clips it
    rejects (smaller than the crop) are skipped and counted."""

    def __init__(
        self, transform: VideoTransform, seed: int, seed_parts: SeedParts, counter: SkipCounter
    ) -> None:
        self.transform, self.seed, self.seed_parts = transform, seed, seed_parts
        self.counter = counter
        self.runs = 0

    def run(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        rng = random.Random(f"video-{self.seed}-{self.runs}-{self.seed_parts()}")
        self.runs += 1
        for sample in src:
            if sample.get("video") is not None:
                try:
                    sample["video"] = self.transform(sample["video"], rng)
                except Exception as exn:  # never stop an epoch for one clip
                    reason = str(exn) if "smaller than crop" in str(exn) else f"bad video: {exn}"
                    self.counter.skip(reason, url=sample["__url__"], key=sample["__key__"])
                    continue
            yield sample


class NoiseStage(wds.PipelineStage):
    """Batch-level :class:`NoiseAugment` (babble needs the batch), seeded like the others."""

    def __init__(self, noise: NoiseAugment, seed: int, seed_parts: SeedParts) -> None:
        self.noise, self.seed, self.seed_parts = noise, seed, seed_parts
        self.runs = 0

    def run(self, src: Iterable[list[dict[str, Any]]]) -> Iterator[list[dict[str, Any]]]:
        rng = random.Random(f"noise-{self.seed}-{self.runs}-{self.seed_parts()}")
        self.runs += 1
        for samples in src:
            yield self.noise(samples, rng)
