"""Training noise augmentation: requested SNR, clean stays clean, seeds, sources, validation."""

from __future__ import annotations

import random

import numpy as np
import pytest
import soundfile as sf
import torch

from mmalign.data.augment import NoiseAugment, parse_snr

RATE = 16000


def batch(n: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {"__key__": f"u{i}", "audio": 0.1 * torch.randn(4000 + 1500 * i, generator=g), "text": "x"}
        for i in range(n)
    ]


def measured_snr(clean: torch.Tensor, noisy: torch.Tensor) -> float:
    added = noisy - clean
    return float(10 * torch.log10(clean.pow(2).sum() / added.pow(2).sum()))


@pytest.mark.parametrize("snr", [10.0, 0.0, -5.0])
def test_babble_hits_the_requested_snr(snr) -> None:
    samples = batch()
    out = NoiseAugment([snr], babble_speakers=2)(samples, random.Random(0))
    for before, after in zip(samples, out, strict=True):
        assert after["snr"] == snr and after["audio"].shape == before["audio"].shape
        assert measured_snr(before["audio"], after["audio"]) == pytest.approx(snr, abs=0.1)
    assert all(torch.equal(s["audio"], b["audio"]) for s, b in zip(samples, batch(), strict=True))


def test_folder_source_hits_the_requested_snr(tmp_path) -> None:
    folder = tmp_path / "noise"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        sf.write(folder / f"n{i}.wav", (0.05 * rng.standard_normal(3000)).astype(np.float32), RATE)
    aug = NoiseAugment([5.0, None], source=str(folder), seed=2)
    samples = batch()
    out = aug(samples, random.Random(4))
    assert {o["snr"] for o in out} == {5.0, None}  # both drawn with this seed
    for before, after in zip(samples, out, strict=True):
        if after["snr"] is None:
            assert torch.equal(after["audio"], before["audio"])
        else:
            assert measured_snr(before["audio"], after["audio"]) == pytest.approx(5.0, abs=0.1)


def test_clean_is_bit_identical_and_draws_are_seeded() -> None:
    samples = batch()
    for aug in (NoiseAugment([None, "clean"]), NoiseAugment([0.0], prob=0.0)):
        out = aug(samples, random.Random(0))
        assert all(o["snr"] is None for o in out)
        assert all(torch.equal(o["audio"], s["audio"]) for o, s in zip(out, samples, strict=True))
        assert not aug.enabled

    aug = NoiseAugment([None, 0.0, 10.0, 20.0], prob=0.8)
    first = aug(samples, random.Random(7))
    again = aug(samples, random.Random(7))
    other = aug(samples, random.Random(8))
    assert [o["snr"] for o in first] == [o["snr"] for o in again]
    assert all(torch.equal(a["audio"], b["audio"]) for a, b in zip(first, again, strict=True))
    assert [o["snr"] for o in first] != [o["snr"] for o in other] or any(
        not torch.equal(a["audio"], b["audio"]) for a, b in zip(first, other, strict=True)
    )


def test_batch_of_one_stays_clean_and_is_counted() -> None:
    aug = NoiseAugment([5.0])
    (solo,) = batch(1)
    (out,) = aug([solo], random.Random(0))
    assert out["snr"] is None and torch.equal(out["audio"], solo["audio"])
    assert aug.stats["alone"] == 1


def test_settings_are_validated() -> None:
    assert parse_snr("clean") is None and parse_snr("inf") is None and parse_snr(3) == 3.0
    with pytest.raises(ValueError, match="snrs"):
        NoiseAugment([])
    with pytest.raises(ValueError, match="snrs"):
        NoiseAugment([5.0, "loud"])
    with pytest.raises(ValueError, match="prob"):
        NoiseAugment([5.0], prob=1.5)
    with pytest.raises(ValueError, match="babble_speakers"):
        NoiseAugment([5.0], babble_speakers=0)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        NoiseAugment([5.0], source="/nowhere/noise")


def test_babble_is_made_of_the_other_utterances() -> None:
    t = torch.arange(8000) / RATE
    freqs = (300.0, 1000.0, 2200.0)
    tones = [0.1 * torch.sin(2 * torch.pi * f * t) for f in freqs]
    samples = [{"__key__": f"t{i}", "audio": w, "text": "x"} for i, w in enumerate(tones)]
    aug = NoiseAugment([0.0], babble_speakers=1)
    for seed in range(6):
        out = aug(samples, random.Random(seed))
        for i, own_hz in enumerate(freqs):
            added = out[i]["audio"] - tones[i]
            peak_hz = int(torch.fft.rfft(added).abs().argmax()) * RATE / added.numel()
            assert abs(peak_hz - own_hz) > 100  # never the utterance itself
            assert min(abs(peak_hz - f) for f in freqs) < 4  # one of the others
