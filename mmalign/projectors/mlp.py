"""Compression followed by a two-layer MLP (Linear, activation, Linear) to the LLM width."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from mmalign.projectors.base import Projector
from mmalign.projectors.compress import compress, output_dim


class MLPProjector(Projector):
    """Stack or average-pool ``rate`` frames, then Linear -> activation -> Linear.

    ``in_dim`` and ``out_dim`` come from the encoder and the LLM at build time; the YAML only
    names the rate, mode, hidden width and activation.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rate: int = 4,
        mode: str = "stack",
        hidden_dim: int | None = None,
        activation: str = "gelu",
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

    def forward(
        self, features: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, lengths = compress(features, lengths, self.rate, self.mode)
        return self.net(x.to(self.net[0].weight.dtype)), lengths

    def init_config(self) -> dict:
        return {
            "rate": self.rate,
            "mode": self.mode,
            "hidden_dim": self.hidden_dim,
            "activation": self.activation,
        }
