"""Whisper log-mel features for variable-length batches.

Whisper's own feature extractor pads every input to 30 s. Speech LLM front ends run the encoder on
the batch's real length instead (the encoder's positional table is cropped, see ASSETS.md), so
:class:`WhisperFeatures` pads only to the longest waveform in the batch and reports how many mel
frames of each row are real. The log-mel itself comes from transformers'
``WhisperFeatureExtractor``, so the numbers match what a pretrained Whisper saw in training.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from transformers import WhisperFeatureExtractor

HOP_LENGTH = 160
"""Samples between mel frames at 16 kHz: 100 frames per second."""


class WhisperFeatures:
    """Batch log-mel extractor: waveforms in, ``(features [B, n_mels, T], lengths [B])`` out.

    ``T`` is the longest waveform's frame count rounded up to an even number, because Whisper's
    second convolution has stride 2. ``lengths`` counts the valid frames of each row,
    ``ceil(num_samples / 160)``; the rest is the log-mel of zero padding, as in Whisper.
    """

    def __init__(self, n_mels: int = 80, sample_rate: int = 16000) -> None:
        self.n_mels = n_mels
        self.sample_rate = sample_rate
        self.hop_length = HOP_LENGTH
        # Built from keyword arguments: no hub download; these are Whisper's own settings.
        self.extractor = WhisperFeatureExtractor(
            feature_size=n_mels,
            sampling_rate=sample_rate,
            hop_length=HOP_LENGTH,
            chunk_length=30,
            n_fft=400,
        )

    @property
    def frame_rate(self) -> float:
        """Mel frames per second (100 at 16 kHz)."""
        return self.sample_rate / self.hop_length

    def num_frames(self, num_samples: int) -> int:
        """Valid mel frames for a waveform of ``num_samples`` samples."""
        return math.ceil(num_samples / self.hop_length)

    def __call__(self, waveforms: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Compute log-mel features of a batch of 1-D float waveforms at ``sample_rate``."""
        if len(waveforms) == 0:
            raise ValueError("WhisperFeatures needs at least one waveform")
        lengths = [int(w.shape[-1]) for w in waveforms]
        frames = max(1, self.num_frames(max(lengths)))
        frames += frames % 2  # even T for the stride-2 convolution
        padded = np.zeros((len(waveforms), frames * self.hop_length), dtype=np.float32)
        for row, (wave, n) in enumerate(zip(waveforms, lengths, strict=True)):
            if wave.dim() != 1:
                raise ValueError(f"expected 1-D waveforms, got shape {tuple(wave.shape)}")
            padded[row, :n] = wave.detach().to("cpu", torch.float32).numpy()
        # Every row already has the same length, so "longest" adds nothing and no 30 s padding
        # happens; the extractor's STFT drops the last frame, leaving exactly `frames` frames.
        out = self.extractor(
            list(padded),
            sampling_rate=self.sample_rate,
            padding="longest",
            truncation=False,
            return_tensors="pt",
        )
        features = out["input_features"].to(torch.float32)
        assert features.shape[-1] == frames, (features.shape, frames)
        valid = torch.tensor([self.num_frames(n) for n in lengths], dtype=torch.long)
        return features, valid
