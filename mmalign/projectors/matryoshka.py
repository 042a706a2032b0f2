"""Multi-rate (Matryoshka) projector: one trained model, several token-compression rates.

Following Llama-MTSK, every rate in ``rates`` has its own compressor (stack or average-pool, see
:mod:`mmalign.projectors.compress`) feeding a two-layer MLP to the LLM width. The active rate is
switched with :meth:`MatryoshkaProjector.set_rate`; :class:`mmalign.model.SpeechLLM` reads it
before every LLM call and activates the LoRA adapter(s) that belong to it, and ``mmalign
evaluate``/``transcribe`` sweep or pick rates through the same ``rates``/``set_rate`` hook.

The projector is per modality: an audio-visual model gets one of these per stream, and a rate
*combination* is then one rate per projector (the AVSR issue adds that layer).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jsonargparse.typing import PositiveInt
from torch import nn
from transformers.activations import ACT2FN

from mmalign.projectors.base import Projector, final_norm, mask_padding
from mmalign.projectors.compress import MODES, compress, output_dim

SHARED_KEY = "shared"


class MatryoshkaProjector(Projector):
    """Compress by the active rate, then Linear -> activation -> Linear (-> LayerNorm).

    Args:
        in_dim: encoder width (filled in at build time).
        out_dim: LLM width (filled in at build time).
        rates: the compression rates trained together, e.g. ``[4, 8, 16]``; distinct, >= 1.
        mode: ``stack`` (concatenate neighbours, width ``in_dim * rate``) or ``avgpool``.
        hidden_dim: MLP width (default: ``out_dim``).
        activation: a ``transformers`` activation name.
        norm: LayerNorm after the MLP.
        shared: ``False`` (as published): one MLP per rate. ``True``: one MLP for every rate.
            A stacked input is ``in_dim * rate`` wide, so with ``mode: stack`` the first Linear
            stays per rate (it is the only layer that sees the rate-dependent width) and the rest
            is shared; with ``mode: avgpool`` the input width is the same at every rate and the
            whole MLP is shared. Sharing saves parameters; separate MLPs let each rate fit its own
            token statistics.
        rate: the rate active after construction and the model's default (validation reports
            ``val/wer`` at it); defaults to the first of ``rates``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rates: Sequence[PositiveInt] = (4, 8, 16),
        mode: str = "stack",
        hidden_dim: int | None = None,
        activation: str = "gelu",
        norm: bool = False,
        shared: bool = False,
        rate: PositiveInt | None = None,
    ) -> None:
        super().__init__(in_dim, out_dim)
        rates = [int(r) for r in rates]
        if not rates or len(set(rates)) != len(rates) or min(rates) < 1:
            raise ValueError(f"projector rates must be distinct integers >= 1, got {rates}")
        if mode not in MODES:
            raise ValueError(f"projector mode {mode!r} is not one of {MODES}")
        if activation not in ACT2FN:
            raise ValueError(f"projector activation {activation!r} is unknown; try 'gelu'")
        if rate is not None and int(rate) not in rates:
            raise ValueError(f"projector rate {rate} is not one of its rates {rates}")
        self.rates = rates
        self.default_rate = int(rate) if rate is not None else rates[0]
        self.rate = self.default_rate
        self.mode = mode
        self.hidden_dim = hidden_dim or out_dim
        self.activation = activation
        self.norm = norm
        self.shared = shared
        share_first = shared and mode == "avgpool"
        first_keys = [SHARED_KEY] if share_first else [str(r) for r in rates]
        hidden = self.hidden_dim
        self.first = nn.ModuleDict(
            {
                k: nn.Linear(output_dim(in_dim, 1 if share_first else int(k), mode), hidden)
                for k in first_keys
            }
        )
        second_keys = [SHARED_KEY] if shared else [str(r) for r in rates]
        self.second = nn.ModuleDict(
            {
                k: nn.Sequential(
                    ACT2FN[activation],
                    nn.Linear(self.hidden_dim, out_dim),
                    final_norm(norm, out_dim),
                )
                for k in second_keys
            }
        )

    def set_rate(self, rate: int) -> None:
        """Make ``rate`` the active compression rate (one of the trained ``rates``)."""
        if int(rate) not in self.rates:
            raise ValueError(
                f"compression rate {rate} was not trained: this projector's rates are {self.rates}"
            )
        self.rate = int(rate)

    def _layer(self, table: nn.ModuleDict, rate: int) -> nn.Module:
        return table[SHARED_KEY] if SHARED_KEY in table else table[str(rate)]

    def forward(
        self, features: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        first = self._layer(self.first, self.rate)
        x, lengths = compress(features, lengths, self.rate, self.mode)
        y = self._layer(self.second, self.rate)(first(x.to(first.weight.dtype)))
        return mask_padding(y, lengths), lengths

    def init_config(self) -> dict:
        return {
            "rates": list(self.rates),
            "mode": self.mode,
            "hidden_dim": self.hidden_dim,
            "activation": self.activation,
            "norm": self.norm,
            "shared": self.shared,
            "rate": self.default_rate,
        }
