"""Any peft tuner as the LLM's adapter: which configs train, start-up checks, construction.

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

Data-driven initialisations (``eva``, ``corda``, ``lora_ga``, ``lora_one``) run a calibration
pass at the start of ``mmalign fit`` (:mod:`mmalign.llm.calibration`); initialisations that move
part of the frozen weight into the adapter keep that offset in buffers that checkpoints and
exports account for (:mod:`mmalign.llm.offsets`).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import peft
from peft import PeftConfig, PeftModel, get_peft_model
from peft.utils.other import get_pattern_key
from torch import nn

from mmalign.llm.lora_one import LoraOneConfig
from mmalign.llm.offsets import add_offset_buffers, init_pissa_niter

DATA_INITS = ("eva", "corda", "lora_ga", "lora_one")
NATIVE_INITS = ("gaussian", "pissa", "olora", "orthogonal", "mica", "eva")
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
    initialisation still to run (for :func:`~mmalign.llm.calibration.calibrate`), if any."""
    check_adapter(adapter, model)
    init = init_of(adapter)
    peft_model = get_peft_model(model, to_peft(adapter))
    if moves_weights(init):
        add_offset_buffers(peft_model)
    if _niter(init):
        init_pissa_niter(peft_model, init)
    return peft_model, init if init in DATA_INITS else None


def config_from_dict(d: dict[str, Any]) -> PeftConfig:
    """Rebuild an adapter config written by ``describe``: mmalign's :class:`LoraConfig` when it
    has mmalign's settings (``lora_one_config``, an init peft's annotation omits), else peft's."""
    init = d.get("init_lora_weights")
    if "lora_one_config" in d or (isinstance(init, str) and managed(init)):
        names = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
        return LoraConfig(**{k: v for k, v in d.items() if k in names})
    return peft.get_peft_config(d)
