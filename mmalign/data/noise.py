"""Noise for SNR sweeps and training augmentation: where it comes from and how it is mixed in.

Sources (``--noise``):

* ``babble``: the sum of ``speakers`` other utterances of the evaluation set itself, each brought
  to the same RMS first, the usual stand-in for a room of talkers;
* a folder of audio files (e.g. MUSAN noise), read lazily with :func:`read_audio`;
* shards made by ``mmalign prepare`` (folder with ``index.json``, ``.tar``, glob), read at once.

For every utterance the noise is cut (or tiled) to its length at a random offset, the generator
seeded by ``seed`` and a checksum of the utterance key. So a run repeats exactly, and an
utterance gets the same noise at every SNR and every compression rate: the sweep varies only the
level. Mixing is ``torchaudio.functional.add_noise``, which scales the noise so that the energy
ratio over the utterance is the requested SNR.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchaudio.functional as AF

from mmalign.data.media import find_audio, read_audio
from mmalign.data.reading import read_shard_samples

BABBLE = "babble"


def _rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(key.encode("utf-8"))])


def fit_length(noise: torch.Tensor, num_samples: int, rng: np.random.Generator) -> torch.Tensor:
    """``num_samples`` of ``noise`` from a random offset, wrapping around (tiling) as needed."""
    if noise.numel() == 0:
        raise ValueError("noise clip is empty")
    offset = int(rng.integers(0, noise.numel()))
    reps = -(-(offset + num_samples) // noise.numel())
    return noise.repeat(reps)[offset : offset + num_samples]


def _rms_normalised(wave: torch.Tensor) -> torch.Tensor:
    rms = wave.pow(2).mean().sqrt()
    return wave / rms if rms > 0 else wave


class NoiseSource:
    """Noise for an utterance: ``noise_for(key, index, num_samples) -> Tensor [num_samples]``."""

    seed: int = 0

    def noise_for(self, key: str, index: int, num_samples: int) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError


class BabbleNoise(NoiseSource):
    """Sum of ``speakers`` other utterances from ``waves`` (never the utterance itself)."""

    def __init__(self, waves: Sequence[torch.Tensor], speakers: int = 3, seed: int = 0) -> None:
        if speakers < 1:
            raise ValueError(f"babble needs at least one speaker, got {speakers}")
        if len(waves) < 2:
            raise ValueError("babble noise needs at least 2 utterances in the evaluation set")
        self.waves = list(waves)
        self.speakers = speakers
        self.seed = seed

    def noise_for(self, key: str, index: int, num_samples: int) -> torch.Tensor:
        rng = _rng(self.seed, key)
        others = [i for i in range(len(self.waves)) if i != index]
        picks = rng.choice(others, size=min(self.speakers, len(others)), replace=False)
        noise = torch.zeros(num_samples)
        for i in picks:
            noise += _rms_normalised(fit_length(self.waves[int(i)], num_samples, rng))
        return noise

    def describe(self) -> dict[str, Any]:
        return {"source": BABBLE, "speakers": self.speakers, "seed": self.seed}


class ClipNoise(NoiseSource):
    """One clip per utterance, drawn from a list of files (read lazily) or waveforms."""

    def __init__(
        self,
        clips: Sequence[Path | torch.Tensor],
        spec: str,
        seed: int = 0,
        sample_rate: int = 16000,
    ) -> None:
        if not clips:
            raise ValueError(f"noise source {spec} holds no audio")
        self.clips = list(clips)
        self.spec = spec
        self.seed = seed
        self.sample_rate = sample_rate
        self._load = lru_cache(maxsize=64)(self._read)

    def _read(self, i: int) -> torch.Tensor:
        clip = self.clips[i]
        wave = clip if isinstance(clip, torch.Tensor) else read_audio(clip, self.sample_rate)
        if float(wave.pow(2).sum()) == 0.0:
            raise ValueError(f"noise clip {i} of {self.spec} is silent; SNR is undefined")
        return wave

    def noise_for(self, key: str, index: int, num_samples: int) -> torch.Tensor:
        rng = _rng(self.seed, key)
        return fit_length(self._load(int(rng.integers(0, len(self.clips)))), num_samples, rng)

    def describe(self) -> dict[str, Any]:
        return {"source": self.spec, "clips": len(self.clips), "seed": self.seed}


def build_noise(
    spec: str,
    waves: Sequence[torch.Tensor],
    speakers: int = 3,
    seed: int = 0,
    sample_rate: int = 16000,
) -> NoiseSource:
    """``babble`` (from ``waves``, the evaluation set), a folder of audio files, an audio file,
    or shards (anything :func:`mmalign.data.shardset.resolve_shards` accepts)."""
    if spec == BABBLE:
        return BabbleNoise(waves, speakers, seed)
    path = Path(spec).expanduser()
    is_shards = path.is_dir() and ((path / "index.json").is_file() or any(path.glob("*.tar")))
    if path.is_dir() and not is_shards:
        files = find_audio(path)
        if not files:
            raise FileNotFoundError(f"noise folder {path} holds no audio files")
        return ClipNoise(files, str(path), seed, sample_rate)
    if path.is_file() and path.suffix not in (".tar", ".json"):
        return ClipNoise([path], str(path), seed, sample_rate)
    samples, _ = read_shard_samples(spec, sample_rate)
    return ClipNoise([s["audio"] for s in samples], spec, seed, sample_rate)


def mix(wave: torch.Tensor, noise: torch.Tensor, snr_db: float) -> torch.Tensor:
    """``wave`` plus ``noise`` scaled to ``snr_db`` dB (``torchaudio.functional.add_noise``)."""
    if float(noise.pow(2).sum()) == 0.0:
        return wave.clone()  # nothing to add (e.g. babble of silent clips)
    snr = torch.tensor([float(snr_db)])
    return AF.add_noise(wave[None].float(), noise[None].float(), snr)[0]
