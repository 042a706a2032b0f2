"""Training-time noise augmentation: mix babble or recorded noise into a batch at random SNRs.

Models trained on clean speech fall apart in noise, and audio-visual models only learn to lean on
the lips when the audio is sometimes unreliable, so AVSR recipes (Auto-AVSR, Llama-AVSR) add
babble or MUSAN noise at SNRs drawn from a small set such as ``[None, 10, 5, 0, -5]``.
:class:`NoiseAugment` works on one batch (the decoded samples after duration batching, before
collate) because babble needs other utterances: each sample's babble is the sum of
``babble_speakers`` *other* utterances of the same batch, each brought to unit RMS and cut or
tiled to the sample's length. A batch of one has no other utterance; that sample stays clean (its
``snr`` is None) and is counted in :attr:`NoiseAugment.stats` under ``"alone"``.
Any other ``source`` is a folder of audio files, one audio file, or prepared shards
(:func:`mmalign.data.noise.build_noise`), loaded lazily in each DataLoader worker.

Mixing is :func:`mmalign.data.noise.mix` (``torchaudio.functional.add_noise``), the same as the
evaluation SNR sweeps, so "10 dB" means the same thing in training and in a report. Every draw
comes from the ``random.Random`` the caller passes (the pipeline seeds it per epoch, rank and
worker), so a run repeats exactly. The drawn SNR is stored in each sample as ``snr`` (None: clean).
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmalign.data.noise import BABBLE, NoiseSource, fit_length, mix

log = logging.getLogger(__name__)

_CLEAN_WORDS = ("clean", "none", "inf", "null")


def parse_snr(value: Any) -> float | None:
    """An SNR in dB as a float, or None for clean (``None``, ``"clean"``, ``"none"``, ``"inf"``)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in _CLEAN_WORDS):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not an SNR")
    try:
        snr = float(value)
    except (TypeError, ValueError) as exn:
        raise ValueError(f"{value!r} is not an SNR in dB (or 'clean')") from exn
    if math.isinf(snr) and snr > 0:
        return None
    if not math.isfinite(snr):
        raise ValueError(f"{value!r} is not a finite SNR in dB")
    return snr


def _unit_rms(wave: torch.Tensor) -> torch.Tensor:
    rms = wave.pow(2).mean().sqrt()
    return wave / rms if rms > 0 else wave


class NoiseAugment:
    """Mix noise into the samples of one batch at SNRs drawn from ``snrs``.

    Args:
        snrs: SNRs in dB to draw from, uniformly; None (or ``"clean"``) draws a clean sample.
        source: ``"babble"`` (other utterances of the batch), a folder of audio files, an audio
            file, or shards (anything :func:`mmalign.data.shardset.resolve_shards` reads).
        prob: Probability that a sample is augmented at all (then an SNR is drawn from ``snrs``).
        babble_speakers: Other utterances summed into one babble (fewer if the batch is smaller).
        seed: Seed of the noise source (clip choice and offsets), mixed with the caller's rng.
        sample_rate: Rate of the waveforms; noise files are resampled to it.
    """

    def __init__(
        self,
        snrs: Sequence[float | str | None],
        source: str = BABBLE,
        prob: float = 1.0,
        babble_speakers: int = 3,
        seed: int = 0,
        sample_rate: int = 16000,
    ) -> None:
        if isinstance(snrs, (str, bytes)) or not isinstance(snrs, Sequence) or not snrs:
            raise ValueError(f"NoiseAugment snrs must be a non-empty list, got {snrs!r}")
        try:
            self.snrs = [parse_snr(s) for s in snrs]
        except ValueError as exn:
            raise ValueError(f"NoiseAugment snrs={list(snrs)!r}: {exn}") from exn
        if isinstance(prob, bool) or not 0.0 <= float(prob) <= 1.0:
            raise ValueError(f"NoiseAugment prob must be in [0, 1], got {prob!r}")
        if isinstance(babble_speakers, bool) or int(babble_speakers) != babble_speakers:
            raise ValueError(
                f"NoiseAugment babble_speakers must be an int, got {babble_speakers!r}"
            )
        if babble_speakers < 1:
            raise ValueError(f"NoiseAugment babble_speakers must be >= 1, got {babble_speakers}")
        if not isinstance(source, str) or not source:
            raise ValueError(f"NoiseAugment source must be 'babble' or a path, got {source!r}")
        if source != BABBLE and not Path(source).expanduser().exists():
            raise FileNotFoundError(
                f"NoiseAugment source {source!r}: no such file or folder (or use 'babble')"
            )
        self.source = source
        self.prob = float(prob)
        self.babble_speakers = int(babble_speakers)
        self.seed = int(seed)
        self.sample_rate = int(sample_rate)
        self.stats: Counter[str] = Counter()
        """This process's tally: ``noisy``, ``clean`` (drawn), ``alone`` (batch of one, babble),
        ``silent`` (the noise had no energy), ``failed`` (a noise file could not be read, logged).
        DataLoader workers keep their own."""
        self._clips: NoiseSource | None = None

    @property
    def enabled(self) -> bool:
        """False when no draw can add noise (every SNR clean, or ``prob`` 0)."""
        return self.prob > 0 and any(s is not None for s in self.snrs)

    def _clip_source(self) -> NoiseSource:
        if self._clips is None:  # built in the worker that uses it (files are read lazily)
            from mmalign.data.noise import build_noise

            self._clips = build_noise(self.source, [], seed=self.seed, sample_rate=self.sample_rate)
        return self._clips

    def _babble(
        self, waves: list[torch.Tensor], index: int, n: int, rng: np.random.Generator
    ) -> torch.Tensor | None:
        others = [j for j in range(len(waves)) if j != index and waves[j].numel() > 0]
        if not others:
            return None
        picks = rng.choice(others, size=min(self.babble_speakers, len(others)), replace=False)
        noise = torch.zeros(n, dtype=torch.float32)
        for j in picks:
            noise += _unit_rms(fit_length(waves[int(j)].to(torch.float32), n, rng))
        return noise

    def __call__(self, samples: list[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
        """New sample dicts with noisy ``audio`` and the drawn ``snr`` (None: left clean); the
        input samples are not modified. Babble is always made from the clean waveforms."""
        waves = [s["audio"] for s in samples]
        out: list[dict[str, Any]] = []
        for i, sample in enumerate(samples):
            snr = self.snrs[rng.randrange(len(self.snrs))] if rng.random() < self.prob else None
            draw = rng.getrandbits(63)  # drawn for every sample: later draws never shift
            wave = waves[i]
            if snr is None or wave.numel() == 0:
                self.stats["clean"] += 1
                out.append({**sample, "snr": None})
                continue
            if self.source == BABBLE:
                gen = np.random.default_rng([self.seed, draw])
                noise = self._babble(waves, i, wave.numel(), gen)
                if noise is None:
                    self.stats["alone"] += 1
                    out.append({**sample, "snr": None})
                    continue
            else:
                key = f"{sample.get('__key__', i)}#{draw}"
                try:
                    noise = self._clip_source().noise_for(key, i, wave.numel())
                except (OSError, ValueError) as exn:  # e.g. an unreadable or silent noise file
                    log.warning(
                        "noise source %s failed, sample %r left clean: %s",
                        self.source,
                        sample.get("__key__"),
                        exn,
                    )
                    self.stats["failed"] += 1
                    out.append({**sample, "snr": None})
                    continue
            if float(noise.pow(2).sum()) == 0.0:
                self.stats["silent"] += 1
                out.append({**sample, "snr": None})
                continue
            self.stats["noisy"] += 1
            out.append({**sample, "audio": mix(wave, noise, snr), "snr": float(snr)})
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_clips"] = None  # rebuilt lazily in each worker (holds caches and file lists)
        return state

    def __repr__(self) -> str:
        return (
            f"NoiseAugment(snrs={self.snrs}, source={self.source!r}, prob={self.prob}, "
            f"babble_speakers={self.babble_speakers}, seed={self.seed})"
        )
