"""Read prepared shards as a stream of ready batches: split, shuffle, decode, bucket, collate.

Stages of :func:`build_pipeline` (all run inside DataLoader workers)::

    shards ── shuffle (train; same seed on all ranks/workers) ── split_by_node ── split_by_worker
      ── tar members → samples ── [sample-level split, see below] ── shuffle buffer (train)
      ── decode (FLAC → float32 mono at the target rate, JSON; video → uint8 [T, H, W] and the
         audio cut/padded to whole video frames) ── video transform (train: random crop, flip,
         time masks; eval: centre crop) ── DurationBatcher ── noise augmentation (train) ── collate

Each step has its module: which shards (:mod:`~mmalign.data.shardset`), strict tar reading
(:mod:`~mmalign.data.reading`), decoding (:mod:`~mmalign.data.decoding`), the seeded stages, their
seeds and the sample-level split (:mod:`~mmalign.data.stages`), batching
(:mod:`~mmalign.data.batching`), collate (:mod:`~mmalign.data.collate`), skip accounting
(:mod:`~mmalign.data.skips`) and the resumable loader (:mod:`~mmalign.data.loading`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import webdataset as wds
from webdataset.utils import pytorch_worker_info

from mmalign.data.augment import NoiseAugment
from mmalign.data.batching import DurationBatcher, LLMLength
from mmalign.data.collate import DEFAULT_VIDEO_CROP, Collator
from mmalign.data.features import WhisperFeatures
from mmalign.data.reading import tar_samples
from mmalign.data.skips import SkipCounter
from mmalign.data.stages import (
    Decode,
    EpochState,
    Mix,
    MixSource,
    NoiseStage,
    SampleSplit,
    SeededShuffle,
    SeedParts,
    ShardSource,
    VideoAugment,
)
from mmalign.data.video import VideoTransform

END = "__end_of_worker__"
"""Key of the marker a worker sends after its last batch (consumed by
:class:`~mmalign.data.loading.ShardLoader`)."""


class ShardPipeline(wds.DataPipeline):
    """A ``wds.DataPipeline`` of sample lists, collated into batches by :meth:`__iter__`, which
    also cuts epochs, skips already-consumed batches when resuming, and stamps every batch with
    its ``position``: ``(epoch, rank, worker, seq)``, ``seq`` counting the worker's sample lists
    in this epoch (collate failures included, so positions never depend on what failed)."""

    def __init__(
        self,
        *stages: Any,
        collator: Collator,
        counter: SkipCounter,
        state: EpochState,
        batches_per_worker: int | None = None,
    ) -> None:
        super().__init__(*stages)
        self.collator = collator
        self.counter = counter
        self.state = state
        self.batches_per_worker = batches_per_worker

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` through a :class:`~mmalign.data.loading.ShardLoader` run
        epoch ``epoch``."""
        self.state.next = epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """One epoch for this rank and worker: one pass, or with ``batches_per_worker`` passes
        over reshuffled shards until that many batches."""
        rank, _, worker, _ = pytorch_worker_info()
        _reset_passes(self.pipeline)
        skip = self.state.skip(rank, worker)
        limit = self.batches_per_worker
        seq = 0
        while limit is None or seq < limit:
            produced = 0
            for samples in self.iterator1():
                produced += 1
                if seq >= skip:
                    batch = self._collate(samples)
                    if batch is not None:
                        batch["position"] = (self.state.current, rank, worker, seq)
                        yield batch
                seq += 1
                if limit is not None and seq >= limit:
                    break
            if limit is None or produced == 0:
                break
        if self.state.sentinels:
            yield {END: worker}

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The batch with the worker's skip count since its previous batch; None if it fails."""
        try:
            batch = self.collator(samples)
        except Exception as exn:
            for s in samples:
                self.counter.skip(f"collate failed: {exn}", url=s["__url__"], key=s["__key__"])
            return None
        batch["skipped"] = self.counter.take()
        return batch


def _reset_passes(stages: Iterable[Any]) -> None:
    """Restart every stage's pass counter, so a worker's seeds depend on the epoch and the
    pass within it, never on how many epochs this copy of the pipeline has run before."""
    for stage in stages:
        if hasattr(stage, "runs"):
            stage.runs = 0
        for chain in getattr(stage, "chains", ()):
            _reset_passes(chain.pipeline)


def build_pipeline(
    urls: list[str],
    *,
    features: WhisperFeatures,
    train: bool,
    max_batch_seconds: float = 60.0,
    max_batch_size: int | None = None,
    max_batch_tokens: float | None = None,
    llm_length: LLMLength | None = None,
    shuffle_buffer: int = 1000,
    bucket_buffer: int = 200,
    seed: int = 0,
    keep_waveform: bool = False,
    batches_per_worker: int | None = None,
    video_transform: VideoTransform | None = None,
    video_crop: int | None = DEFAULT_VIDEO_CROP,
    noise: NoiseAugment | None = None,
    require_video: bool = False,
    task: str | None = None,
    mix: Sequence[tuple[MixSource, list[str]]] | None = None,
    max_audio_seconds: float | None = None,
    max_text_chars: int | None = None,
    min_audio_seconds: float | None = None,
    cached: bool = False,
    shard_samples: dict[str, int] | None = None,
) -> ShardPipeline:
    """The batch stream over ``urls``. ``train`` shuffles shards, samples and batch order;
    otherwise one deterministic pass. ``batches_per_worker`` makes the stream endless (shards are
    re-read, reshuffled) and cuts each epoch after that many batches per worker.
    ``max_batch_tokens`` also caps a batch's padded LLM length as ``llm_length`` estimates it
    (see :mod:`mmalign.data.batching`).

    ``video_transform`` runs on every clip after decoding (a training transform draws from a
    seeded generator); ``video_crop`` is collate's centre crop of clips still larger than it.
    ``noise`` mixes noise into each batch before collate, in training only (ignored otherwise).
    ``require_video`` drops samples without video; ``task`` replaces every sample's task.
    ``mix`` (pairs of :class:`MixSource` and its shard URLs) replaces ``urls`` with several
    shard sets, each decoded with its own task and target language, drawn by weight.
    ``max_audio_seconds``/``max_text_chars`` skip over-long samples, ``min_audio_seconds``
    too short ones. ``cached`` reads a feature
    cache (:mod:`mmalign.data.cache`): batches carry ``encoder_features`` instead of audio, and
    waveform noise cannot be mixed in. ``shard_samples`` (the index's count per shard URL) makes
    a damaged shard count every sample it lost.
    """
    if cached and train and noise is not None and noise.enabled:
        raise ValueError("build_pipeline: a feature cache has no waveforms to mix noise into")
    counter, state = SkipCounter(), EpochState()
    limits = {
        "max_audio_seconds": max_audio_seconds,
        "max_text_chars": max_text_chars,
        "min_audio_seconds": min_audio_seconds,
    }
    parts = SeedParts(state)

    def decoded(
        source_urls: list[str], src_task: str | None, tgt: str | None, k: int = 0
    ) -> list[Any]:
        src_seed = seed + 7919 * k  # sources over the same shards still shuffle differently
        if not source_urls:
            raise ValueError("build_pipeline needs at least one shard URL per source")
        chain: list[Any] = [
            ShardSource(source_urls, shuffle=train, seed=src_seed, state=state),
            tar_samples(
                handler=counter.handler,
                expected={u: shard_samples[u] for u in source_urls if u in (shard_samples or {})},
                lose=counter.lose,
            ),
            SampleSplit(len(source_urls)),
        ]
        if train and shuffle_buffer > 1:
            chain.append(SeededShuffle(shuffle_buffer, src_seed, parts))
        chain.append(
            Decode(features.sample_rate, counter, require_video, src_task, tgt, limits, cached)
        )
        return chain

    if mix:
        chains = [
            wds.DataPipeline(*decoded(u, src.task or task, src.target_lang, k))
            for k, (src, u) in enumerate(mix)
        ]
        stages: list[Any] = [Mix(chains, [src.weight for src, _ in mix], train, seed, parts)]
    else:
        stages = decoded(urls, task, None)
    if video_transform is not None:
        stages.append(VideoAugment(video_transform, seed, parts, counter))
    stages.append(
        DurationBatcher(
            max_batch_seconds,
            max_batch_size,
            buffer_size=bucket_buffer,
            shuffle=train,
            seed=seed,
            seed_parts=parts,
            max_batch_tokens=max_batch_tokens,
            tokens=llm_length,
        )
    )
    if train and noise is not None and noise.enabled:
        stages.append(NoiseStage(noise, seed, parts))
    return ShardPipeline(
        *stages,
        collator=Collator(features, keep_waveform, video_crop),
        counter=counter,
        state=state,
        batches_per_worker=None if batches_per_worker is None else max(1, int(batches_per_worker)),
    )
