"""Projector protocol: encoder frames in, LLM-width embeddings out, plus learned boundaries."""

from __future__ import annotations

import torch
from torch import nn


def mask_padding(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Zero the frames of ``x [B, T, D]`` at or past each row's length, so whatever the collate or
    the encoder left there cannot reach a valid output (and padded outputs are exact zeros)."""
    valid = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
    return x * valid[..., None].to(x.dtype)


def final_norm(norm: bool, dim: int) -> nn.Module:
    """The optional LayerNorm at a projector's output (matches the LLM's embedding scale)."""
    return nn.LayerNorm(dim) if norm else nn.Identity()


class Projector(nn.Module):
    """Base for projectors.

    ``forward(features [B, T, D], lengths [B]) -> (embeddings [B, T', H], lengths' [B])``.
    The begin/end boundary vectors live here (trainable) rather than as new rows of the
    frozen LLM vocabulary, so adding a modality never touches the LLM's embedding table.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.boundary = nn.Parameter(torch.randn(2, out_dim) * 0.02)

    @property
    def begin(self) -> torch.Tensor:
        return self.boundary[0]

    @property
    def end(self) -> torch.Tensor:
        return self.boundary[1]

    def forward(
        self, features: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def init_config(self) -> dict:
        """Constructor arguments beyond (in_dim, out_dim), for export."""
        return {}
