"""Adapter initialisation offsets: frozen weights an initialisation moved into the adapter.

Initialisations that move part of the frozen weight into the adapter (``W <- W - s B0 A0``:
``pissa_niter_<n>``, whose randomised SVD a reload would not repeat, ``corda`` and ``lora_ga``)
keep ``B0`` and ``A0`` as buffers of each LoRA layer (``init_offset_B`` / ``init_offset_A``,
saved in checkpoints with the trainable weights); loading them re-derives ``W - s B0 A0`` from the
original weights (:func:`sync_base_offsets`), and ``mmalign export`` writes the adapter as the
equivalent plain rank-``2r`` LoRA on the original weights (``[B, -B0] @ [A; A0]``, alpha scaled to
keep ``s``), as peft's own PiSSA-to-LoRA conversion does (:func:`convert_export`).

The layers in question are found with :func:`lora_layers`; ``pissa_niter_<n>`` runs here
(:func:`init_pissa_niter`), CorDA and LoRA-GA in :mod:`mmalign.llm.calibration`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

OFFSET_A, OFFSET_B = "init_offset_A", "init_offset_B"


def lora_layers(model: nn.Module, adapter: str = "default") -> list[tuple[str, nn.Module]]:
    """``(name in the plain model, peft LoRA layer)`` of each layer holding ``adapter``."""
    out = []
    for name, module in model.named_modules():
        lora_A = getattr(module, "lora_A", None)
        if isinstance(lora_A, nn.ModuleDict) and adapter in lora_A:
            out.append((name.removeprefix("base_model.model."), module))
    return out


def add_offset_buffers(model: nn.Module, adapter: str = "default") -> None:
    """Zero ``init_offset_A`` / ``init_offset_B`` buffers on each LoRA layer (filled by the
    initialisation or a checkpoint; applied by :func:`sync_base_offsets`)."""
    for _, layer in lora_layers(model, adapter):
        A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        layer.register_buffer(OFFSET_A, torch.zeros(A.shape, device=A.device))
        layer.register_buffer(OFFSET_B, torch.zeros(B.shape, device=B.device))
        layer._mmalign_offset_adapter = adapter
        layer._mmalign_offset_applied = None


def offset_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, OFFSET_A, None), torch.Tensor)]


def offset_buffer_names(model: nn.Module) -> list[str]:
    """State-dict names of the offset buffers under ``model`` (checkpoints keep them)."""
    return [n for n, _ in model.named_buffers() if n.rsplit(".", 1)[-1] in (OFFSET_A, OFFSET_B)]


@contextmanager
def kept_weight(layer: nn.Module) -> Iterator[None]:
    """Undo what a peft initialisation does to the frozen weight (mmalign applies the offset
    itself, the same way on a fresh run and on reload)."""
    weight = layer.get_base_layer().weight
    saved = weight.data.clone()
    try:
        yield
    finally:
        weight.data = saved


def record_offset(layer: nn.Module, adapter: str) -> None:
    getattr(layer, OFFSET_A).copy_(layer.lora_A[adapter].weight.detach())
    getattr(layer, OFFSET_B).copy_(layer.lora_B[adapter].weight.detach())


@torch.no_grad()
def sync_base_offsets(model: nn.Module) -> int:
    """Make each frozen weight ``W_orig - s B0 A0`` for the ``B0, A0`` now in its buffers
    (undoing the offset applied before, if any); returns how many layers changed."""
    changed = 0
    for layer in offset_layers(model):
        A, B = getattr(layer, OFFSET_A).float(), getattr(layer, OFFSET_B).float()
        applied = layer._mmalign_offset_applied
        if applied is None and not (A.any() or B.any()):
            continue
        if applied is not None and torch.equal(applied[0], A) and torch.equal(applied[1], B):
            continue
        s = layer.scaling[layer._mmalign_offset_adapter]
        weight = layer.get_base_layer().weight
        new = weight.data.float()
        if applied is not None:
            new += s * (applied[1] @ applied[0])
        new -= s * (B @ A)
        weight.data = new.to(weight.dtype)
        layer._mmalign_offset_applied = (A.clone(), B.clone())
        changed += 1
    return changed


def init_pissa_niter(model: nn.Module, init: str, adapter: str = "default") -> None:
    for _, layer in lora_layers(model, adapter):
        with kept_weight(layer):
            layer.pissa_init(adapter, init)
        record_offset(layer, adapter)
    sync_base_offsets(model)


def convert_export(model: nn.Module, adapter_dir: Path) -> bool:
    """Rewrite a saved adapter whose initialisation moved ``s B0 A0`` out of the frozen
    weights into a plain LoRA of rank ``2r`` on the original weights (``B' = [B, -B0]``,
    ``A' = [A; A0]``, ``lora_alpha`` doubled, or times sqrt(2) with rsLoRA, so ``s`` stays),
    ``init_lora_weights: true``. Returns whether it converted."""
    from safetensors.torch import load_file, save_file

    ids = {id(layer) for layer in offset_layers(model)}
    layers = {name: layer for name, layer in model.named_modules() if id(layer) in ids}
    if not layers:
        return False
    weights_file = adapter_dir / "adapter_model.safetensors"
    state = load_file(weights_file)
    out = dict(state)
    for key, value in state.items():
        for part, attr, dim, sign in (("lora_A", OFFSET_A, 0, 1.0), ("lora_B", OFFSET_B, 1, -1.0)):
            suffix = f".{part}.weight"
            if key.endswith(suffix) and key[: -len(suffix)] in layers:
                offset = getattr(layers[key[: -len(suffix)]], attr).to(value.dtype)
                out[key] = torch.cat([value, sign * offset], dim=dim).contiguous()
    save_file(out, weights_file, metadata={"format": "pt"})
    config_file = adapter_dir / "adapter_config.json"
    cfg = json.loads(config_file.read_text())
    factor = math.sqrt(2) if cfg.get("use_rslora") else 2
    cfg["r"] = 2 * cfg["r"]
    cfg["lora_alpha"] = factor * cfg["lora_alpha"]
    cfg["rank_pattern"] = {k: 2 * v for k, v in (cfg.get("rank_pattern") or {}).items()}
    cfg["alpha_pattern"] = {k: factor * v for k, v in (cfg.get("alpha_pattern") or {}).items()}
    cfg["init_lora_weights"] = True
    config_file.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return True
