"""Collate decoded speech (and lip video) samples into the batch every model in mmalign consumes.

Batch schema (B batch size, n_mels mel bins, T mel frames at 100 per second, S samples,
Tv video frames, H x W the video crop):

=====================  =====================  ==================================================
key                    type / shape           meaning
=====================  =====================  ==================================================
``audio_features``     float32 [B, n_mels, T]  Whisper log-mel; T even (Whisper's stride-2 conv),
                                              rows padded with the log-mel of silence
``audio_lengths``      int64 [B]              valid mel frames per row, ``ceil(samples / 160)``
``audio``              float32 [B, S]         zero-padded 16 kHz waveforms; only with
                                              ``keep_waveform=True`` (WavLM-style encoders)
``audio_sample_lengths``  int64 [B]           valid samples per row; only with ``keep_waveform``
``encoder_features``   float32 [B, T', D]     stored encoder output of a feature cache
                                              (``mmalign cache-features``), zero-padded in time;
                                              replaces ``audio_features``/``audio_lengths``, and
                                              the model skips its (audio) encoder
``encoder_lengths``    int64 [B]              valid encoder frames per row; with the above
``texts``              list[str] (B)          transcripts (the target text)
``keys``               list[str] (B)          sample keys, unique within a shard set
``task``               list[str] (B)          the sample JSON's ``task``, default ``"asr"``
``durations``          float32 [B]            seconds of audio per row
``meta``               list[dict] (B)         the sample JSON as written by ``prepare``
``skipped``            int                    samples this worker dropped as corrupt since its
                                              previous batch (see ``skips.SkipCounter``)
``video``              uint8 [B, Tv, 1, H, W]  grayscale lip frames, zero-padded in time; only
                                              when the samples carry video (all or none)
``video_lengths``      int64 [B]              valid video frames per row
``video_fps``          float32 [B]            frame rate of each row's video
``snr``                float32 [B]            SNR (dB) of the training noise mixed into each row,
                                              NaN when clean; only after ``NoiseAugment``
=====================  =====================  ==================================================

Video clips larger than ``video_crop`` (88 by default, the Auto-AVSR view of 96 x 96 mouth crops)
are centre-cropped here, so evaluation and inference code that collates decoded samples itself
sees what training saw after its random crop; all clips of a batch must then have one size.
Audio of a sample with video has already been cut or padded to whole video frames
(:func:`mmalign.data.video.align_audio`), so ``durations`` and ``video_lengths / video_fps``
agree to within a sample.

Later stages (task prompts, tokenisation) add ``prompt_ids``/``target_ids``; this module only
deals with audio, video and metadata.
"""

from __future__ import annotations

from typing import Any

import torch

from mmalign.data.features import WhisperFeatures
from mmalign.data.video import DEFAULT_VIDEO_FPS

DEFAULT_TASK = "asr"
DEFAULT_VIDEO_CROP = 88


def _crop_to(frames: torch.Tensor, size: int | None) -> torch.Tensor:
    """Centre-crop each spatial side of ``[T, H, W]`` that is larger than ``size``."""
    if size is None:
        return frames
    height, width = int(frames.shape[-2]), int(frames.shape[-1])
    top, left = max(0, (height - size) // 2), max(0, (width - size) // 2)
    return frames[:, top : top + min(height, size), left : left + min(width, size)]


def collate_video(
    samples: list[dict[str, Any]], video_crop: int | None = DEFAULT_VIDEO_CROP
) -> dict[str, torch.Tensor]:
    """``video``, ``video_lengths`` and ``video_fps`` of a batch (see the schema), or an empty
    dict when no sample has video. Raises ValueError naming keys and sizes when only some
    samples have video or the (cropped) frame sizes differ."""
    if video_crop is not None and video_crop < 1:
        raise ValueError(f"collate: video_crop must be a positive int or None, got {video_crop}")
    has = [s.get("video") is not None for s in samples]
    if not any(has):
        return {}
    keys = [str(s.get("__key__", i)) for i, s in enumerate(samples)]
    if not all(has):
        missing = [k for k, h in zip(keys, has, strict=True) if not h]
        raise ValueError(
            f"collate: {len(missing)} of {len(samples)} samples have no video ({missing[:3]}); "
            "a batch is all video or none (require_video=True drops the others)"
        )
    clips = []
    for key, sample in zip(keys, samples, strict=True):
        frames = sample["video"]
        if frames.dim() != 3 or frames.dtype != torch.uint8:
            raise ValueError(
                f"collate: video of {key} must be uint8 [T, H, W], got "
                f"{frames.dtype} {tuple(frames.shape)}"
            )
        clips.append(_crop_to(frames, video_crop))
    sizes = {tuple(c.shape[1:]) for c in clips}
    if len(sizes) > 1:
        by_key = {k: f"{c.shape[2]}x{c.shape[1]}" for k, c in zip(keys, clips, strict=True)}
        raise ValueError(
            f"collate: video frame sizes differ after video_crop={video_crop}: {by_key}"
        )
    lengths = torch.tensor([c.shape[0] for c in clips], dtype=torch.long)
    (height, width) = sizes.pop()
    video = torch.zeros(len(clips), int(lengths.max()), 1, height, width, dtype=torch.uint8)
    for row, clip in enumerate(clips):
        video[row, : clip.shape[0], 0] = clip
    fps = [float(s.get("video_fps") or DEFAULT_VIDEO_FPS) for s in samples]
    return {
        "video": video,
        "video_lengths": lengths,
        "video_fps": torch.tensor(fps, dtype=torch.float32),
    }


def collate_encoder_features(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """``encoder_features`` (float32, zero-padded) and ``encoder_lengths`` of samples read from a
    feature cache (each ``encoder_features [T', D]`` as stored, e.g. float16)."""
    feats = [s["encoder_features"] for s in samples]
    dims = {int(f.shape[-1]) for f in feats}
    if len(dims) > 1 or any(f.dim() != 2 for f in feats):
        raise ValueError(f"collate: cached encoder features of one batch differ in width {dims}")
    lengths = torch.tensor([int(f.shape[0]) for f in feats], dtype=torch.long)
    out = torch.zeros(len(feats), int(lengths.max()), dims.pop(), dtype=torch.float32)
    for row, f in enumerate(feats):
        out[row, : f.shape[0]] = f.to(torch.float32)
    return {"encoder_features": out, "encoder_lengths": lengths}


def collate(
    samples: list[dict[str, Any]],
    features: WhisperFeatures,
    keep_waveform: bool = False,
    *,
    video_crop: int | None = DEFAULT_VIDEO_CROP,
) -> dict[str, Any]:
    """Build a batch (schema in the module docstring) from decoded samples.

    Each sample needs ``audio`` (1-D float tensor at ``features.sample_rate``), or
    ``encoder_features`` ``[T', D]`` and ``duration`` when read from a feature cache, and ``text``;
    ``__key__``, ``duration``, ``task``, ``meta``, ``video`` (uint8 ``[T, H, W]``),
    ``video_fps`` and ``snr`` are used when present. ``video_crop`` centre-crops larger clips
    (None: no crop, clips must share a size).
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    video = collate_video(samples, video_crop)
    cached = ["encoder_features" in s for s in samples]
    if any(cached):  # a feature cache: stored encoder output instead of audio
        if not all(cached) or keep_waveform:
            raise ValueError(
                "collate: a batch is all cached encoder features or all audio, and cached "
                "samples have no waveform for keep_waveform"
            )
        waves = [torch.zeros(0)] * len(samples)  # durations come from the samples
        audio = collate_encoder_features(samples)
    else:
        waves = [s["audio"] for s in samples]
        feats, frames = features(waves)
        audio = {"audio_features": feats, "audio_lengths": frames}
    metas = [dict(s.get("meta") or {}) for s in samples]
    tasks = [
        s.get("task") or m.get("task") or DEFAULT_TASK for s, m in zip(samples, metas, strict=True)
    ]
    durations = [
        float(s.get("duration", w.numel() / features.sample_rate))
        for s, w in zip(samples, waves, strict=True)
    ]
    batch: dict[str, Any] = {
        **audio,
        "texts": [str(s["text"]) for s in samples],
        "keys": [str(s.get("__key__", i)) for i, s in enumerate(samples)],
        "task": [str(t) for t in tasks],
        "durations": torch.tensor(durations, dtype=torch.float32),
        "meta": metas,
        "skipped": 0,
    }
    if keep_waveform:
        lengths = torch.tensor([w.numel() for w in waves], dtype=torch.long)
        audio = torch.zeros(len(waves), int(lengths.max()), dtype=torch.float32)
        for row, wave in enumerate(waves):
            audio[row, : wave.numel()] = wave.to(torch.float32)
        batch["audio"] = audio
        batch["audio_sample_lengths"] = lengths
    batch.update(video)
    if any("snr" in s for s in samples):
        snrs = [s.get("snr") for s in samples]
        batch["snr"] = torch.tensor(
            [float("nan") if v is None else float(v) for v in snrs], dtype=torch.float32
        )
    return batch


class Collator:
    """Picklable ``collate`` with its settings bound, for use as a pipeline stage in workers."""

    def __init__(
        self,
        features: WhisperFeatures,
        keep_waveform: bool = False,
        video_crop: int | None = DEFAULT_VIDEO_CROP,
    ) -> None:
        self.features = features
        self.keep_waveform = keep_waveform
        self.video_crop = video_crop

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(samples, self.features, self.keep_waveform, video_crop=self.video_crop)
