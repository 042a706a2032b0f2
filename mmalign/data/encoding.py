"""The members of a shard sample: FLAC audio, ``.npy`` lip frames, and keys webdataset can split."""

from __future__ import annotations

import io
import re

import numpy as np
import soundfile as sf
import torch


def sanitize_key(key: str) -> str:
    """Make ``key`` safe as a webdataset key: webdataset splits member names at the first dot, so
    dots, slashes and anything unusual become ``_``."""
    clean = re.sub(r"[^A-Za-z0-9_-]+", "_", key).strip("_")
    return clean or "sample"


def encode_flac(wave: torch.Tensor, sample_rate: int) -> bytes:
    """16-bit FLAC bytes of a mono waveform (values beyond ±1, e.g. resampling overshoot, clip)."""
    buf = io.BytesIO()
    data = np.clip(wave.numpy(), -1.0, 1.0)
    sf.write(buf, data, sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def encode_npy(frames: np.ndarray) -> bytes:
    """``.npy`` bytes of an array (read back with ``np.load(..., allow_pickle=False)``)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(frames), allow_pickle=False)
    return buf.getvalue()
