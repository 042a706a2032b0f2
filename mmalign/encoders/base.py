"""The encoder protocol every front end follows (see DESIGN.md, Interfaces)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class Encoder(nn.Module):
    """Frames in, features out: ``forward(inputs, lengths) -> (features [B, T, D], lengths [B])``.

    ``dim`` is the feature width D and ``frame_rate`` the output frames per second, so projectors
    and duration-based batching can be sized without running the encoder. A locked encoder has no
    trainable parameters and stays in eval mode even when Lightning calls ``model.train()``.
    """

    dim: int
    frame_rate: float
    frozen: bool = False
    input_key: str = "audio_features"  # batch key of the inputs (``audio`` for waveforms)
    lengths_key: str = "audio_lengths"  # batch key of their valid lengths

    def encode_batch(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Pick this encoder's inputs out of a batch; encoders with several inputs override it."""
        for key in (self.input_key, self.lengths_key):
            if key not in batch:
                raise KeyError(
                    f"{type(self).__name__} reads batch[{key!r}], which the data did not provide"
                    + (" (set data.keep_waveform: true)" if key == "audio" else "")
                )
        return self(batch[self.input_key], batch[self.lengths_key])

    def init_config(self) -> dict[str, Any]:
        """Constructor arguments, so checkpoints and exports can rebuild the encoder."""
        raise NotImplementedError(f"{type(self).__name__} does not describe itself")

    def forward(self, inputs: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def lock(self) -> Encoder:
        """Freeze: no parameter requires grad and dropout stays off from now on."""
        for param in self.parameters():
            param.requires_grad_(False)
        self.frozen = True
        return self.train(False)

    def train(self, mode: bool = True) -> Encoder:
        """Like ``nn.Module.train`` but a frozen encoder always stays in eval mode."""
        return super().train(mode and not self.frozen)

    def no_grad_if_frozen(self) -> torch.autograd.grad_mode.set_grad_enabled:
        """Context for ``forward``: skip building the graph when nothing here is trained."""
        return torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen)
