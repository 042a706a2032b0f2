"""WhisperFeatures: shapes, valid lengths, even T, agreement with Whisper's 30 s path."""

from __future__ import annotations

import math

import pytest
import torch

from mmalign.data.features import WhisperFeatures


def sine(n: int, freq: float = 440.0) -> torch.Tensor:
    t = torch.arange(n, dtype=torch.float32) / 16000
    return 0.3 * torch.sin(2 * math.pi * freq * t)


def test_shapes_lengths_and_even_frames() -> None:
    feats = WhisperFeatures()
    lengths = [16000, 12345, 161]
    x, valid = feats([sine(n) for n in lengths])
    assert x.dtype == torch.float32 and valid.dtype == torch.long
    assert x.shape == (3, 80, 100)
    assert valid.tolist() == [100, 78, 2]  # ceil(n / 160)
    assert feats.frame_rate == 100


@pytest.mark.parametrize(("n", "frames"), [(1, 2), (160, 2), (320, 2), (321, 4), (480, 4)])
def test_frames_rounded_up_to_even(n: int, frames: int) -> None:
    x, valid = WhisperFeatures()([sine(n)])
    assert x.shape[-1] == frames and valid.item() == math.ceil(n / 160)


def test_matches_whisper_default_path_on_30_seconds() -> None:
    feats = WhisperFeatures()
    wave = 0.1 * torch.randn(480000, generator=torch.Generator().manual_seed(0))
    ours, valid = feats([wave])
    reference = feats.extractor(wave.numpy(), sampling_rate=16000, return_tensors="pt")
    assert ours.shape == (1, 80, 3000) and valid.item() == 3000
    torch.testing.assert_close(ours, reference["input_features"].float(), atol=1e-5, rtol=0)


def test_padding_leaves_valid_frames_alone() -> None:
    feats = WhisperFeatures()
    short = sine(8000, 300.0)
    alone, n = feats([short])
    batched, _ = feats([short, sine(32000, 500.0)])
    keep = n.item() - 2  # the last frames' windows reach into the padding
    torch.testing.assert_close(batched[0, :, :keep], alone[0, :, :keep], atol=1e-4, rtol=0)


def test_128_mels() -> None:
    x, _ = WhisperFeatures(n_mels=128)([sine(3200)])
    assert x.shape == (1, 128, 20)
