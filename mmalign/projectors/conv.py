"""Strided Conv1d downsampling projector (WavLLM-style adapters on fused encoder frames).

A convolution with stride ``rate`` reduces the frame rate while mixing neighbouring frames with
learned weights (unlike stacking, a kernel wider than the stride lets windows overlap); an
activation and a Linear then map to the LLM width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jsonargparse.typing import PositiveInt
from torch import nn
from transformers.activations import ACT2FN

from mmalign.projectors.base import Projector, final_norm, mask_padding
from mmalign.projectors.compress import compressed_lengths


class ConvProjector(Projector):
    """Conv1d(kernel, stride=rate) -> activation -> Linear (-> LayerNorm).

    Output ``j`` covers input frames ``[j * rate, j * rate + kernel_size)``; frames past each row's
    length are zeroed first, so a row gives the same valid outputs however it was padded, and
    ``ceil(length / rate)`` of them.

    Args:
        rate: stride of the convolution (frames per output token).
        kernel_size: width of the convolution; default ``rate`` (non-overlapping windows).
        hidden_dim: channels of the convolution; default ``out_dim``.
        activation: transformers activation name between conv and Linear.
        norm: a final LayerNorm.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rate: PositiveInt = 4,
        kernel_size: int | None = None,
        hidden_dim: int | None = None,
        activation: str = "gelu",
        norm: bool = False,
    ) -> None:
        super().__init__(in_dim, out_dim)
        kernel_size = kernel_size or rate
        if rate < 1:
            raise ValueError(f"ConvProjector.rate must be >= 1, got {rate}")
        if kernel_size < rate:
            raise ValueError(
                f"ConvProjector.kernel_size ({kernel_size}) must be >= rate ({rate}), "
                "or some frames would be skipped"
            )
        if activation not in ACT2FN:
            raise ValueError(f"ConvProjector.activation {activation!r} is unknown; try 'gelu'")
        self.rate = rate
        self.kernel_size = kernel_size
        self.hidden_dim = hidden_dim or out_dim
        self.activation = activation
        self.norm = norm
        self.conv = nn.Conv1d(in_dim, self.hidden_dim, kernel_size, stride=rate)
        self.act = ACT2FN[activation]
        self.proj = nn.Linear(self.hidden_dim, out_dim)
        self.out_norm = final_norm(norm, out_dim)

    def forward(
        self, features: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = mask_padding(features, lengths).to(self.conv.weight.dtype)
        out_frames = -(-x.shape[1] // self.rate)
        needed = (out_frames - 1) * self.rate + self.kernel_size
        x = F.pad(x.transpose(1, 2), (0, needed - x.shape[1]))  # [B, D, needed]
        y = self.act(self.conv(x)).transpose(1, 2)  # [B, ceil(T / rate), hidden]
        y = self.out_norm(self.proj(y))
        lengths = compressed_lengths(lengths, self.rate)
        return mask_padding(y, lengths), lengths

    def init_config(self) -> dict:
        return {
            "rate": self.rate,
            "kernel_size": self.kernel_size,
            "hidden_dim": self.hidden_dim,
            "activation": self.activation,
            "norm": self.norm,
        }
