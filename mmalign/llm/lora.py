"""LoRA layouts for multi-rate (Matryoshka) models, built on peft's multi-adapter support.

Strategies (``lora_strategy``):

- ``shared``: one adapter, peft's ``default``, for every rate (an export is a plain peft adapter).
- ``per_rate``: one adapter per rate, named ``rate{r}``; only the active rate's adapter runs.
- ``shared+per_rate``: ``default`` plus ``rate{r}``, both active; peft's LoRA layers sum the
  outputs of every active adapter (``for active_adapter in self.active_adapters: result += ...``
  in ``peft.tuners.lora.layer.Linear.forward``), so no layer of our own is needed.

peft's ``set_adapter`` also sets ``requires_grad`` (True for the active adapters, False for the
others). A training run must keep every adapter trainable, or the optimizer (built once over
parameters that require grad) would never see the inactive ones and checkpoints would drop them;
:func:`activate` therefore restores each adapter parameter's previous ``requires_grad``. An
inactive adapter takes no part in the forward pass, so it still receives no gradient (``p.grad``
stays None and AdamW skips it, weight decay included).

Task adapters (``task_adapters``, modality- or task-specific LoRA as in Phi-4-multimodal and
MM-LoRA): a map from task to the adapter(s) its samples run through, e.g. ``{asr: speech,
st: [speech, translation], vsr: vision, avsr: [speech, vision]}``. Every name becomes an
adapter of its own (built from the LLM's adapter config, own random init); a name several tasks
list is shared by them, and the list's adapters are summed like ``shared+per_rate``'s. peft's
``default`` adapter is kept only when some task names it. :class:`mmalign.model.SpeechLLM` runs
each group of samples with one adapter set through its own LLM pass (peft's mixed-batch
``adapter_names=`` forward refuses training mode), so an adapter only ever sees, and is only
ever trained by, the samples of its tasks.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence

from peft import PeftConfig, PeftModel

STRATEGIES = ("shared", "per_rate", "shared+per_rate")
SHARED_ADAPTER = "default"


def check_strategy(strategy: str) -> str:
    """Return ``strategy`` or raise, naming the field and the accepted values."""
    if strategy not in STRATEGIES:
        raise ValueError(f"lora_strategy {strategy!r} is not one of {STRATEGIES}")
    return strategy


def rate_adapter(rate: int) -> str:
    """peft adapter name of a rate's own adapter."""
    return f"rate{int(rate)}"


def adapter_names(strategy: str, rates: Sequence[int]) -> list[str]:
    """Every adapter a model with ``strategy`` and ``rates`` holds (shared first)."""
    check_strategy(strategy)
    names = [SHARED_ADAPTER] if strategy != "per_rate" else []
    if strategy != "shared":
        names += [rate_adapter(r) for r in rates]
    return names


def active_adapters(strategy: str, rate: int) -> list[str]:
    """The adapters that run (and train) at ``rate``."""
    check_strategy(strategy)
    if strategy == "shared":
        return [SHARED_ADAPTER]
    if strategy == "per_rate":
        return [rate_adapter(rate)]
    return [SHARED_ADAPTER, rate_adapter(rate)]


def add_rate_adapters(
    model: PeftModel, config: PeftConfig, strategy: str, rates: Sequence[int]
) -> list[str]:
    """Give ``model`` (a fresh ``get_peft_model`` with adapter ``default``) the adapters of
    ``strategy``, all trainable; returns their names. Each new adapter has its own random init."""
    return add_named_adapters(model, config, adapter_names(strategy, rates))


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def task_adapter_map(
    task_adapters: Mapping[str, str | Sequence[str]],
) -> dict[str, tuple[str, ...]]:
    """``task_adapters`` with every value a tuple of distinct adapter names (a bare string is
    one name); raises on an empty map, an empty list or a name peft cannot hold."""
    if not task_adapters:
        raise ValueError("task_adapters is empty: map each task to its adapter(s)")
    out: dict[str, tuple[str, ...]] = {}
    for task, value in task_adapters.items():
        names = (value,) if isinstance(value, str) else tuple(value)
        bad = [n for n in names if not isinstance(n, str) or not _NAME.fullmatch(n)]
        if not names or bad or len(set(names)) != len(names):
            raise ValueError(
                f"task_adapters[{task!r}]={list(names)}: one or more distinct adapter names "
                "(letters, digits, underscores; e.g. speech, vision)"
            )
        out[str(task)] = names
    return out


def task_adapter_names(task_adapters: Mapping[str, Sequence[str]]) -> list[str]:
    """Every adapter a task map names, in first-mention order."""
    return list(dict.fromkeys(n for names in task_adapters.values() for n in names))


def add_named_adapters(model: PeftModel, config: PeftConfig, names: Sequence[str]) -> list[str]:
    """Give ``model`` (a fresh ``get_peft_model`` with adapter ``default``) the adapters
    ``names``, all trainable, dropping ``default`` unless named; returns ``names``."""
    names = list(names)
    for name in names:
        if name not in model.peft_config:
            model.add_adapter(name, copy.deepcopy(config))
    if SHARED_ADAPTER not in names:
        model.base_model.set_adapter(names[0])  # so deleting ``default`` leaves a valid state
        model.active_adapter = names[0]
        model.delete_adapter(SHARED_ADAPTER)
    model.base_model.set_requires_grad(names, True)
    return names


def activate(model: PeftModel, names: Sequence[str]) -> None:
    """Make exactly ``names`` the active adapters, leaving every ``requires_grad`` as it was."""
    names = list(names)
    missing = [n for n in names if n not in model.peft_config]
    if missing:
        raise KeyError(f"adapter(s) {missing} missing; the model has {sorted(model.peft_config)}")
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    before = [p.requires_grad for p in params]
    model.base_model.set_adapter(names)
    model.active_adapter = names[0]  # PeftModel looks its config up by this single name
    for p, flag in zip(params, before, strict=True):
        p.requires_grad_(flag)
