"""Lightning data module over prepared webdataset shards.

Each split is a shard folder (with ``index.json``), an ``index.json``, a ``.tar`` or a glob or brace
pattern. Batches follow the schema in :mod:`mmalign.data.collate`; batching (by duration) happens
inside the pipeline, in the DataLoader workers, so the loaders use ``batch_size=None``.

*Sharded streaming.* Every rank and worker reads its own shards (a seeded permutation of the
list, the same on all of them, split by rank, then by worker; with fewer shards than slots every
slot reads all shards and keeps every k-th sample). Training has two modes:

- ``resampled`` (default): an endless stream over the shards, reshuffled on every pass; an epoch
  is a fixed number of batches per worker, derived from the index's sample count (or
  ``epoch_size``) divided by the world size and an estimate of samples per batch. Without a
  sample count an epoch is one pass.
- ``exact``: one pass per epoch, each sample once. Shards rarely divide evenly, so ranks run
  out at different steps: a rank that is done pads with weight-0 copies of its last batch until
  all are (see :class:`mmalign.data.loading.ShardLoader`), so no rank hangs at epoch end.

Validation, test and predict make one deterministic pass, each sample exactly once (padded the
same way under DDP).

*Exact resume* of training from a checkpoint: see :mod:`mmalign.data.resume`.

*Dirty data* is skipped and counted per reason (``skipped_by_reason``) and logged per epoch;
``max_skip_rate`` stops a run whose shards are mostly unusable.

Lip video in the shards (``prepare`` with a ``video`` column) comes out as ``video`` batches:
training clips get a random ``video_crop`` window, flips and optional time masks; the other
splits the centre crop, the view evaluation and transcription take too. Training audio can get
noise mixed in at SNRs drawn from ``noise_snrs`` (babble from the batch itself, or noise files);
the other splits are always clean.

A split whose shards are a feature cache (``mmalign cache-features``; see
:mod:`mmalign.data.cache` and the ``features`` setting) yields the stored encoder output
(``encoder_features``) instead of audio, so training never runs the encoder on it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from webdataset.utils import pytorch_worker_info

from mmalign.data.augment import NoiseAugment
from mmalign.data.batching import LLMLength, estimate_num_batches
from mmalign.data.cache import check_cache_settings, split_caches
from mmalign.data.features import WhisperFeatures
from mmalign.data.loading import ShardLoader, make_loader
from mmalign.data.pipeline import ShardPipeline, build_pipeline
from mmalign.data.resume import ExactResume
from mmalign.data.settings import check_settings
from mmalign.data.shardset import ShardSet
from mmalign.data.splits import Mixture, resolve_splits
from mmalign.data.stages import MixSource
from mmalign.data.threads import cap_cpu_threads
from mmalign.data.video import VideoTransform

SPLITS = ("train", "val", "test", "predict")
_REQUIRED = {  # val is optional when fitting
    "fit": ("train",),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("predict",),
}


class ShardDataModule(ExactResume, L.LightningDataModule):
    """Train/val/test/predict loaders over webdataset shards made by ``mmalign prepare``.

    Args:
        train: Training shards (folder with index.json, index.json, .tar, glob or brace pattern),
            or a mixture: a list of sources (:class:`mmalign.data.stages.MixSource`: ``shards``,
            ``weight``, ``task``, ``target_lang``) drawn by weight, e.g. the same shards as
            ``asr`` and as ``st`` into German.
        val: Validation shards, or a list of sources (read one after the other, each sample once
            per source; validation then logs metrics per task).
        test: Test shards (or sources, as ``val``).
        predict: Shards to transcribe with ``predict``.
        max_batch_seconds: Cap on a batch's padded audio duration (longest clip x batch size).
        max_batch_size: Optional cap on the number of clips per batch.
        max_batch_tokens: Optional cap on a batch's padded LLM length (longest estimated LLM
            sequence x batch size); samples are then bucketed by both costs. The estimate is
            ``llm_prompt_tokens + llm_tokens_per_second x seconds + characters /
            chars_per_token``. None (default): duration alone decides. Under ``resampled``
            sampling the epoch's batch count is still estimated from durations, so a binding
            token budget makes an epoch cover fewer samples.
        llm_tokens_per_second: Audio embeddings the LLM reads per second (encoder frame rate
            / compression rate, e.g. Whisper's 50 at rate 5: 10); 0 leaves them out of the
            estimate, which then counts target tokens.
        llm_prompt_tokens: Prompt tokens per sample in that estimate.
        chars_per_token: Target characters per LLM token in that estimate.
        num_workers: DataLoader worker processes (0 reads in the main process).
        worker_context: how workers start (``fork``, ``spawn``, ``forkserver``; default:
            torch's); each is told its rank and world size by the main process.
        shuffle_buffer: Training samples held for shuffling (compressed audio, so it is cheap).
        bucket_buffer: Samples sorted together for length bucketing.
        sample_rate: Audio rate the encoders expect; other rates are resampled on the fly.
        n_mels: Mel bins of the Whisper features (80, or 128 for large-v3).
        seed: Seed of every shuffle; each epoch, rank and worker derives its own from it.
        epoch_size: Training samples per epoch (all ranks together); default: the index's count.
        keep_waveform: Also put padded waveforms in batches (``audio``), for waveform encoders.
        video_crop: Side of the square lip crop (88 for 96 x 96 mouth regions): random in
            training, central elsewhere; None keeps whole frames. Smaller clips are skipped.
        video_flip: Probability of flipping a training clip horizontally.
        video_time_masks: Runs of training frames replaced by the clip's mean (0: none).
        video_time_mask_frames: Longest such run, in frames.
        require_video: Drop samples without video (for video or audio-visual models).
        noise_snrs: Training noise: SNRs in dB drawn per sample, ``null`` meaning clean (e.g.
            ``[null, 10, 5, 0, -5]``); None turns noise augmentation off.
        noise_source: ``babble`` (other utterances of the batch), a folder of audio files, an
            audio file, or shards.
        noise_prob: Probability that a training sample gets an SNR drawn at all.
        babble_speakers: Utterances summed into one babble.
        task: Replaces every sample's task in every split (e.g. ``vsr`` to train a video-only
            model on an audio-visual corpus); None keeps the shards' own.
        max_audio_seconds: Skip (and count) samples longer than this; None: the encoder's
            window (Whisper: 30 s; no limit for encoders without one). Longer is an error.
        max_text_chars: Skip (and count) samples whose target text is longer; None: no limit.
        min_audio_seconds: Skip (and count) shorter samples; None: the audio of one LLM token
            (the encoder's frame rate times the projector's rate).
        sampling: Training stream: ``resampled`` (endless, fixed epoch length) or ``exact``
            (each sample once per epoch; ranks pad to the same number of steps).
        max_skip_rate: Stop with an error when more than this share of the samples read in a
            split were unusable (None: never).
        skip_rate_min_samples: Samples read before ``max_skip_rate`` is judged.
        features: ``auto`` reads a split from the feature cache its shards are (written by
            ``mmalign cache-features``: ``index.json`` has a ``cache`` block), else from audio;
            ``cached`` requires every split to be a cache; ``live`` computes features from
            audio (a cache must then have kept it). Cached batches carry ``encoder_features``
            instead of ``audio_features``; the model checks the cache matches its encoder
            before training, and ``noise_snrs``, ``keep_waveform`` and ``require_video`` are
            refused with a cache.
    """

    def __init__(
        self,
        train: str | list[MixSource] | None = None,
        val: str | list[MixSource] | None = None,
        test: str | list[MixSource] | None = None,
        predict: str | None = None,
        max_batch_seconds: float = 60.0,
        max_batch_size: int | None = None,
        max_batch_tokens: int | None = None,
        llm_tokens_per_second: float = 0.0,
        llm_prompt_tokens: int = 0,
        chars_per_token: float = 4.0,
        num_workers: int = 0,
        worker_context: str | None = None,
        shuffle_buffer: int = 1000,
        bucket_buffer: int = 200,
        sample_rate: int = 16000,
        n_mels: int = 80,
        seed: int = 0,
        epoch_size: int | None = None,
        keep_waveform: bool = False,
        video_crop: int | None = 88,
        video_flip: float = 0.5,
        video_time_masks: int = 0,
        video_time_mask_frames: int = 10,
        require_video: bool = False,
        noise_snrs: list[float | None] | None = None,
        noise_source: str = "babble",
        noise_prob: float = 1.0,
        babble_speakers: int = 3,
        task: str | None = None,
        max_audio_seconds: float | None = None,
        max_text_chars: int | None = None,
        min_audio_seconds: float | None = None,
        sampling: str = "resampled",
        max_skip_rate: float | None = 0.1,
        skip_rate_min_samples: int = 200,
        features: str = "auto",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        for split in ("train", "val", "test"):  # plain dicts: checkpoints load weights_only
            if isinstance(self.hparams.get(split), (list, tuple)):
                self.hparams[split] = [
                    dataclasses.asdict(s) if dataclasses.is_dataclass(s) else s
                    for s in self.hparams[split]
                ]
        check_settings(
            video_crop=video_crop,
            video_flip=video_flip,
            video_time_masks=video_time_masks,
            video_time_mask_frames=video_time_mask_frames,
            noise_snrs=noise_snrs,
            noise_source=noise_source,
            noise_prob=noise_prob,
            babble_speakers=babble_speakers,
            task=task,
            max_audio_seconds=max_audio_seconds,
            max_text_chars=max_text_chars,
            sampling=sampling,
            max_skip_rate=max_skip_rate,
            skip_rate_min_samples=skip_rate_min_samples,
        )
        self.sampling = sampling
        self.max_skip_rate, self.skip_rate_min_samples = max_skip_rate, skip_rate_min_samples
        self.max_audio_seconds, self.max_text_chars = max_audio_seconds, max_text_chars
        if min_audio_seconds is not None and not min_audio_seconds >= 0:
            raise ValueError(f"data.min_audio_seconds={min_audio_seconds!r} must be >= 0")
        self.min_audio_seconds = min_audio_seconds
        self.specs = {"train": train, "val": val, "test": test, "predict": predict}
        self.max_batch_seconds = max_batch_seconds
        self.max_batch_size = max_batch_size
        if max_batch_tokens is not None and not max_batch_tokens > 0:
            raise ValueError(f"ShardDataModule: max_batch_tokens={max_batch_tokens!r} must be > 0")
        self.max_batch_tokens = max_batch_tokens
        try:
            self.llm_length = LLMLength(llm_tokens_per_second, chars_per_token, llm_prompt_tokens)
        except ValueError as exn:
            raise ValueError(f"ShardDataModule: {exn}") from None
        self.num_workers = num_workers
        if worker_context not in (None, "fork", "spawn", "forkserver"):
            raise ValueError(
                f"data.worker_context={worker_context!r}: fork, spawn, forkserver or null"
            )
        self.shuffle_buffer = shuffle_buffer
        self.bucket_buffer = bucket_buffer
        self.sample_rate = sample_rate
        self.n_mels = n_mels
        self.seed = seed
        self.epoch_size = epoch_size
        self.keep_waveform = keep_waveform
        self.video_crop = video_crop
        self.require_video = require_video
        self.task = task
        self.train_video = VideoTransform(
            train=True,
            crop=video_crop,
            flip_prob=video_flip,
            time_masks=video_time_masks,
            time_mask_frames=video_time_mask_frames,
        )
        self.eval_video = VideoTransform(train=False, crop=video_crop)
        self.noise = (
            None
            if noise_snrs is None
            else NoiseAugment(
                noise_snrs,
                source=noise_source,
                prob=noise_prob,
                babble_speakers=babble_speakers,
                seed=seed,
                sample_rate=sample_rate,
            )
        )
        self.features = WhisperFeatures(n_mels=n_mels, sample_rate=sample_rate)
        # Resolve now so that a wrong path fails before any model is built.
        self.shard_sets: dict[str, ShardSet]
        self.mixes: dict[str, Mixture]
        self.shard_sets, self.mixes = resolve_splits(self.specs)
        # split -> `cache` block of the feature cache it reads (mmalign.data.cache)
        self.feature_mode = features
        self.caches = split_caches(self.shard_sets, features)
        check_cache_settings(
            self.caches,
            noise_snrs=noise_snrs,
            keep_waveform=keep_waveform,
            require_video=require_video,
        )
        self._pipelines: dict[str, ShardPipeline] = {}
        self._start_resume()

    # ---------------------------------------------------------------- Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        """Check that the splits this stage needs were given."""
        for split in _REQUIRED.get(stage or "", ()):
            if split not in self.shard_sets:
                raise ValueError(
                    f"ShardDataModule: stage {stage!r} needs {split} shards; pass {split}="
                )
        if self.trainer is not None and isinstance(self.trainer.accelerator, CPUAccelerator):
            cap_cpu_threads(self.num_workers)

    def train_dataloader(self) -> ShardLoader:
        return self._loader("train")

    def val_dataloader(self) -> ShardLoader | list[Any]:
        return self._loader("val") if "val" in self.shard_sets else []

    def test_dataloader(self) -> ShardLoader:
        return self._loader("test")

    def predict_dataloader(self) -> ShardLoader:
        return self._loader("predict")

    # ---------------------------------------------------------------- public helpers
    def limit_audio_to(
        self, window: float | None, encoder: str = "the encoder", shortest: float | None = None
    ) -> None:
        """Fit ``max_audio_seconds`` to an encoder window (seconds, None: none) and, when unset,
        ``min_audio_seconds`` to ``shortest``; call it before any pipeline is built
        (``AlignmentModule.setup`` does). Unset, longer samples are skipped and counted ("audio
        too long") rather than crashing a step; set longer than the window, it is an error."""
        if self.min_audio_seconds is None and shortest is not None:
            self.min_audio_seconds = float(shortest)
        if window is None:
            return
        if self.max_audio_seconds is None:
            self.max_audio_seconds = float(window)
        elif self.max_audio_seconds > window:
            raise ValueError(
                f"data.max_audio_seconds={self.max_audio_seconds:g} is longer than {encoder}'s "
                f"{window:g} s window, which cannot encode such samples: set it to at most "
                f"{window:g}, or leave it unset to skip and count longer samples"
            )

    def num_samples(self, split: str) -> int | None:
        """Samples in ``split`` according to its index (None when no index covers it)."""
        self._check_split(split)
        return self.shard_sets[split].samples

    def num_seconds(self, split: str) -> float | None:
        """Seconds of audio in ``split`` according to its index."""
        self._check_split(split)
        return self.shard_sets[split].seconds

    @property
    def skipped(self) -> dict[str, int]:
        """Corrupt samples dropped so far, per split read (all epochs, all workers of this rank)."""
        return {split: pipe.counter.total for split, pipe in self._pipelines.items()}

    @property
    def skipped_by_reason(self) -> dict[str, dict[str, int]]:
        """Dropped samples per split and reason (``undecodable video``, ``missing video`` ...)."""
        return {split: pipe.counter.totals_by_reason() for split, pipe in self._pipelines.items()}

    def train_batches_per_worker(self, world_size: int | None = None) -> int | None:
        """Batches each worker yields per training epoch; None means one pass per epoch."""
        shard_set = self.shard_sets.get("train")
        if shard_set is None:
            return None
        if self.sampling == "exact":
            return None
        total = self.epoch_size or shard_set.samples
        if not total:
            return None
        world = world_size or self._world_size()
        per_rank = math.ceil(total / world)
        seconds = None
        if shard_set.samples and shard_set.seconds is not None:
            seconds = shard_set.seconds * per_rank / shard_set.samples
        batches_per_rank = estimate_num_batches(
            per_rank, seconds, self.max_batch_seconds, self.max_batch_size
        )
        return max(1, math.ceil(batches_per_rank / max(1, self.num_workers)))

    def pipeline(self, split: str) -> ShardPipeline:
        """The (cached) batch pipeline of ``split``."""
        self._check_split(split)
        if split not in self._pipelines:
            train = split == "train"
            pipe = build_pipeline(
                self.shard_sets[split].urls,
                features=self.features,
                train=train,
                max_batch_seconds=self.max_batch_seconds,
                max_batch_size=self.max_batch_size,
                max_batch_tokens=self.max_batch_tokens,
                llm_length=self.llm_length,
                shuffle_buffer=self.shuffle_buffer,
                bucket_buffer=self.bucket_buffer,
                seed=self.seed,
                keep_waveform=self.keep_waveform,
                batches_per_worker=self.train_batches_per_worker() if train else None,
                video_transform=self.train_video if train else self.eval_video,
                video_crop=self.video_crop,
                noise=self.noise if train else None,
                require_video=self.require_video,
                task=self.task,
                mix=self.mixes.get(split),
                max_audio_seconds=self.max_audio_seconds,
                max_text_chars=self.max_text_chars,
                min_audio_seconds=self.min_audio_seconds,
                cached=split in self.caches,
                shard_samples=self.shard_sets[split].expected,
            )
            if train:
                self._apply_resume(pipe)
            self._pipelines[split] = pipe
        return self._pipelines[split]

    # ---------------------------------------------------------------- internals
    def _loader(self, split: str) -> ShardLoader:
        return make_loader(
            self.pipeline(split),
            self.num_workers,
            max_skip_rate=None if split == "predict" else self.max_skip_rate,
            min_samples=self.skip_rate_min_samples,
            split=split,
            worker_context=self.hparams.worker_context,
        )

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; expected one of {SPLITS}")
        if split not in self.shard_sets:
            raise ValueError(f"ShardDataModule: no {split} shards were given")

    def _world_size(self) -> int:
        if self.trainer is not None:
            return max(1, int(self.trainer.world_size))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size()
        return max(1, pytorch_worker_info()[1])
