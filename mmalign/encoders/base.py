"""The encoder protocol every front end follows (see DESIGN.md, Interfaces)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def valid_mask(lengths: Tensor, size: int) -> Tensor:
    """``[B, size]`` bool mask, True on the first ``lengths[b]`` positions of each row."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


def as_lora_config(lora: Any) -> Any:
    """A ``peft.LoraConfig`` (or any PeftConfig) from itself or its ``to_dict()`` (rebuilds)."""
    if lora is None or not isinstance(lora, dict):
        return lora
    from peft import get_peft_config

    return get_peft_config(dict(lora))


def lora_to_dict(lora: Any) -> dict[str, Any] | None:
    """JSON-friendly form of an encoder's peft config, for ``init_config``."""
    if lora is None:
        return None
    d = lora.to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in d.items()}


def inject_lora(
    module: nn.Module,
    lora: Any,
    bypassed: Callable[[nn.Module, str], bool] | None = None,
    field: str = "lora",
) -> nn.Module:
    """Put peft LoRA layers into ``module`` in place (any nn.Module, not only transformers').

    Some attention code reads a projection's ``.weight`` directly instead of calling the layer
    (``nn.MultiheadAttention``, WavLM's attention), so LoRA put there would silently never run.
    ``bypassed(parent, child_name)`` names such layers; targeting one is an error.
    """
    from peft import inject_adapter_in_model

    inject_adapter_in_model(lora, module)
    modules = dict(module.named_modules())
    dead = []
    for name, sub in modules.items():
        if not hasattr(sub, "lora_A"):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name]
        if isinstance(parent, nn.MultiheadAttention) or (bypassed and bypassed(parent, child)):
            dead.append(name)
    if dead:
        raise ValueError(
            f"{field}.target_modules hits {dead[:3]}{'...' if len(dead) > 3 else ''}, whose "
            "weights the attention reads directly, so LoRA there would never run; target layers "
            "that are called (e.g. the feed-forward ones)"
        )
    return module


class Encoder(nn.Module):
    """Frames in, features out: ``forward(inputs, lengths) -> (features [B, T, D], lengths [B])``.

    ``dim`` is the feature width D and ``frame_rate`` the output frames per second, so projectors,
    duration-based batching and audio/video alignment can be sized without running the encoder or
    knowing which one it is. ``input_key``/``lengths_key`` name the batch entries it reads and
    ``modality`` the span its tokens form in the LLM's sequence. A locked encoder stays in eval mode
    even when Lightning calls ``model.train()`` and trains nothing but what
    :meth:`stays_trainable` names (LoRA, WavLM's layer weights); frozen weights are thus left out of
    the optimizer and of checkpoints, which both follow ``requires_grad``.
    """

    dim: int
    frame_rate: float
    frozen: bool = False
    input_key: str = "audio_features"  # batch key of the inputs (``audio`` for waveforms)
    lengths_key: str = "audio_lengths"  # batch key of their valid lengths
    modality: str = "audio"  # what the features describe (``audio``, ``video``): sequence layout

    @property
    def input_keys(self) -> tuple[str, ...]:
        """Every batch key ``encode_batch`` reads (the data module can check it provides them)."""
        return (self.input_key, self.lengths_key)

    @property
    def max_seconds(self) -> float | None:
        """Longest input it can encode in one piece, in seconds; None: no fixed window. Training
        skips longer samples, ``evaluate``/``transcribe`` cut them into chunks."""
        return None

    def encode_batch(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Pick this encoder's inputs out of a batch; encoders with several inputs override it."""
        for key in (self.input_key, self.lengths_key):
            if key not in batch:
                raise KeyError(
                    f"{type(self).__name__} reads batch[{key!r}], which the data did not provide"
                    + (" (set data.keep_waveform: true)" if key == "audio" else "")
                )
        if self.frozen and not self.has_trainable():
            # nothing here trains: inference mode skips autograd's bookkeeping entirely; the
            # output is copied out of it so the trainable projector can use it in autograd
            with torch.inference_mode():
                features, lengths = self(batch[self.input_key], batch[self.lengths_key])
            return features.clone(), lengths.clone()
        return self(batch[self.input_key], batch[self.lengths_key])

    def init_config(self) -> dict[str, Any]:
        """Constructor arguments, so checkpoints and exports can rebuild the encoder."""
        raise NotImplementedError(f"{type(self).__name__} does not describe itself")

    def forward(self, inputs: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def lock(self) -> Encoder:
        """Freeze: dropout stays off from now on and no parameter requires grad, except the
        small ones that :meth:`stays_trainable` names (LoRA, learned layer weights)."""
        for name, param in self.named_parameters():
            param.requires_grad_(self.stays_trainable(name))
        self.frozen = True
        return self.train(False)

    def stays_trainable(self, name: str) -> bool:
        """Whether parameter ``name`` is trained even when the encoder is locked: peft's LoRA
        weights by default; subclasses add their own (e.g. WavLM's layer weights). Those are
        then in the optimizer and in checkpoints, since both follow ``requires_grad``."""
        return "lora_" in name

    def has_trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def train(self, mode: bool = True) -> Encoder:
        """Like ``nn.Module.train`` but a frozen encoder always stays in eval mode."""
        return super().train(mode and not self.frozen)

    def no_grad_if_frozen(self) -> torch.autograd.grad_mode.set_grad_enabled:
        """Context for ``forward``: skip building the graph when nothing here is trained."""
        return torch.set_grad_enabled(
            torch.is_grad_enabled() and (not self.frozen or self.has_trainable())
        )
