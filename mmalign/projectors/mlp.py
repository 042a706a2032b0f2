"""Compression followed by a two-layer MLP (Linear, activation, Linear) to the LLM width."""

from __future__ import annotations

import torch
from jsonargparse.typing import PositiveInt
from torch import nn
from transformers.activations import ACT2FN

from mmalign.projectors.base import Projector, final_norm, mask_padding
from mmalign.projectors.compress import compress, output_dim


class MLPProjector(Projector):
    """Stack or average-pool ``rate`` frames, then Linear -> activation -> Linear (Llama-AVSR).

    ``in_dim`` and ``out_dim`` come from the encoder and the LLM at build time; the YAML only
    names the rate, mode, hidden width, activation and whether a final LayerNorm follows.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rate: PositiveInt = 4,
        mode: str = "stack",
        hidden_dim: int | None = None,
        activation: str = "gelu",
        norm: bool = False,
    ) -> None:
        super().__init__(in_dim, out_dim)
        if activation not in ACT2FN:
            raise ValueError(
                f"projector activation {activation!r} is unknown; try 'gelu' or 'relu'"
            )
        compress(
            torch.zeros(1, 1, 1), torch.ones(1, dtype=torch.long), rate, mode
        )  # validate early
        self.rate = rate
        self.mode = mode
        self.hidden_dim = hidden_dim or out_dim
        self.activation = activation
        self.net = nn.Sequential(
            nn.Linear(output_dim(in_dim, rate, mode), self.hidden_dim),
            ACT2FN[activation],
            nn.Linear(self.hidden_dim, out_dim),
        )
        self.norm = norm
        self.out_norm = final_norm(norm, out_dim)

    def forward(
        self, features: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, lengths = compress(features, lengths, self.rate, self.mode)
        y = self.out_norm(self.net(x.to(self.net[0].weight.dtype)))
        return mask_padding(y, lengths), lengths

    def init_config(self) -> dict:
        return {
            "rate": self.rate,
            "mode": self.mode,
            "hidden_dim": self.hidden_dim,
            "activation": self.activation,
            "norm": self.norm,
        }
