"""SALMONN's window-level Q-Former: learned queries read fixed-length windows of encoder frames.

Frames are cut into windows of ``window`` frames (SALMONN: 17 Whisper frames, about 0.33 s); in each
window ``num_queries`` learned query vectors cross-attend to that window's frames through a small
BLIP-2 Q-Former (transformers' ``Blip2QFormerModel``, cross-attention in every layer), and a Linear
maps the query outputs to the LLM width. The token count is fixed per second of audio, whatever the
content. Padded frames of a row's last window are masked out of the cross-attention, and windows
holding no valid frame are never computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from mmalign.projectors.base import Projector, final_norm, mask_padding
from mmalign.projectors.compress import compressed_lengths


class WindowQFormerProjector(Projector):
    """Window-level Q-Former (SALMONN): ``ceil(T / window) * num_queries`` output tokens.

    Args:
        window: frames per window (17 at 50 Hz is about 3 tokens per second with one query).
        num_queries: learned queries per window (tokens per window).
        hidden_size: Q-Former width (SALMONN: 768, BERT-base).
        num_layers: Q-Former layers (SALMONN: 2), each with self- and cross-attention.
        num_heads: attention heads (must divide ``hidden_size``).
        intermediate_size: feed-forward width; default ``4 * hidden_size``.
        dropout: Q-Former dropout (BERT's 0.1).
        input_norm: LayerNorm on the encoder frames first (SALMONN's ``ln_speech``).
        norm: a final LayerNorm on the output.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        window: int = 17,
        num_queries: int = 1,
        hidden_size: int = 768,
        num_layers: int = 2,
        num_heads: int = 12,
        intermediate_size: int | None = None,
        dropout: float = 0.1,
        input_norm: bool = True,
        norm: bool = False,
    ) -> None:
        super().__init__(in_dim, out_dim)
        if window < 1 or num_queries < 1:
            raise ValueError(
                f"WindowQFormerProjector needs window >= 1 and num_queries >= 1, "
                f"got window={window}, num_queries={num_queries}"
            )
        if hidden_size % num_heads:
            raise ValueError(
                f"WindowQFormerProjector.num_heads ({num_heads}) must divide "
                f"hidden_size ({hidden_size})"
            )
        self.window = window
        self.num_queries = num_queries
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.dropout = dropout
        self.input_norm = input_norm
        self.norm = norm
        config = Blip2QFormerConfig(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=self.intermediate_size,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            cross_attention_frequency=1,
            encoder_hidden_size=in_dim,
        )
        self.ln_in = nn.LayerNorm(in_dim) if input_norm else nn.Identity()
        self.queries = nn.Parameter(torch.randn(1, num_queries, hidden_size) * 0.02)
        self.qformer = Blip2QFormerModel(config)
        self.proj = nn.Linear(hidden_size, out_dim)
        self.out_norm = final_norm(norm, out_dim)

    def forward(
        self, features: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, d = features.shape
        w, q = self.window, self.num_queries
        n_windows = -(-t // w)
        x = self.ln_in(features.to(self.proj.weight.dtype))
        x = mask_padding(x, lengths)
        x = F.pad(x, (0, 0, 0, n_windows * w - t)).reshape(b * n_windows, w, d)
        frame_valid = torch.arange(n_windows * w, device=x.device)[None, :] < lengths[:, None]
        frame_valid = frame_valid.reshape(b * n_windows, w)
        used = frame_valid[:, 0]  # windows holding at least one valid frame
        out = x.new_zeros(b * n_windows, q, self.proj.out_features)
        if bool(used.any()):
            hidden = self.qformer(
                query_embeds=self.queries.expand(int(used.sum()), -1, -1),
                encoder_hidden_states=x[used],
                encoder_attention_mask=frame_valid[used].long(),
            ).last_hidden_state
            out[used] = self.out_norm(self.proj(hidden)).to(out.dtype)
        out = out.reshape(b, n_windows * q, -1)
        out_lengths = compressed_lengths(lengths, w) * q
        return mask_padding(out, out_lengths), out_lengths

    def init_config(self) -> dict:
        return {
            "window": self.window,
            "num_queries": self.num_queries,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "dropout": self.dropout,
            "input_norm": self.input_norm,
            "norm": self.norm,
        }
