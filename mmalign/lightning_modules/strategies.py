"""FSDP2 for a SpeechLLM: Lightning's ``ModelParallelStrategy`` that finds its own units.

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

import shutil
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from mmalign.lightning_modules.fsdp_units import (
    checkpoint_forward,
    checkpoint_layers,
    encoder_layer_classes,
    llm_layer_classes,
)

SHARDINGS = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD")
META = "meta.pt"  # a sharded checkpoint's non-tensor part (Lightning's name for it)
STEPS = ("training_step", "validation_step", "test_step", "predict_step")
# full, on rank 0, in CPU memory, trainable weights only: what a single-process checkpoint holds
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
SHARDED = StateDictOptions(ignore_frozen_params=True)


class LLMFSDPStrategy(ModelParallelStrategy):
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) with units read off the model.

    The units are the LLM's decoder layers (:mod:`~mmalign.lightning_modules.fsdp_units`) and,
    with ``wrap_encoders``, the encoders' layers; the rest (embeddings, LM head, projectors, by
    default the encoders) is the root unit: the LightningModule itself, whose step methods are
    FSDP forward methods, so it is gathered once per step and needs no ``configure_model``.
    Every forward of a unit is a collective, so all ranks must call it equally often: true of the
    LLM (``generate`` runs in step across ranks), not of encoders that run only for some tasks
    (multitask data, modality dropout) or per chunk (CLIP); ``wrap_encoders`` is for encoders
    that run once a step on every rank (Whisper for ASR).

    Each parameter is sharded on its own (a DTensor): frozen and LoRA weights share units, frozen
    ones keep their dtype and get no gradient; trainable ones of mixed dtypes are cast to float32.
    Precision is Lightning's plugin (``bf16-true`` casts the model before sharding, ``bf16-mixed``
    runs under autocast); clipping by norm is its ``torch.nn.utils.clip_grad_norm_``, whose norm
    over DTensor gradients is global.

    Checkpoints hold trainable weights only (``ignore_frozen_params``: frozen weights are never
    gathered). ``state_dict_type: full``: rank 0 writes one ``.ckpt`` through the trainer's
    checkpoint IO, laid out as in one process (optimizer state by parameter index), which
    resumes under any world size or none; ``sharded``: a folder of DCP shards plus ``meta.pt``.
    Weights are restored before sharding by the LightningModule's own ``load_state_dict``
    (which checks the keys), optimizer state after.

    Args:
        wrap_encoders: also make the encoders' layers FSDP units (see above).
        activation_checkpointing: recompute the same layers in backward, non-reentrant: the
            LLM's through transformers' own checkpointing (as ``model.llm.init_args.
            gradient_checkpointing: true``), which leaves the KV cache alone; encoder layers
            with trainable parameters through ``torch.utils.checkpoint`` around ``forward``.
        auto_wrap_policy: the units, explicitly (module classes, or ``module -> bool``).
        activation_checkpointing_policy: module classes to checkpoint, explicitly.
        sharding_strategy: ``FULL_SHARD`` (default), ``SHARD_GRAD_OP`` (stay gathered from
            forward to backward) or ``HYBRID_SHARD`` (shard within a node, replicate across).
        state_dict_type: ``full`` (one file, default) or ``sharded`` (a folder).
        cpu_offload: keep sharded parameters, gradients and the optimizer step in CPU memory.
        device_mesh: ``[replicas, shards]`` for ``HYBRID_SHARD`` (default ``[num_nodes,
            devices]``).
        process_group_backend, timeout: as for Lightning's ``ModelParallelStrategy``.
    """

    def __init__(
        self,
        wrap_encoders: bool = False,
        activation_checkpointing: bool = False,
        auto_wrap_policy: set[type[nn.Module]] | Callable[[nn.Module], bool] | None = None,
        activation_checkpointing_policy: set[type[nn.Module]] | None = None,
        sharding_strategy: str = "FULL_SHARD",
        state_dict_type: Literal["full", "sharded"] = "full",
        cpu_offload: bool = False,
        device_mesh: tuple[int, int] | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = None,
    ) -> None:
        sharding = sharding_strategy.upper()
        if sharding not in SHARDINGS:
            raise ValueError(
                f"sharding_strategy={sharding_strategy!r}: one of {SHARDINGS}"
                + ("; for no sharding use trainer.strategy: ddp" if sharding == "NO_SHARD" else "")
            )
        if device_mesh is not None and sharding != "HYBRID_SHARD":
            raise ValueError("device_mesh ([replicas, shards]) is for HYBRID_SHARD only")
        replicas, shards = tuple(device_mesh) if device_mesh is not None else ("auto", "auto")
        super().__init__(
            data_parallel_size=replicas,
            tensor_parallel_size=shards,
            save_distributed_checkpoint=state_dict_type == "sharded",
            process_group_backend=process_group_backend,
            **({"timeout": timeout} if timeout is not None else {}),
        )
        self.sharding_strategy = sharding
        self.device_mesh_shape = tuple(device_mesh) if device_mesh is not None else None
        self.state_dict_type = state_dict_type
        self.cpu_offload = cpu_offload
        self.wrap_encoders = wrap_encoders
        self.activation_checkpointing = activation_checkpointing
        self.auto_wrap_policy = auto_wrap_policy
        self.activation_checkpointing_policy = activation_checkpointing_policy
        self.wrapped_classes: set[type[nn.Module]] = set()
        self.checkpointed: set[str] = set()  # layer class names, after setup
        self._sharded_from: Path | None = None  # the sharded checkpoint being restored

    # -- Lightning's flow: weights restored before sharding, optimizer state after -----------

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return False

    @property
    def lightning_restore_optimizer(self) -> bool:
        return True

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}  # every rank: data

    def setup(self, trainer: Any) -> None:
        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        self.model = self.precision_plugin.convert_module(self.model)
        self.shard(self.model)
        self.model_to_device()  # buffers and anything not sharded
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    # -- sharding ---------------------------------------------------------------------------

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

    def shard(self, model: nn.Module) -> None:
        """``fully_shard`` each unit, innermost first, then ``model`` as the root unit."""
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            FSDPModule,
            OffloadPolicy,
            fully_shard,
            register_fsdp_forward_method,
        )

        if isinstance(model, FSDPModule):  # a second run of the same trainer
            return
        policy = self.auto_wrap_policy
        if policy is None:
            self.wrapped_classes = self.layer_classes(model)
            policy = self.wrapped_classes
        is_unit = policy if callable(policy) else lambda m: isinstance(m, tuple(policy))
        explicit = self.activation_checkpointing_policy
        if explicit is not None:
            self.checkpointed |= checkpoint_forward(model, set(explicit))
        elif self.activation_checkpointing:
            self._setup_checkpointing(model)
        self._unify_trainable_dtypes(model)
        names = sorted(c.__name__ for c in self.wrapped_classes) or "(given policy)"
        ckpt = sorted(self.checkpointed)
        rank_zero_info(
            f"LLMFSDPStrategy: FSDP units {names}"
            + (f", activation checkpointing {ckpt}" if ckpt else "")
        )
        offload = self.cpu_offload and self.root_device.type != "cpu"  # on CPU: there already
        options = {
            "mesh": self._mesh(),
            "reshard_after_forward": self.sharding_strategy != "SHARD_GRAD_OP",
            "offload_policy": CPUOffloadPolicy() if offload else OffloadPolicy(),
        }
        units = [m for m in model.modules() if m is not model and is_unit(m)]
        for unit in reversed(units):  # children before the modules holding them
            fully_shard(unit, **options)
        fully_shard(model, **options)
        for name in STEPS:  # the root's parameters are gathered for the whole step
            if hasattr(model, name):
                register_fsdp_forward_method(model, name)

    def _mesh(self) -> Any:
        """1-D over every rank, or Lightning's 2-D ``[replicas, shards]`` mesh for hybrid."""
        from torch.distributed import group
        from torch.distributed.device_mesh import DeviceMesh

        if self.sharding_strategy == "HYBRID_SHARD":
            return self.device_mesh
        return DeviceMesh.from_group(group.WORLD, self.root_device.type)

    def _setup_checkpointing(self, model: nn.Module) -> None:
        self.checkpointed |= checkpoint_layers(model)

    def _unify_trainable_dtypes(self, model: nn.Module) -> None:
        """FSDP2 reduces the gradients of a unit in one dtype: trainable parameters of several
        floating dtypes are cast to float32 (frozen ones keep theirs)."""
        trained = [p for p in model.parameters() if p.requires_grad and p.is_floating_point()]
        dtypes = {p.dtype for p in trained}
        if len(dtypes) > 1:
            rank_zero_info(
                f"LLMFSDPStrategy: trainable parameters are {sorted(map(str, dtypes))}; "
                "casting them to float32 (FSDP reduces a unit's gradients in one dtype)"
            )
            for p in trained:
                p.data = p.data.float()

    # -- checkpoints: trainable weights only, in the single-process layout -------------------

    def lightning_module_state_dict(self) -> dict[str, Any]:
        assert self.model is not None
        options = FULL if self.state_dict_type == "full" else SHARDED
        return get_model_state_dict(self.model, options=options)

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """Full: ``optimizer.state_dict()``'s own layout (parameters by index), on rank 0.
        Sharded: keyed by parameter name, as ``torch.distributed.checkpoint`` stores it."""
        optimizer = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer's own
        assert self.model is not None
        if self.state_dict_type == "sharded":
            return get_optimizer_state_dict(self.model, optimizer, options=SHARDED)
        state = get_optimizer_state_dict(self.model, optimizer, options=FULL)
        if not state:  # ranks other than 0
            return state
        index = {name: i for i, name in enumerate(self._param_names(optimizer))}
        return _renamed(state, index)

    def _param_names(self, optimizer: Any) -> list[str]:
        """The names of ``optimizer``'s parameters, in the order it numbers them."""
        assert self.model is not None
        names = {p: n for n, p in self.model.named_parameters()}
        return [names[p] for group in optimizer.param_groups for p in group["params"]]

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("LLMFSDPStrategy.save_checkpoint takes no storage_options")
        path = Path(self.broadcast(filepath))
        if self.state_dict_type == "full":
            if self.is_global_zero:
                if path.is_dir():
                    shutil.rmtree(path)
                self.checkpoint_io.save_checkpoint(checkpoint, path)
            return
        from torch.distributed.checkpoint import save

        state = {"model": checkpoint.pop("state_dict")}
        if "optimizer_states" in checkpoint:
            optimizers = checkpoint.pop("optimizer_states")
            state |= {f"optimizer_{i}": s for i, s in enumerate(optimizers)}
            checkpoint["optimizer_states"] = [f"optimizer_{i}" for i in range(len(optimizers))]
        if self.is_global_zero and path.is_file():
            path.unlink()
        self.barrier()
        path.mkdir(parents=True, exist_ok=True)
        save(state, checkpoint_id=path)
        if self.is_global_zero:
            self.checkpoint_io.save_checkpoint(checkpoint, path / META)
        self.barrier()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> Any:
        """A full checkpoint through the checkpoint IO (``weights_only``); a sharded one's
        model weights into plain tensors of the shapes it records, on every rank."""
        path = Path(self.broadcast(checkpoint_path))
        self._sharded_from = None
        if not path.is_dir():
            return self.checkpoint_io.load_checkpoint(path, weights_only=weights_only)
        from torch.distributed.checkpoint import FileSystemReader, load
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        stored = FileSystemReader(path).read_metadata().state_dict_metadata
        model = {
            key.removeprefix("model."): torch.empty(meta.size, dtype=meta.properties.dtype)
            for key, meta in stored.items()
            if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
        }
        load({"model": model}, checkpoint_id=path)
        self._sharded_from = path
        return {**self.checkpoint_io.load_checkpoint(path / META), "state_dict": model}

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """Before setup: the LightningModule's own ``load_state_dict``, as in one process."""
        from torch.distributed.fsdp import FSDPModule

        module = self.lightning_module
        assert module is not None
        if not isinstance(module, FSDPModule):
            module.load_state_dict(checkpoint["state_dict"], strict=strict)
            return
        options = StateDictOptions(full_state_dict=True, strict=False)  # already sharded
        set_model_state_dict(module, checkpoint["state_dict"], options=options)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        assert self.model is not None
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            if isinstance(state, str):  # a key of the sharded checkpoint being restored
                from torch.distributed.checkpoint import load

                assert self._sharded_from is not None
                into = {state: get_optimizer_state_dict(self.model, optimizer, options=SHARDED)}
                load(into, checkpoint_id=self._sharded_from)
                set_optimizer_state_dict(self.model, optimizer, into[state], options=SHARDED)
                continue
            names = dict(enumerate(self._param_names(optimizer)))
            options = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(self.model, optimizer, _renamed(state, names), options=options)


def _renamed(state: Mapping[str, Any], keys: Mapping[Any, Any]) -> dict[str, Any]:
    """An optimizer state dict with its parameter keys mapped through ``keys`` (names to
    indices, or back)."""
    return {
        "state": {keys[k]: v for k, v in state["state"].items()},
        "param_groups": [
            {**group, "params": [keys[k] for k in group["params"]]}
            for group in state["param_groups"]
        ],
    }


def _register() -> None:
    """``trainer.strategy: llm_fsdp`` (and ``llm_fsdp_activation_checkpointing``) once this
    module is imported, as Lightning's own names work."""
    from lightning.pytorch.strategies import StrategyRegistry

    StrategyRegistry.register(
        "llm_fsdp",
        LLMFSDPStrategy,
        description="FSDP2 with units read off a SpeechLLM (mmalign.lightning_modules.strategies)",
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
