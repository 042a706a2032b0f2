"""Prompt-aware adapter scaling (WavLLM's prompt-aware LoRA weight adapter).

A small trainable head reads each sample's text prompt (the mean of its prompt tokens' input
embeddings: head and tail around the modality span, never the audio or video, nor the target)
and returns one positive scale per sample; every adapter's output for that sample is multiplied
by it, in every adapted layer and at every position of the sample. A transcription prompt and a
translation prompt can so turn the same adapters up or down.

Where the scale acts: peft's tuner layers (``peft.tuners.lora.layer.Linear.forward`` in peft
0.21.2) compute ``result = base_layer(x)`` and then add each active adapter's delta into
``result`` (``result = result + lora_B(lora_A(dropout(x))) * scaling``, or a variant's own
update such as DoRA's), so the delta alone is never a module output. :class:`DeltaScale` hooks
both ends instead: a forward hook on the layer's ``base_layer`` keeps the frozen output
``base``, and a forward hook on the tuner layer turns its output ``out`` into
``base + s * (out - base)``. That is the sum of all active adapters' deltas times ``s``, for
every tuner whose layers wrap a ``base_layer`` (LoRA and its variants, VeRA, RandLoRA, MiSS,
...), with the frozen path's gradient unchanged (``d/d base = 1``).

The scale lives in :attr:`DeltaScale.scale` (``[rows, 1, 1]``, or ``[rows, L, 1]`` when
several samples are packed into one row) and is set before each LLM call; under activation
checkpointing it is kept after the call, since the backward pass recomputes the layers.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


class PromptScaler(nn.Module):
    """``2 * sigmoid(MLP(rms_normalise(pooled prompt embedding)))``: a scale in (0, 2) per sample.

    The pooled embedding is RMS-normalised first, so the head sees the same input range
    whatever the LLM's embedding scale. Both layers keep PyTorch's default initialisation:
    distinct prompts start at distinct scales near 1, and as LoRA's ``B`` starts at zero the
    model's output at step 0 is the plain LoRA one all the same.
    """

    def __init__(self, hidden_size: int, dim: int = 64) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"prompt_scaling_dim={dim!r}: a positive int")
        self.hidden_size = hidden_size
        self.net = nn.Sequential(nn.Linear(hidden_size, dim), nn.GELU(), nn.Linear(dim, 1))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """``pooled [B, H]`` -> scales ``[B]``."""
        x = pooled.to(self.net[0].weight.dtype)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return 2.0 * torch.sigmoid(self.net(x).squeeze(-1))


def tuner_layers(model: nn.Module) -> list[nn.Module]:
    """peft tuner layers of ``model`` that wrap a ``base_layer`` (where adapter deltas add up)."""
    return [
        m
        for m in model.modules()
        if isinstance(m, BaseTunerLayer) and isinstance(getattr(m, "base_layer", None), nn.Module)
    ]


class DeltaScale:
    """Multiplies the adapter delta of every hooked tuner layer by a per-sample scale.

    Hooks are installed once per layer (:meth:`install`, safe to call before every LLM call:
    layers added later, e.g. adapters loaded after construction, are picked up) and do nothing
    while :attr:`scale` is None.
    """

    def __init__(self) -> None:
        self.scale: torch.Tensor | None = None
        self._base: dict[int, torch.Tensor] = {}

    def install(self, model: nn.Module) -> int:
        """Hook every tuner layer of ``model`` not hooked yet; returns how many are hooked."""
        layers = tuner_layers(model)
        for layer in layers:
            # marked on the layer itself, so a deep copy (hooks and owner copied together)
            # is not hooked twice
            if getattr(layer, "_mmalign_delta_scale", None) is self:
                continue
            layer.register_forward_pre_hook(self._clear)
            layer.base_layer.register_forward_hook(self._keep_base)
            layer.register_forward_hook(self._apply)
            layer._mmalign_delta_scale = self
        return len(layers)

    def set(self, scales: torch.Tensor, sequence_ids: torch.Tensor | None = None) -> None:
        """Per-sample ``scales [B]``; ``sequence_ids [R, L]`` (packed rows: sample index per
        position, -1 on padding) spreads them over positions."""
        if sequence_ids is None:
            self.scale = scales[:, None, None]
        else:
            per_token = scales[sequence_ids.clamp(min=0)]
            self.scale = torch.where(sequence_ids >= 0, per_token, 1.0)[..., None]

    def clear(self) -> None:
        self.scale = None
        self._base.clear()

    def _clear(self, layer: nn.Module, args: Any) -> None:
        self._base.pop(id(layer.base_layer), None)

    def _keep_base(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.scale is not None and isinstance(output, torch.Tensor):
            self._base.setdefault(id(module), output)  # the first call: the layer's own

    def _apply(self, layer: nn.Module, args: Any, output: Any) -> Any:
        if self.scale is None:
            return None
        base = self._base.pop(id(layer.base_layer), None)
        if base is None or not isinstance(output, torch.Tensor):
            return None  # the tuner did not run its base layer (nothing to scale against)
        if getattr(layer, "merged", False):
            raise RuntimeError(
                "prompt-aware scaling cannot scale merged adapters: unmerge them first"
            )
        scale = self.scale
        if output.dim() != 3:
            raise RuntimeError(
                f"prompt-aware scaling expects [rows, length, width] layer outputs, got "
                f"{tuple(output.shape)} from {type(layer).__name__}"
            )
        rows = output.shape[0]
        if scale.shape[0] != rows:
            if rows % scale.shape[0]:
                raise RuntimeError(
                    f"prompt-aware scaling has {scale.shape[0]} scales for {rows} rows"
                )
            scale = scale.repeat_interleave(rows // scale.shape[0], 0)  # beam search
        if scale.shape[1] not in (1, output.shape[1]):
            raise RuntimeError(
                f"prompt-aware scaling has per-position scales for length {scale.shape[1]} "
                f"but {type(layer).__name__} sees length {output.shape[1]}: target only the "
                "decoder layers' projections when packing"
            )
        return base + scale.to(output.dtype) * (output - base)
