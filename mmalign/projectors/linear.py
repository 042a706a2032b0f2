"""The smallest projector: optional frame compression, then one Linear layer to the LLM width."""

from __future__ import annotations

import torch
from jsonargparse.typing import PositiveInt
from torch import nn

from mmalign.projectors.base import Projector, final_norm, mask_padding
from mmalign.projectors.compress import compress, output_dim


class LinearProjector(Projector):
    """Stack or average-pool ``rate`` frames, then a single Linear (and an optional LayerNorm).

    A baseline: the fewest trainable parameters for a given rate, so any gain of the bigger
    projectors can be measured against it.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rate: PositiveInt = 1,
        mode: str = "stack",
        norm: bool = False,
    ) -> None:
        super().__init__(in_dim, out_dim)
        compress(torch.zeros(1, 1, 1), torch.ones(1, dtype=torch.long), rate, mode)  # validate
        self.rate = rate
        self.mode = mode
        self.norm = norm
        self.proj = nn.Linear(output_dim(in_dim, rate, mode), out_dim)
        self.out_norm = final_norm(norm, out_dim)

    def forward(
        self, features: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, lengths = compress(features, lengths, self.rate, self.mode)
        y = self.out_norm(self.proj(x.to(self.proj.weight.dtype)))
        return mask_padding(y, lengths), lengths

    def init_config(self) -> dict:
        return {"rate": self.rate, "mode": self.mode, "norm": self.norm}
