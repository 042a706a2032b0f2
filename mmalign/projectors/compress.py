"""Reduce encoder frames by an integer rate, so the LLM reads fewer, wider tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = ("stack", "avgpool")


def compressed_lengths(lengths: torch.Tensor, rate: int) -> torch.Tensor:
    """Frames left after compression; a partial last group still makes a frame."""
    return torch.div(lengths + rate - 1, rate, rounding_mode="floor")


def compress(
    x: torch.Tensor, lengths: torch.Tensor, rate: int, mode: str = "stack"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress ``x [B, T, D]`` by ``rate``.

    ``stack`` concatenates ``rate`` neighbours into the channel axis (``[B, ceil(T/r), D*r]``,
    as in SLAM-LLM); ``avgpool`` averages them (``[B, ceil(T/r), D]``, as in Llama-AVSR).
    Frames beyond each sample's length are zeroed first so padding never leaks into a group,
    and average pooling divides by the number of valid frames in the group.
    """
    if mode not in MODES:
        raise ValueError(f"compression mode {mode!r} is not one of {MODES}")
    if rate < 1:
        raise ValueError(f"compression rate must be >= 1, got {rate}")
    b, t, d = x.shape
    valid = torch.arange(t, device=x.device)[None, :] < lengths[:, None]
    x = x * valid[..., None].to(x.dtype)
    new_lengths = compressed_lengths(lengths, rate)
    if rate == 1:
        return x, new_lengths
    pad = (-t) % rate
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
        valid = F.pad(valid, (0, pad))
    groups = x.shape[1] // rate
    if mode == "stack":
        return x.reshape(b, groups, rate * d), new_lengths
    counts = valid.reshape(b, groups, rate).sum(-1, keepdim=True).clamp(min=1).to(x.dtype)
    return x.reshape(b, groups, rate, d).sum(2) / counts, new_lengths


def output_dim(in_dim: int, rate: int, mode: str) -> int:
    """Channel width after :func:`compress`."""
    return in_dim * rate if mode == "stack" else in_dim
