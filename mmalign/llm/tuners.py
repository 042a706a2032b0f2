"""Any peft tuner as the LLM's adapter: start-up checks, data-driven initialisation, export.

``model.llm.init_args.adapter`` is a peft config given by ``class_path``. With peft 0.21.2 these
train, export and reload (tests/llm/test_tuners.py trains each, but the trivial ``false`` and
``gaussian`` inits, two steps on a tiny model and checks that ``mmalign export`` +
:func:`~mmalign.inference.export.load_exported` and
:func:`~mmalign.inference.export.load_checkpoint` give the trained logits):

- ``peft.LoraConfig``: LoRA, with ``use_dora`` (DoRA), ``use_rslora`` (rsLoRA),
  ``init_lora_weights`` ``true`` / ``false`` / ``gaussian`` / ``orthogonal`` / ``mica`` /
  ``pissa`` / ``olora`` (data-free; peft repeats them deterministically on reload) and ``eva`` /
  ``corda`` (data-driven, see below), and ``kasa_config`` (KaSA: in peft 0.21.2 ``KasaConfig`` is
  a sub-config of ``LoraConfig``, not a tuner class; mmalign trains it without KaSA's auxiliary
  regularisers, which peft leaves to the training loop as ``LoraModel._get_kasa_loss``).
- :class:`LoraConfig` (``class_path: mmalign.llm.tuners.LoraConfig``): peft's ``LoraConfig`` with
  ``init_lora_weights`` typed ``bool | str``. jsonargparse checks YAML values against peft's
  ``Literal`` annotation, which omits ``pissa_niter_<n>`` and ``lora_ga`` (both supported by
  peft's code), so those need this class; it also adds ``lora_one`` (:mod:`mmalign.llm.lora_one`,
  settings in ``lora_one_config``). LoRA-GA's settings are peft's ``lora_ga_config``
  (``LoraGAConfig``, like ``KasaConfig`` a sub-config, not a tuner class).
- ``peft.VeraConfig`` (VeRA), ``peft.RandLoraConfig`` (RandLoRA), ``peft.PveraConfig`` (PVeRA),
  ``peft.MissConfig`` (MiSS): tuner classes of their own (the VeRA family's frozen random
  projections come from ``projection_prng_key``, so a reload rebuilds them).
- ``peft.AdaptionPromptConfig`` (LLaMA-Adapter: learned key/value prompts behind a zero-init
  gate in the top layers' attention; peft supports Llama-like models only). Unlike the
  prompt-learning tuners it adds no positions to the sequence, so it trains with
  ``inputs_embeds`` and mmalign's masks.

Every tuner the issue names exists in peft 0.21.2 (``VeraConfig``, ``RandLoraConfig``,
``PveraConfig``, ``MissConfig`` as tuner classes; ``KasaConfig``, ``LoraGAConfig`` as
``LoraConfig`` sub-configs); :func:`peft_class` says clearly when an older peft lacks one.

Refused at start-up with the reason (:func:`check_adapter`): prompt-learning tuners (prefix
tuning, prompt tuning, p-tuning, multitask prompt tuning, CPT), which prepend virtual tokens or
a key/value prefix that mmalign's sequence layout and its fixed loss positions
(``logits_to_keep``) do not account for; ``XLoraConfig`` (a mixture of LoRA adapters trained
beforehand); ``init_lora_weights: loftq`` (needs bitsandbytes and CUDA, and replaces
the frozen weights with quantised ones that checkpoints never hold); a ``task_type`` other than
``CAUSAL_LM`` (unset means ``CAUSAL_LM``); ``target_modules`` naming modules the LLM does not
have (the error lists its Linear layer names).

Data-driven initialisations (``eva``, ``corda``, ``lora_ga``, ``lora_one``) need a calibration
pass: ``mmalign fit`` runs it in ``AlignmentModule.setup`` over the first
``model.adapter_init_batches`` training batches, before the optimizer exists (see
:func:`calibrate`). EVA and CorDA run forward passes with the adapter disabled and collect the
target layers' inputs; LoRA-GA and LoRA-One run forward and backward passes and sketch each
target's weight gradient one layer at a time (:mod:`mmalign.llm.lora_one`); every rank of a
multi-device run then takes rank 0's result.

Initialisations that move part of the frozen weight into the adapter (``W <- W - s B0 A0``:
``pissa_niter_<n>``, whose randomised SVD a reload would not repeat, ``corda`` and ``lora_ga``)
keep ``B0`` and ``A0`` as buffers of each LoRA layer (``init_offset_B`` / ``init_offset_A``,
saved in checkpoints with the trainable weights); loading them re-derives ``W - s B0 A0`` from the
original weights (:func:`sync_base_offsets`), and ``mmalign export`` writes the adapter as the
equivalent plain rank-``2r`` LoRA on the original weights (``[B, -B0] @ [A; A0]``, alpha scaled to
keep ``s``), as peft's own PiSSA-to-LoRA conversion does (:func:`convert_export`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.utils.other import get_pattern_key
from torch import nn

from mmalign.llm.lora_one import LoraOneConfig, apply_lora_one, sketch_gradients, sketch_rank

log = logging.getLogger(__name__)

DATA_INITS = ("eva", "corda", "lora_ga", "lora_one")
NATIVE_INITS = ("gaussian", "pissa", "olora", "orthogonal", "mica", "eva")
OFFSET_A, OFFSET_B = "init_offset_A", "init_offset_B"
PROMPT_LEARNING_HINT = (
    "it prepends virtual tokens or a key/value prefix, which mmalign's sequence layout (prompt, "
    "modality embeddings, target) and its fixed loss positions do not account for; use a "
    "tuner that adapts the LLM's Linear layers (LoRA, DoRA, VeRA, ...)"
)


@dataclass
class LoraConfig(peft.LoraConfig):
    """peft's ``LoraConfig`` with ``init_lora_weights`` typed ``bool | str`` and LoRA-One.

    Accepts every ``init_lora_weights`` peft 0.21.2 implements, including ``pissa_niter_<n>``
    and ``lora_ga`` that jsonargparse would refuse against peft's ``Literal`` annotation, plus
    ``lora_one`` (:mod:`mmalign.llm.lora_one`). peft itself receives a plain ``peft.LoraConfig``.
    """

    init_lora_weights: bool | str = field(
        default=True,
        metadata={  # peft's own metadata (its variant registry reads "lora_variants")
            **peft.LoraConfig.__dataclass_fields__["init_lora_weights"].metadata,
            "help": "peft's init_lora_weights values, 'pissa_niter_<n>', 'lora_ga' or 'lora_one'",
        },
    )
    lora_one_config: LoraOneConfig | None = field(
        default=None, metadata={"help": "LoRA-One settings (init_lora_weights: lora_one)"}
    )

    def __post_init__(self) -> None:
        if isinstance(self.lora_one_config, dict):
            self.lora_one_config = LoraOneConfig(**self.lora_one_config)
        _check_init(self)  # before peft's own checks (LoftQ: a missing scipy)
        super().__post_init__()


def peft_class(name: str) -> type:
    """The peft class ``name`` (e.g. ``PveraConfig``), or an ImportError naming the installed
    peft version when it lacks it."""
    cls = getattr(peft, name, None)
    if cls is None:
        raise ImportError(
            f"peft {peft.__version__} has no {name}; upgrade peft for this tuner "
            f"(or pick another: {sorted(n for n in dir(peft) if n.endswith('Config'))})"
        )
    return cls


def init_of(config: PeftConfig | None) -> Any:
    """The ``init_lora_weights`` of a LoRA config (None for other tuners)."""
    return getattr(config, "init_lora_weights", None) if _is_lora(config) else None


def _is_lora(config: Any) -> bool:
    return isinstance(config, peft.LoraConfig)


def _niter(init: Any) -> bool:
    return isinstance(init, str) and init.startswith("pissa_niter_")


def managed(init: Any) -> bool:
    """Whether mmalign runs this initialisation itself (peft builds the layers plainly)."""
    return init in ("corda", "lora_ga", "lora_one") or _niter(init)


def moves_weights(init: Any) -> bool:
    """Whether the initialisation subtracts ``s B0 A0`` from the frozen weights and mmalign
    keeps ``B0, A0`` (see the module docstring)."""
    return init in ("corda", "lora_ga") or _niter(init)


# ------------------------------------------------------------------------------------ checks


def linear_names(model: nn.Module) -> list[str]:
    """Distinct last name parts of the model's ``nn.Linear`` modules (what ``target_modules``
    entries usually are)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m) is nn.Linear})


def check_adapter(config: PeftConfig, model: nn.Module) -> None:
    """Refuse, with the reason, an adapter config mmalign cannot train on ``model`` (a plain
    transformers causal LM); sets an unset ``task_type`` to ``CAUSAL_LM``."""
    name = type(config).__name__
    if getattr(config, "is_prompt_learning", False):
        raise ValueError(f"adapter {name} is not supported: {PROMPT_LEARNING_HINT}")
    peft_type = str(getattr(config, "peft_type", "") or "")
    if peft_type.endswith("XLORA") or name == "XLoraConfig":
        raise ValueError(
            "adapter XLoraConfig is not supported: X-LoRA mixes LoRA adapters trained "
            "beforehand; train LoRA adapters with mmalign instead"
        )
    task = getattr(config, "task_type", None)
    if task is None:
        config.task_type = "CAUSAL_LM"
    elif str(getattr(task, "value", task)) != "CAUSAL_LM":
        raise ValueError(
            f"adapter task_type={getattr(task, 'value', task)!r}: mmalign trains a causal LM; "
            "set task_type: CAUSAL_LM or leave it unset"
        )
    _check_init(config)
    _check_targets(config, model)


def _check_init(config: Any) -> None:
    init = getattr(config, "init_lora_weights", None)
    if init is None or isinstance(init, bool):
        return
    if init == "loftq":
        raise ValueError(
            "init_lora_weights: loftq is not supported: LoftQ needs bitsandbytes and a CUDA "
            "device in peft, and replaces the frozen LLM weights with quantisation-aware ones "
            "that mmalign checkpoints never hold; use pissa (or QLoRA-style dtype) instead"
        )
    known = (*NATIVE_INITS, *DATA_INITS)
    if init not in known and not _niter(init):
        raise ValueError(
            f"init_lora_weights={init!r}: not one of true, false, {', '.join(known)} or "
            "pissa_niter_<n>"
        )
    if _niter(init) and not init.removeprefix("pissa_niter_").isdigit():
        raise ValueError(f"init_lora_weights={init!r}: pissa_niter_<n> needs an integer n")


def _check_targets(config: PeftConfig, model: nn.Module) -> None:
    targets = getattr(config, "target_modules", None)
    if targets is None or isinstance(targets, str):  # peft's defaults, a regex or all-linear
        return
    names = [n for n, _ in model.named_modules() if n]
    missing = [t for t in sorted(targets) if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(
            f"adapter target_modules {missing} match no module of the LLM; its Linear layers "
            f"are named {linear_names(model)}"
        )
    if not _is_lora(config):
        return
    # checked on the frozen model, before peft allocates: an r of 1e6 would take gigabytes
    # before failing in the allocator, and a rank above min(in, out) adds nothing
    patterns = dict(getattr(config, "rank_pattern", None) or {})
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if (
            weight is None
            or weight.dim() != 2
            or not any(name == t or name.endswith("." + t) for t in targets)
        ):
            continue
        r = patterns.get(get_pattern_key(patterns, name), config.r)
        if not 1 <= r <= min(weight.shape):
            raise ValueError(
                f"model.llm.init_args.adapter.init_args.r={r}: the rank must be between 1 and "
                f"min(in_features, out_features) = {min(weight.shape)} of target {name} "
                f"(weight {tuple(weight.shape)})"
            )


def check_strategy(llm: Any, lora_strategy: str) -> None:
    """Refuse per-rate adapters with an initialisation mmalign runs itself (one adapter)."""
    init = init_of(getattr(llm, "adapter", None))
    if lora_strategy != "shared" and (managed(init) or init in DATA_INITS):
        raise ValueError(
            f"init_lora_weights={init!r} initialises one adapter; lora_strategy "
            f"{lora_strategy!r} holds several: use lora_strategy 'shared'"
        )


# --------------------------------------------------------------------------- construction


def to_peft(config: PeftConfig) -> PeftConfig:
    """What peft receives: a plain peft config (mmalign-only fields dropped), with
    ``init_lora_weights: true`` when mmalign runs the initialisation itself."""
    init = init_of(config)
    if not isinstance(config, LoraConfig) and not managed(init):
        return config
    fields = {f.name for f in dataclasses.fields(peft.LoraConfig) if f.init}
    kwargs = {k: copy.deepcopy(getattr(config, k)) for k in fields if hasattr(config, k)}
    if managed(init):
        kwargs.update(init_lora_weights=True, corda_config=None, lora_ga_config=None)
    out = peft.LoraConfig(**kwargs)
    out.task_type = config.task_type
    return out


def attach_adapter(model: nn.Module, adapter: PeftConfig) -> tuple[PeftModel, str | None]:
    """Check ``adapter``, wrap ``model`` with it (adapter ``default``), run data-free
    initialisations mmalign manages; returns the peft model and the data-driven
    initialisation still to run (for :func:`calibrate`), if any."""
    check_adapter(adapter, model)
    init = init_of(adapter)
    peft_model = get_peft_model(model, to_peft(adapter))
    if moves_weights(init):
        add_offset_buffers(peft_model)
    if _niter(init):
        _init_pissa_niter(peft_model, init)
    return peft_model, init if init in DATA_INITS else None


def lora_layers(model: nn.Module, adapter: str = "default") -> list[tuple[str, nn.Module]]:
    """``(name in the plain model, peft LoRA layer)`` of each layer holding ``adapter``."""
    out = []
    for name, module in model.named_modules():
        lora_A = getattr(module, "lora_A", None)
        if isinstance(lora_A, nn.ModuleDict) and adapter in lora_A:
            out.append((name.removeprefix("base_model.model."), module))
    return out


# ------------------------------------------------------------------------------- offsets


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
def _kept_weight(layer: nn.Module) -> Iterator[None]:
    """Undo what a peft initialisation does to the frozen weight (mmalign applies the offset
    itself, the same way on a fresh run and on reload)."""
    weight = layer.get_base_layer().weight
    saved = weight.data.clone()
    try:
        yield
    finally:
        weight.data = saved


def _record_offset(layer: nn.Module, adapter: str) -> None:
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


def _init_pissa_niter(model: nn.Module, init: str, adapter: str = "default") -> None:
    for _, layer in lora_layers(model, adapter):
        with _kept_weight(layer):
            layer.pissa_init(adapter, init)
        _record_offset(layer, adapter)
    sync_base_offsets(model)


# ----------------------------------------------------------------------------- calibration


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
        with _kept_weight(layer):
            layer.corda_init(adapter, "corda")
        _record_offset(layer, adapter)
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
            with _kept_weight(layer):
                layer.lora_ga_init(adapter, ga_config)
            _record_offset(layer, adapter)
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


# ---------------------------------------------------------------------------------- export


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


def config_from_dict(d: dict[str, Any]) -> PeftConfig:
    """Rebuild an adapter config written by ``describe``: mmalign's :class:`LoraConfig` when it
    has mmalign's settings (``lora_one_config``, an init peft's annotation omits), else peft's."""
    init = d.get("init_lora_weights")
    if "lora_one_config" in d or (isinstance(init, str) and managed(init)):
        names = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
        return LoraConfig(**{k: v for k, v in d.items() if k in names})
    return peft.get_peft_config(d)
