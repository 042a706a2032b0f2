"""Collate decoded speech samples into the batch every model in mmalign consumes.

Batch schema (B batch size, n_mels mel bins, T mel frames at 100 per second, S samples):

=====================  =====================  ==================================================
key                    type / shape           meaning
=====================  =====================  ==================================================
``audio_features``     float32 [B, n_mels, T]  Whisper log-mel; T even (Whisper's stride-2 conv),
                                              rows padded with the log-mel of silence
``audio_lengths``      int64 [B]              valid mel frames per row, ``ceil(samples / 160)``
``audio``              float32 [B, S]         zero-padded 16 kHz waveforms; only with
                                              ``keep_waveform=True`` (WavLM-style encoders)
``audio_sample_lengths``  int64 [B]           valid samples per row; only with ``keep_waveform``
``texts``              list[str] (B)          transcripts (the target text)
``keys``               list[str] (B)          sample keys, unique within a shard set
``task``               list[str] (B)          the sample JSON's ``task``, default ``"asr"``
``durations``          float32 [B]            seconds of audio per row
``meta``               list[dict] (B)         the sample JSON as written by ``prepare``
``skipped``            int                    samples this worker dropped as corrupt since its
                                              previous batch (see ``pipeline.SkipCounter``)
=====================  =====================  ==================================================

Later stages (task prompts, tokenisation) add ``prompt_ids``/``target_ids``; this module only
deals with audio and metadata.
"""

from __future__ import annotations

from typing import Any

import torch

from mmalign.data.features import WhisperFeatures

DEFAULT_TASK = "asr"


def collate(
    samples: list[dict[str, Any]], features: WhisperFeatures, keep_waveform: bool = False
) -> dict[str, Any]:
    """Build a batch (schema in the module docstring) from decoded samples.

    Each sample needs ``audio`` (1-D float tensor at ``features.sample_rate``) and ``text``;
    ``__key__``, ``duration``, ``task`` and ``meta`` are used when present.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    waves = [s["audio"] for s in samples]
    feats, frames = features(waves)
    metas = [dict(s.get("meta") or {}) for s in samples]
    tasks = [
        s.get("task") or m.get("task") or DEFAULT_TASK for s, m in zip(samples, metas, strict=True)
    ]
    durations = [
        float(s.get("duration", w.numel() / features.sample_rate))
        for s, w in zip(samples, waves, strict=True)
    ]
    batch: dict[str, Any] = {
        "audio_features": feats,
        "audio_lengths": frames,
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
    return batch


class Collator:
    """Picklable ``collate`` with its settings bound, for use as a pipeline stage in workers."""

    def __init__(self, features: WhisperFeatures, keep_waveform: bool = False) -> None:
        self.features = features
        self.keep_waveform = keep_waveform

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(samples, self.features, self.keep_waveform)
