"""Ultravox's projector: stack frames, RMSNorm, Linear, SwiGLU, Linear, RMSNorm.

Ultravox (fixie-ai) stacks ``stack_factor`` = 8 Whisper frames (6.25 tokens per second), normalises
the stacked vector with an RMSNorm whose weight starts at 0.4, widens it with a bias-free Linear,
halves it with a SwiGLU gate and maps it to the LLM width with a second bias-free Linear and a
final RMSNorm (also starting at 0.4) so the audio tokens arrive at the scale of text embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jsonargparse.typing import PositiveInt
from torch import nn

from mmalign.projectors.base import Projector, mask_padding
from mmalign.projectors.compress import compress


class SwiGLU(nn.Module):
    """``silu(gate) * x`` with ``x, gate`` the two halves of the last axis (halves the width)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * x


def rms_norm(dim: int, init: float, eps: float) -> nn.RMSNorm:
    norm = nn.RMSNorm(dim, eps=eps)
    nn.init.constant_(norm.weight, init)
    return norm


class SwiGLUProjector(Projector):
    """Frame stacking + RMSNorm + SwiGLU MLP (Ultravox's ``StackAudioFrames`` + projector).

    Args:
        rate: frames stacked into one token (Ultravox's ``stack_factor``; 8 = 6.25 tokens/s
            from a 50 Hz encoder).
        hidden_dim: width of the first Linear; SwiGLU halves it (must be even).
        norm_init: initial weight of both RMSNorms (Ultravox: 0.4).
        post_norm: the final RMSNorm on the output (Ultravox's ``ln_post``).
        eps: RMSNorm epsilon.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rate: PositiveInt = 8,
        hidden_dim: int = 4096,
        norm_init: float = 0.4,
        post_norm: bool = True,
        eps: float = 1e-6,
    ) -> None:
        super().__init__(in_dim, out_dim)
        if rate < 1:
            raise ValueError(f"SwiGLUProjector.rate must be >= 1, got {rate}")
        if hidden_dim < 2 or hidden_dim % 2:
            raise ValueError(
                f"SwiGLUProjector.hidden_dim must be even (SwiGLU halves it): {hidden_dim}"
            )
        self.rate = rate
        self.hidden_dim = hidden_dim
        self.norm_init = norm_init
        self.post_norm = post_norm
        self.eps = eps
        stacked = in_dim * rate
        self.ln_pre = rms_norm(stacked, norm_init, eps)
        self.linear_1 = nn.Linear(stacked, hidden_dim, bias=False)
        self.act = SwiGLU()
        self.linear_2 = nn.Linear(hidden_dim // 2, out_dim, bias=False)
        self.ln_post = rms_norm(out_dim, norm_init, eps) if post_norm else nn.Identity()

    def forward(
        self, features: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, lengths = compress(features, lengths, self.rate, "stack")  # zero-padded like Ultravox
        x = self.ln_pre(x.to(self.linear_1.weight.dtype))
        y = self.ln_post(self.linear_2(self.act(self.linear_1(x))))
        return mask_padding(y, lengths), lengths

    def init_config(self) -> dict:
        return {
            "rate": self.rate,
            "hidden_dim": self.hidden_dim,
            "norm_init": self.norm_init,
            "post_norm": self.post_norm,
            "eps": self.eps,
        }
