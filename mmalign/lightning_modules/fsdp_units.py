"""Which submodules of a SpeechLLM are FSDP units, and how they are recomputed in backward.

The units are its models' repeated blocks, read off the model so that a config never names a
Python class of the LLM or an encoder: the classes a transformers model lists in
``_no_split_modules`` (``Qwen2DecoderLayer``, ``WhisperEncoderLayer``...), or, for models that
list none, the largest repeated block.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from torch import nn

__all__ = [
    "checkpoint_forward",
    "checkpoint_layers",
    "encoder_layer_classes",
    "llm_layer_classes",
    "no_split_classes",
    "repeated_block_class",
    "speech_llm",
]


def no_split_classes(module: nn.Module) -> set[type[nn.Module]]:
    """Classes of the submodules of ``module`` that a transformers model lists in its
    ``_no_split_modules`` (its repeated blocks: ``LlamaDecoderLayer``, ``WhisperEncoderLayer``...).

    Only classes that actually occur are returned: ``WhisperEncoder`` names
    ``WhisperDecoderLayer`` too, which an encoder alone does not hold.
    """
    names: set[str] = set()
    for sub in module.modules():
        names.update(getattr(sub, "_no_split_modules", None) or ())
    return {type(sub) for sub in module.modules() if type(sub).__name__ in names}


def repeated_block_class(module: nn.Module) -> set[type[nn.Module]]:
    """The class of the repeated block holding most of ``module``'s weights: the members of
    the ``nn.ModuleList`` (all of one class, at least two) with the most parameters.

    For models that do not list ``_no_split_modules`` (transformers' WavLM, open_clip's ViT,
    whose blocks are ``ResidualAttentionBlock``)."""
    best: tuple[int, type[nn.Module] | None] = (0, None)
    for sub in module.modules():
        if not isinstance(sub, nn.ModuleList) or len(sub) < 2:
            continue
        classes = {type(m) for m in sub}
        if len(classes) != 1:
            continue
        size = sum(p.numel() for p in sub.parameters())
        if size > best[0]:
            best = (size, classes.pop())
    return {best[1]} if best[1] is not None else set()


def _layer_classes(modules: Iterable[nn.Module]) -> set[type[nn.Module]]:
    found: set[type[nn.Module]] = set()
    for module in modules:
        found |= no_split_classes(module) or repeated_block_class(module)
    return found


def speech_llm(model: nn.Module) -> nn.Module | None:
    """The SpeechLLM inside ``model`` (an AlignmentModule, or the SpeechLLM itself)."""
    from mmalign.model import SpeechLLM

    if isinstance(model, SpeechLLM):
        return model
    return next((m for m in model.modules() if isinstance(m, SpeechLLM)), None)


def llm_layer_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The decoder-layer classes of every :class:`~mmalign.llm.load.CausalLM` in ``model``
    (from the transformers model's ``_no_split_modules``, e.g. ``Qwen2DecoderLayer``)."""
    from mmalign.llm.load import CausalLM

    return _layer_classes(m for m in model.modules() if isinstance(m, CausalLM))


def encoder_layer_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The layer classes of the encoders of the SpeechLLM in ``model`` (``encoder`` and
    ``video_encoder``; a dual encoder's two towers each give theirs)."""
    from mmalign.encoders.base import Encoder

    speech = speech_llm(model)
    if speech is None:
        return set()
    towers = []
    for name in ("encoder", "video_encoder"):
        enc = getattr(speech, name, None)
        if enc is None:
            continue
        # a DualEncoder (mmalign.encoders.fusion) holds two encoders: take each one's blocks
        inner = [m for m in enc.modules() if isinstance(m, Encoder) and m is not enc]
        towers.extend(inner or [enc])
    return _layer_classes(towers)


def checkpoint_layers(model: nn.Module) -> set[str]:
    """Recompute layers in backward, non-reentrant; returns their class names. LLM layers:
    transformers' own checkpointing, which also keeps the KV cache out of the recomputation (a
    plain checkpoint would replay the cache update and double the keys). Encoder layers: those
    holding trainable parameters (a frozen encoder runs without grad and keeps no activations).
    """
    from mmalign.encoders.base import Encoder
    from mmalign.llm.load import CausalLM, enable_checkpointing, is_checkpointing

    check_recompute_allowed(model)
    names: set[str] = set()
    for llm in (m for m in model.modules() if isinstance(m, CausalLM)):
        base = llm.model.get_base_model() if hasattr(llm.model, "get_base_model") else llm.model
        if not is_checkpointing(base):
            enable_checkpointing(base)
        names |= {c.__name__ for c in llm_layer_classes(llm)}
    layer_classes = encoder_layer_classes(model)
    trained = {
        type(m)
        for enc in (m for m in model.modules() if isinstance(m, Encoder))
        for m in enc.modules()
        if type(m) in layer_classes and any(p.requires_grad for p in m.parameters())
    }
    return names | checkpoint_forward(model, trained)


def checkpoint_forward(model: nn.Module, classes: set[type[nn.Module]]) -> set[str]:
    """Non-reentrant ``torch.utils.checkpoint`` around the ``forward`` of each module of
    ``classes`` in ``model``: an FSDP unit's hooks stay outside it, parameter names unchanged."""
    from torch.utils.checkpoint import checkpoint

    names = set()
    for module in model.modules():
        if isinstance(module, tuple(classes)) and "forward" not in vars(module):
            module.forward = functools.partial(checkpoint, module.forward, use_reentrant=False)
            names.add(type(module).__name__)
    return names


def check_recompute_allowed(model: nn.Module) -> None:
    """Several adapter sets per step cannot be recomputed: the backward would rerun every set's
    layers with the last set's adapters active (task adapters; Matryoshka over all rates with
    per-rate adapters)."""
    speech = speech_llm(model)
    if len(set((getattr(speech, "task_adapters", None) or {}).values())) > 1:
        raise ValueError(
            "LLMFSDPStrategy(activation_checkpointing=True) cannot be used with several "
            "task_adapters sets: recomputation in backward would run every group's layers "
            "with the last group's adapters"
        )
    sampling = getattr(model, "rate_sampling", None)
    strategy = getattr(speech, "lora_strategy", "shared")
    if speech is not None and sampling == "all" and strategy != "shared":
        if getattr(speech, "rates", None):
            raise ValueError(
                "LLMFSDPStrategy(activation_checkpointing=True) cannot be used with "
                f"rate_sampling 'all' and lora_strategy {strategy!r}: recomputation in "
                "backward would run with the last rate's adapters; use rate_sampling "
                "'sample' or lora_strategy 'shared'"
            )
