"""Lightning strategies set up for a SpeechLLM: FSDP that finds its own wrap policy.

DDP and DeepSpeed need nothing of ours (``trainer.strategy: ddp`` or ``deepspeed_stage_2``);
FSDP needs to know which modules to shard as units, which :class:`LLMFSDPStrategy` reads off
the model so that a YAML config never names a Python class of the LLM::

    trainer:
      strategy:
        class_path: mmalign.lightning_modules.strategies.LLMFSDPStrategy
        init_args:
          activation_checkpointing: true
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any, Literal

import torch
from lightning.pytorch.plugins.precision.fsdp import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

__all__ = ["LLMFSDPStrategy", "encoder_layer_classes", "llm_layer_classes", "no_split_classes"]


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


def _speech_llm(model: nn.Module) -> nn.Module | None:
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

    speech = _speech_llm(model)
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


def _clean(name: str) -> str:
    """A parameter name without FSDP's and the checkpoint wrapper's inserted module names
    (what FSDP's state dicts hold)."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


class _RootClipFSDPPrecision(FSDPPrecision):
    """``FSDPPrecision`` that clips gradients by norm through the root FSDP module.

    Lightning's plugin refuses ``gradient_clip_algorithm: norm`` under FSDP because it holds no
    reference to the root module (``torch.nn.utils.clip_grad_norm_`` would see only each rank's
    shard); :class:`LLMFSDPStrategy` hands it one, so configs with ``gradient_clip_val`` work.
    """

    root: Any = None

    def clip_grad_by_norm(self, optimizer: Any, clip_val: int | float) -> None:
        if self.root is None:
            super().clip_grad_by_norm(optimizer, clip_val)
            return
        self.root.clip_grad_norm_(clip_val)


class LLMFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` with a wrap policy taken from the model it is given.

    At setup, the FSDP units are the LLM's decoder layers (the classes its transformers model
    lists in ``_no_split_modules``: ``Qwen2DecoderLayer``, ``LlamaDecoderLayer``...) and, with
    ``wrap_encoders``, the encoders' layers (``WhisperEncoderLayer``; the largest repeated block
    for models that list none, e.g. WavLM and open_clip's ViT). Everything else (embeddings,
    final norm, LM head, projectors, and by default the encoders) forms the root unit, gathered
    once per step. So a config names no Python class.

    Every forward of an FSDP unit is a collective: all ranks must call the units equally often.
    The LLM is called the same number of times on every rank (``generate`` runs in step across
    ranks, as transformers does for FSDP-managed models), but encoder calls depend on the data:
    an encoder runs only for batches whose tasks need it (multitask data, modality dropout) and
    CLIP runs once per chunk of frames. Hence ``wrap_encoders`` is off by default; turn it on
    only for a model whose encoders run once per step on every rank (e.g. Whisper for ASR).

    ``use_orig_params=True`` is always on: without it FSDP flattens each unit's parameters into
    one ``FlatParameter`` whose ``requires_grad`` must be uniform, so a decoder layer holding
    frozen base weights beside trainable LoRA weights cannot be wrapped at all, and the optimizer
    would see flat parameters instead of the model's (``configure_optimizers`` picks parameters
    by ``requires_grad``). With it, the original parameters stay visible (as views into the flat
    ones), frozen and trainable ones can share a unit, and only trainable ones get gradients.

    FSDP also needs one dtype per unit. ``bf16-true`` casts the whole model to bfloat16 (trained
    weights and optimizer state too); with any other precision, a model whose frozen weights are
    half precision (``llm.dtype: bfloat16``) beside float32 projector and LoRA weights is cast to
    float32 before wrapping. That costs no memory per GPU beyond what sharding saves, and
    ``bf16-mixed`` still computes and all-gathers in bfloat16 (FSDP's ``MixedPrecision``), while
    the trained weights keep float32 masters.

    Checkpoints: ``state_dict_type: full`` (the default) gathers the state dict on rank 0 and
    writes one ``.ckpt`` file, from which ``AlignmentModule.on_save_checkpoint`` keeps only the
    trainable weights (the gather still visits every unit once, frozen ones included). A full
    checkpoint is read with ``weights_only=True`` before Lightning loads it. ``sharded`` writes a
    folder of per-rank shards; resuming from one loads only the keys it holds, so the trainable-
    only checkpoints load too (frozen weights come from the model's own source, as always).

    Gradient clipping by norm (``trainer.gradient_clip_val``) goes through the root module's
    ``clip_grad_norm_``, which Lightning's own FSDP plugin refuses.

    Args:
        wrap_encoders: also make the encoders' layers FSDP units, which saves the memory of
            the gathered encoder during the rest of the step; only for encoders that run the
            same number of times on every rank in every step (see above).
        activation_checkpointing: recompute the activations of the same layers in the
            backward pass, non-reentrant: the LLM's through transformers' own checkpointing
            (what ``model.llm.init_args.gradient_checkpointing: true`` turns on; either is
            enough), since its layers then leave the KV cache alone, which a recomputed layer
            would otherwise update twice; encoder layers with trainable parameters (LoRA)
            through Lightning's ``activation_checkpointing_policy``.
        auto_wrap_policy: an explicit FSDP policy (a set of classes or a callable); replaces the
            one read off the model.
        activation_checkpointing_policy: an explicit checkpointing policy, likewise.
        sharding_strategy: ``FULL_SHARD`` (default), ``SHARD_GRAD_OP``, ``NO_SHARD``,
            ``HYBRID_SHARD`` (shard within a node, replicate across nodes).
        state_dict_type: ``full`` (one file, default) or ``sharded`` (a folder).
        cpu_offload: keep sharded parameters and gradients in CPU memory.
        device_mesh: ``[replicas, shards]`` for ``HYBRID_SHARD`` (e.g. ``[num_nodes,
            devices]``); without it, hybrid sharding shards within each node.
        **kwargs: anything else ``FSDPStrategy`` or ``FullyShardedDataParallel`` takes
            (``limit_all_gathers``, ``forward_prefetch``, ``process_group_backend``,
            ``timeout``...).
    """

    def __init__(
        self,
        wrap_encoders: bool = False,
        activation_checkpointing: bool = False,
        auto_wrap_policy: Any = None,
        activation_checkpointing_policy: Any = None,
        sharding_strategy: str = "FULL_SHARD",
        state_dict_type: Literal["full", "sharded"] = "full",
        cpu_offload: bool = False,
        device_mesh: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> None:
        from torch.distributed.fsdp import ShardingStrategy

        if kwargs.pop("use_orig_params", True) is not True:
            raise ValueError(
                "LLMFSDPStrategy needs use_orig_params=True: frozen and trainable parameters "
                "share FSDP units (see the class docstring)"
            )
        sharding = (
            ShardingStrategy[sharding_strategy.upper()]
            if isinstance(sharding_strategy, str)
            else ShardingStrategy(sharding_strategy)
        )
        # Lightning refuses hybrid sharding without a policy, process groups or mesh at this
        # point; the policy comes at setup, and FSDP then builds the intra- and inter-node
        # groups itself (one node = the GPUs this node sees)
        deferred = "HYBRID" in sharding.name and auto_wrap_policy is None
        super().__init__(
            auto_wrap_policy=auto_wrap_policy,
            activation_checkpointing_policy=activation_checkpointing_policy,
            sharding_strategy="FULL_SHARD" if deferred else sharding,
            state_dict_type=state_dict_type,
            cpu_offload=cpu_offload,
            device_mesh=tuple(device_mesh) if device_mesh is not None else None,
            use_orig_params=True,
            **kwargs,
        )
        self.sharding_strategy = sharding
        self.wrap_encoders = wrap_encoders
        self.activation_checkpointing = activation_checkpointing
        self._user_wrap_policy = auto_wrap_policy is not None
        self._user_checkpoint_policy = activation_checkpointing_policy is not None
        self.wrapped_classes: set[type[nn.Module]] = set()
        self.checkpointed: set[str] = set()  # layer class names, after setup

    # -- precision: gradient clipping through the root module ------------------------------

    @property
    def precision_plugin(self) -> FSDPPrecision:
        return super().precision_plugin

    @precision_plugin.setter
    def precision_plugin(self, plugin: Any) -> None:
        if type(plugin) is FSDPPrecision:  # what Lightning builds from `trainer.precision`
            plugin = _RootClipFSDPPrecision(plugin.precision)
        FSDPStrategy.precision_plugin.fset(self, plugin)

    # -- wrapping ---------------------------------------------------------------------------

    def layer_classes(self, model: nn.Module) -> set[type[nn.Module]]:
        """The classes this strategy makes FSDP units of (and checkpoints, if asked)."""
        classes = llm_layer_classes(model)
        if not classes:
            raise ValueError(
                "LLMFSDPStrategy found no decoder-layer classes: the model holds no "
                "mmalign.llm.load.CausalLM whose transformers model lists _no_split_modules; "
                "give trainer.strategy.init_args.auto_wrap_policy explicitly"
            )
        if self.wrap_encoders:
            classes |= encoder_layer_classes(model)
        return classes

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        already = any(isinstance(m, FullyShardedDataParallel) for m in model.modules())
        if not already:
            classes = self.layer_classes(model)
            if not self._user_wrap_policy:
                self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(classes)
                self.wrapped_classes = classes
            if self.activation_checkpointing and not self._user_checkpoint_policy:
                self._setup_checkpointing(model)
            self._unify_dtypes(model)
            names = sorted(c.__name__ for c in self.wrapped_classes) or "(given policy)"
            rank_zero_info(
                f"LLMFSDPStrategy: FSDP units {names}"
                + (
                    f", activation checkpointing {sorted(self.checkpointed)}"
                    if self.checkpointed
                    else ""
                )
            )
        with warnings.catch_warnings():
            # FSDP warns for every unit mixing frozen and trainable parameters: a decoder
            # layer with LoRA always does, by design (see the class docstring)
            warnings.filterwarnings("ignore", message=".*has both parameters with requires_grad")
            if self.root_device.type == "cpu" and not already:
                wrapped = self._wrap_on_cpu(model)
            else:
                wrapped = super()._setup_model(model)
        plugin = self._precision_plugin
        if isinstance(plugin, _RootClipFSDPPrecision):
            plugin.root = wrapped
        return wrapped

    def _setup_checkpointing(self, model: nn.Module) -> None:
        """LLM layers: transformers' own (non-reentrant) checkpointing, which also keeps the KV
        cache out of the recomputation (a plain checkpoint wrapper would replay the cache
        update and double the keys). Encoder layers: Lightning's checkpoint wrapper, for the
        layer classes that hold trainable parameters (a frozen encoder runs without grad and
        keeps no activations)."""
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        from mmalign.encoders.base import Encoder
        from mmalign.llm.load import CausalLM, enable_checkpointing, is_checkpointing

        self._check_checkpointing_allowed(model)
        for llm in (m for m in model.modules() if isinstance(m, CausalLM)):
            base = llm.model.get_base_model() if hasattr(llm.model, "get_base_model") else llm.model
            if not is_checkpointing(base):
                enable_checkpointing(base)
            self.checkpointed |= {c.__name__ for c in llm_layer_classes(llm)}
        encoders = [m for m in model.modules() if isinstance(m, Encoder)]
        trained = {
            type(m)
            for enc in encoders
            for m in enc.modules()
            if type(m) in encoder_layer_classes(model)
            and any(p.requires_grad for p in m.parameters())
        }
        if trained:
            self._activation_checkpointing_kwargs = {"auto_wrap_policy": ModuleWrapPolicy(trained)}
            self.checkpointed |= {c.__name__ for c in trained}

    def _wrap_on_cpu(self, model: nn.Module) -> nn.Module:
        """Lightning's wrapping, with ``device_id=cpu``: Lightning passes the device *index*
        (None on CPU), from which FSDP concludes that it needs an accelerator and refuses."""
        from lightning.fabric.strategies.fsdp import (
            _move_torchmetrics_to_device,
            _setup_activation_checkpointing,
        )
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=self.root_device,
            **self.kwargs,
        )
        _move_torchmetrics_to_device(wrapped, self.root_device)
        _setup_activation_checkpointing(wrapped, self._activation_checkpointing_kwargs)
        return wrapped

    def _check_checkpointing_allowed(self, model: nn.Module) -> None:
        """Matryoshka training over all rates with per-rate adapters cannot recompute: the
        backward would rerun every rate's layers with the last rate's adapters active."""
        speech = _speech_llm(model)
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

    def _unify_dtypes(self, model: nn.Module) -> None:
        """One floating dtype per FSDP unit: under a non-``true`` precision, cast a model with
        mixed floating dtypes to float32 (``bf16-true`` has cast everything to bfloat16)."""
        dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
        if len(dtypes) <= 1:
            return
        rank_zero_info(
            f"LLMFSDPStrategy: parameters are {sorted(str(d) for d in dtypes)}; FSDP needs one "
            "dtype per unit, casting floating parameters to float32 (FSDP's mixed precision "
            "still computes in the precision's dtype)"
        )
        model.to(torch.float32)

    # -- checkpoints ------------------------------------------------------------------------

    def _full_state_dict_context(self, rank0_only: bool = True) -> Any:
        """FSDP's full state dict settings, offloading to CPU only from an accelerator: with
        the parameters already on CPU, ``offload_to_cpu`` frees the memory the gathered state
        dict points into, and cloning it segfaults (Lightning always offloads)."""
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.api import FullOptimStateDictConfig

        offload = self.root_device.type != "cpu"
        return FSDP.state_dict_type(
            module=self.model,
            state_dict_type=StateDictType.FULL_STATE_DICT,
            state_dict_config=FullStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
            optim_state_dict_config=FullOptimStateDictConfig(
                offload_to_cpu=offload, rank0_only=rank0_only
            ),
        )

    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self._state_dict_type != "full" or self.root_device.type != "cpu":
            return super().lightning_module_state_dict()
        assert self.model is not None
        with self._full_state_dict_context():
            return self.model.state_dict()

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        if self._state_dict_type != "full" or self.root_device.type != "cpu":
            return super().optimizer_state(optimizer)
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import OptimStateKeyType

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        assert self.model is not None
        with self._full_state_dict_context():
            state = FSDP.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:  # the standard (parameter id) layout, as Lightning does
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
            return state

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> Any:
        """Lightning's FSDP loading, with full checkpoints first read with ``weights_only=True``
        (Lightning's lazy loader unpickles anything) and sharded ones holding only the
        trainable weights loaded key by key."""
        from pathlib import Path

        from lightning.fabric.strategies.fsdp import _is_full_checkpoint, _is_sharded_checkpoint

        path = Path(self.broadcast(checkpoint_path))
        if _is_full_checkpoint(path):
            from mmalign.checkpoint_io import load_checkpoint_file

            stored = load_checkpoint_file(path).get("state_dict", {})  # weights_only
            self._check_keys(set(stored))
        elif _is_sharded_checkpoint(path):
            return self._load_sharded(path, weights_only)
        return super().load_checkpoint(path, weights_only=weights_only)

    def _check_keys(self, stored: set[str]) -> None:
        """What ``AlignmentModule.load_state_dict`` checks, which FSDP's loading bypasses: the
        checkpoint holds every trainable weight (frozen ones may be missing) and nothing else."""
        module = self.lightning_module
        assert module is not None
        params = {_clean(n): p for n, p in module.named_parameters()}
        known = set(params) | {_clean(n) for n, _ in module.named_buffers()}
        trainable = getattr(module, "trainable_names", None)
        wanted = (
            {_clean(n) for n in trainable()}
            if callable(trainable)
            else {n for n, p in params.items() if p.requires_grad}
        )
        missing, unexpected = sorted(wanted - stored), sorted(stored - known)
        if missing or unexpected:
            raise RuntimeError(
                "checkpoint does not match the model: missing trainable keys "
                f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected keys "
                f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )

    def _load_sharded(self, path: Any, weights_only: bool | None) -> Any:
        """Lightning's sharded load, restricted to the model keys the checkpoint holds.

        Lightning asks the distributed checkpoint for every key of the model, frozen weights
        included, which a trainable-only checkpoint lacks ("Missing key in checkpoint")."""
        from lightning.fabric.strategies.fsdp import (
            _METADATA_FILENAME,
            _get_sharded_state_dict_context,
        )
        from lightning.pytorch.trainer.states import TrainerFn
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint import load as dcp_load
        from torch.distributed.checkpoint.optimizer import load_sharded_optimizer_state_dict
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        assert self.model is not None and self.lightning_module is not None
        reader = FileSystemReader(path=path)
        stored = set(reader.read_metadata().state_dict_metadata)
        self._check_keys({k.removeprefix("model.") for k in stored if k.startswith("model.")})
        with _get_sharded_state_dict_context(self.model):
            full = self.model.state_dict()
            # the stored keys are read into `full`'s own tensors (in place); the others keep
            # the model's current (frozen) values, so the load below misses nothing
            model_state = {k: v for k, v in full.items() if f"model.{k}" in stored}
            dcp_load({"model": model_state}, storage_reader=reader)
            self.model.load_state_dict(full, strict=self.lightning_module.strict_loading)
            if self.lightning_module.trainer.state.fn == TrainerFn.FITTING and self.optimizers:
                for idx, optim in enumerate(self.optimizers):
                    key = f"optimizer_{idx}"
                    optim_state = load_sharded_optimizer_state_dict(
                        model_state_dict=model_state,
                        optimizer_key=key,
                        storage_reader=FileSystemReader(path=path),
                    )
                    optim.load_state_dict(
                        FSDP.optim_state_dict_to_load(
                            optim_state_dict=optim_state[key], model=self.model, optim=optim
                        )
                    )
        return torch.load(path / _METADATA_FILENAME, weights_only=True)


def _register() -> None:
    """``trainer.strategy: llm_fsdp`` (and ``llm_fsdp_activation_checkpointing``) once this
    module is imported, as Lightning's own names work."""
    from lightning.pytorch.strategies import StrategyRegistry

    StrategyRegistry.register(
        "llm_fsdp",
        LLMFSDPStrategy,
        description="FSDP with units read off a SpeechLLM (mmalign.lightning_modules.strategies)",
        override=True,
    )
    StrategyRegistry.register(
        "llm_fsdp_activation_checkpointing",
        LLMFSDPStrategy,
        description="llm_fsdp with activation checkpointing of the LLM's layers",
        override=True,
        activation_checkpointing=True,
    )


_register()
