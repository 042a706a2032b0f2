"""Test-time noise: reproducible draws, the requested SNR, every kind of source."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from mmalign.data.noise import BabbleNoise, ClipNoise, build_noise, fit_length, mix


def waves(n: int = 4, seconds: float = 0.5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(int(16000 * seconds * (1 + i / 4)), generator=g) * 0.1 for i in range(n)]


def test_mix_reaches_the_requested_snr():
    clean, noise = waves(2)
    noise = fit_length(noise, clean.numel(), np.random.default_rng(0))
    for snr in (20.0, 5.0, 0.0, -5.0):
        added = mix(clean, noise, snr) - clean
        measured = 10 * torch.log10(clean.pow(2).sum() / added.pow(2).sum())
        assert float(measured) == pytest.approx(snr, abs=1e-3)


def test_babble_is_seeded_per_utterance_and_never_the_utterance_itself():
    ws = waves(4)
    babble = BabbleNoise(ws, speakers=3, seed=1)
    a = babble.noise_for("utt-a", 0, 8000)
    assert torch.equal(a, BabbleNoise(ws, speakers=3, seed=1).noise_for("utt-a", 0, 8000))
    assert not torch.equal(a, babble.noise_for("utt-b", 0, 8000))
    assert not torch.equal(a, BabbleNoise(ws, speakers=3, seed=2).noise_for("utt-a", 0, 8000))
    assert a.shape == (8000,)
    solo = BabbleNoise([torch.zeros(100), torch.ones(100)], speakers=3)
    assert torch.equal(solo.noise_for("x", 0, 50), torch.ones(50))  # only the other utterance
    with pytest.raises(ValueError, match="at least 2"):
        BabbleNoise(ws[:1])


def test_fit_length_tiles_short_noise():
    out = fit_length(torch.arange(3.0), 10, np.random.default_rng(0))
    assert out.shape == (10,) and set(out.tolist()) == {0.0, 1.0, 2.0}


def test_folder_file_and_shard_sources(tmp_path, tone_shards):
    folder = tmp_path / "noise"
    folder.mkdir()
    for i, w in enumerate(waves(2)):
        sf.write(folder / f"n{i}.wav", w.numpy(), 16000)
    src = build_noise(str(folder), [], seed=3)
    assert isinstance(src, ClipNoise) and src.describe()["clips"] == 2
    again = ClipNoise(src.clips, str(folder), seed=3)
    assert torch.equal(src.noise_for("k", 0, 4000), again.noise_for("k", 0, 4000))
    single = build_noise(str(folder / "n0.wav"), [])
    assert single.noise_for("k", 0, 100).shape == (100,)
    shards = build_noise(str(tone_shards), [])
    assert shards.describe()["clips"] == 12
    with pytest.raises(FileNotFoundError):
        build_noise(str(tmp_path / "empty-does-not-exist"), [])
