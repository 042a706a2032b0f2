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
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

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
    names = adapter_names(strategy, rates)
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
