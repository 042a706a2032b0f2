"""The calibration pass of data-driven adapter initialisations (EVA, CorDA, LoRA-GA, LoRA-One).

Data-driven initialisations (``eva``, ``corda``, ``lora_ga``, ``lora_one``) need a calibration
pass: ``mmalign fit`` runs it in ``AlignmentModule.setup`` over the first
``model.adapter_init_batches`` training batches, before the optimizer exists (see
:func:`calibrate`). EVA and CorDA run forward passes with the adapter disabled and collect the
target layers' inputs; LoRA-GA and LoRA-One run forward and backward passes and sketch each
target's weight gradient one layer at a time (:mod:`mmalign.llm.lora_one`); every rank of a
multi-device run then takes rank 0's result.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from typing import Any

import peft
import torch
from peft import PeftModel
from torch import nn

from mmalign.llm.lora_one import LoraOneConfig, apply_lora_one, sketch_gradients, sketch_rank
from mmalign.llm.offsets import (
    OFFSET_A,
    OFFSET_B,
    kept_weight,
    lora_layers,
    offset_layers,
    record_offset,
    sync_base_offsets,
)

log = logging.getLogger(__name__)


class _Opaque:
    """A batch peft's EVA passes around untouched (no device moves, no deep copies)."""

    def __init__(self, batch: Any) -> None:
        self.batch = batch

    def to(self, *args: Any, **kwargs: Any) -> _Opaque:
        return self

    def __deepcopy__(self, memo: dict) -> _Opaque:
        return self


class _Targets(nn.Module):
    """A view whose ``named_modules`` are ``(name in the plain model, frozen Linear)`` of each
    LoRA layer: what peft's CorDA helpers iterate over."""

    def __init__(self, pairs: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        object.__setattr__(self, "_pairs", pairs)

    def named_modules(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Module]]:
        return iter(self._pairs)

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        return (p for _, m in self._pairs for p in m.parameters())


def initialize_adapter(
    llm: Any,
    loss_fn: Callable[[Any], torch.Tensor],
    batches: Sequence[Any],
    owner: nn.Module | None = None,
    context: Callable[[], Any] = nullcontext,
) -> str | None:
    """Run ``llm.pending_init`` (a :class:`~mmalign.llm.load.CausalLM`'s data-driven
    initialisation) over ``batches`` with ``loss_fn(batch)`` (the training loss); ``owner``
    (the module holding the LLM) is put in eval mode meanwhile and its gradients cleared.
    ``context()`` wraps each pass (e.g. the trainer's autocast). Returns what ran."""
    init = getattr(llm, "pending_init", None)
    if init is None:
        return None
    if not batches:
        raise ValueError(
            f"init_lora_weights={init!r} needs training batches for its calibration pass "
            "(model.adapter_init_batches >= 1 and a non-empty training set)"
        )
    owner = owner if owner is not None else llm
    peft_model: PeftModel = llm.model
    adapter = peft_model.active_adapters[0]
    modes = [(m, m.training) for m in owner.modules()]  # frozen parts may stay in eval mode
    owner.eval()
    start = time.perf_counter()

    def run(batch: Any) -> torch.Tensor:
        with context():
            return loss_fn(batch)

    try:
        if init == "eva":
            _init_eva(peft_model, run, batches, adapter)
            llm.adapter = peft_model.peft_config[adapter]  # EVA's ranks are in it now
        elif init == "corda":
            _init_corda(peft_model, llm.adapter, run, batches, adapter)
        else:
            _init_from_gradient(peft_model, llm.adapter, init, run, batches, adapter, owner)
    finally:
        for module, mode in modes:
            module.training = mode
        for p in owner.parameters():
            p.grad = None
    _broadcast_from_rank0(peft_model, adapter)
    llm.pending_init = None
    seconds = time.perf_counter() - start
    log.info("adapter initialised with %s over %d batches in %.1f s", init, len(batches), seconds)
    return init


def _init_eva(model: PeftModel, run: Callable, batches: Sequence[Any], adapter: str) -> None:
    from peft import initialize_lora_eva_weights

    initialize_lora_eva_weights(
        model,
        dataloader=[_Opaque(b) for b in batches],
        forward_fn=lambda _model, inputs: run(inputs.batch),
        prepare_model_inputs_fn=None,
        prepare_layer_inputs_fn=None,  # every position of the (padded) batch
        adapter_name=adapter,
        show_progress_bar=False,
    )


@torch.no_grad()
def _init_corda(
    model: PeftModel, config: Any, run: Callable, batches: Sequence[Any], adapter: str
) -> None:
    """peft's CorDA with mmalign's forward passes: the covariance of each target's inputs
    (peft's hook assumes batch size 1; this one flattens batch and time), then peft's
    ``collect_eigens`` / ``crop_corda_eigens`` / ``corda_init``."""
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import collect_eigens, crop_corda_eigens

    corda_config = config.corda_config or CordaConfig()
    cfg = copy.copy(config)
    cfg.corda_config = corda_config
    layers = lora_layers(model, adapter)
    pairs = [(name, layer.get_base_layer()) for name, layer in layers]
    handles = []

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        x = x / x.max().abs()
        module.covariance_matrix = module.covariance_matrix + x.T @ x
        module.sample_count += 1

    for (_, base), (_, layer) in zip(pairs, layers, strict=True):
        base.covariance_matrix, base.sample_count = 0, 0
        base.corda_method, base.rank = corda_config.corda_method, layer.r[adapter]
        handles.append(base.register_forward_hook(hook))
    try:
        with model.disable_adapter():
            for batch in batches:
                run(batch)
    finally:
        for h in handles:
            h.remove()
    for _, base in pairs:
        base.covariance_matrix = base.covariance_matrix / max(1, base.sample_count)
    view = _Targets(pairs)
    collect_eigens(view, cfg, verbose=False)
    crop_corda_eigens(view, cfg)
    for (_, base), (_, layer) in zip(pairs, layers, strict=True):
        for attr in ("covariance_matrix", "sample_count", "corda_method", "rank"):
            if hasattr(base, attr):
                delattr(base, attr)
        with kept_weight(layer):
            layer.corda_init(adapter, "corda")
        record_offset(layer, adapter)
    sync_base_offsets(model)


def _init_from_gradient(
    model: PeftModel,
    config: Any,
    init: str,
    run: Callable,
    batches: Sequence[Any],
    adapter: str,
    owner: nn.Module,
) -> None:
    """LoRA-GA (peft's ``lora_ga_init``) or LoRA-One from per-layer gradient sketches."""
    layers = lora_layers(model, adapter)
    linears = [(name, layer.get_base_layer()) for name, layer in layers]
    ranks = {}
    for name, layer in layers:
        shape = tuple(layer.get_base_layer().weight.shape)
        r = layer.r[adapter]
        ranks[name] = min(4 * r, min(shape)) if init == "lora_ga" else sketch_rank(r, shape)
    with model.disable_adapter():
        sketches, count = sketch_gradients(
            owner, linears, ranks, run, batches, embeddings=model.get_input_embeddings()
        )
    if init == "lora_one":
        lora_one = getattr(config, "lora_one_config", None) or LoraOneConfig()
        for name, layer in layers:
            apply_lora_one(layer, adapter, sketches[name], count, lora_one.gamma)
        return
    ga_config = getattr(config, "lora_ga_config", None) or peft.LoraGAConfig()
    with torch.no_grad():
        for name, layer in layers:
            U, S, Vh = sketches[name].factors(count)
            base = layer.get_base_layer()
            base._peft_loraga_grad = (U * S) @ Vh  # one layer's dense gradient at a time
            with kept_weight(layer):
                layer.lora_ga_init(adapter, ga_config)
            record_offset(layer, adapter)
    sync_base_offsets(model)


def _broadcast_from_rank0(model: nn.Module, adapter: str) -> None:
    """Give every rank rank 0's initialisation (each calibrated on its own data shard)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    for _, layer in lora_layers(model, adapter):
        for tensor in [*layer.parameters(), *layer.buffers()]:
            dist.broadcast(tensor.data, src=0)
    for layer in offset_layers(model):
        A, B = getattr(layer, OFFSET_A).float(), getattr(layer, OFFSET_B).float()
        layer._mmalign_offset_applied = (A.clone(), B.clone())


def training_batches(module: Any, count: int) -> list[Any]:
    """The first ``count`` training batches of ``module``'s trainer (pad batches skipped), on
    the trainer's root device; the datamodule's cached training pipeline is dropped afterwards,
    so training starts from a fresh one."""
    trainer = module.trainer
    dm = getattr(trainer, "datamodule", None)
    pipes = getattr(dm, "_pipelines", None)
    had_train = isinstance(pipes, dict) and "train" in pipes
    if dm is not None:
        loader: Iterable[Any] = dm.train_dataloader()
    else:
        loader = trainer.fit_loop._data_source.dataloader()
    batches: list[Any] = []
    iterator = iter(loader)
    try:
        for batch in iterator:
            if isinstance(batch, dict) and batch.get("pad"):
                continue
            batches.append(batch)
            if len(batches) >= count:
                break
    finally:
        del iterator
        if isinstance(pipes, dict) and not had_train:
            pipes.pop("train", None)
    device = trainer.strategy.root_device
    return [module.transfer_batch_to_device(b, device, 0) for b in batches]


def calibrate(module: Any, count: int) -> str | None:
    """``AlignmentModule.setup('fit')``: run the LLM adapter's pending data-driven
    initialisation over ``count`` training batches, through the real model forward and loss,
    before the optimizer is built. Returns what ran."""
    llm = module.model.llm
    if getattr(llm, "pending_init", None) is None:
        return None
    if count < 1:
        raise ValueError(
            f"init_lora_weights={llm.pending_init!r} needs a calibration pass: set "
            "model.adapter_init_batches >= 1"
        )
    trainer = module.trainer
    module.to(trainer.strategy.root_device)
    batches = training_batches(module, count)
    return initialize_adapter(
        llm,
        module.model,
        batches,
        owner=module,
        context=trainer.precision_plugin.forward_context,
    )
