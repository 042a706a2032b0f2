"""Trainable weights only: what checkpoints carry, load back, and start a curriculum stage from.

Frozen encoder and LLM weights never reach a checkpoint; adapter initialisation offsets (see
:mod:`mmalign.llm.offsets`) do. Mixed into
:class:`~mmalign.lightning_modules.alignment.AlignmentModule`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mmalign.llm.offsets import OFFSET_A, OFFSET_B, offset_buffer_names, sync_base_offsets

OFFSET_SUFFIXES = (OFFSET_A, OFFSET_B)  # adapter init offsets (see mmalign.llm.offsets)


def _clean(name: str) -> str:
    """A parameter name without FSDP / activation-checkpoint wrapper parts (state dicts have
    none)."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


class TrainableWeights:
    """Checkpoint hooks of a module whose frozen parts never hit disk."""

    def load_trained(self, checkpoint: str, skip_lora: bool = False) -> list[str]:
        """Start from another run's trained weights (a curriculum stage): every trainable
        tensor of ``checkpoint`` must exist here with the same shape; optimizer, scheduler and
        step start afresh. ``skip_lora`` keeps this model's new LoRA (a fresh adapter)."""
        from mmalign.checkpoint_io import load_checkpoint_file

        ckpt = load_checkpoint_file(checkpoint)
        state = {
            k: v
            for k, v in ckpt["state_dict"].items()
            if not (skip_lora and ("lora_" in k or k.endswith(OFFSET_SUFFIXES)))
            and not (k.startswith("model.ctc.") and self.model.ctc is None)  # alignment done
        }
        own = dict(self.state_dict())
        trainable = self.trainable_names()
        unknown = [k for k in state if k not in own or k not in trainable]
        wrong = [
            f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}"
            for k, v in state.items()
            if k in own and v.shape != own[k].shape
        ]
        if unknown or wrong or not state:
            raise ValueError(
                f"model.init_from={checkpoint}: its weights do not fit this model "
                f"(not trainable here: {unknown[:3]}; shape mismatches: {wrong[:3]}"
                f"{'; nothing to load' if not state else ''})"
            )
        super().load_state_dict(state, strict=False)
        sync_base_offsets(self.model.llm)
        return sorted(state)

    def trainable_names(self) -> set[str]:
        """State-dict keys that a checkpoint carries: trainable parameters and projector buffers."""
        names = {_clean(n) for n, p in self.named_parameters() if p.requires_grad}
        names |= {f"model.projector.{n}" for n, _ in self.model.projector.named_buffers()}
        names |= {_clean(f"model.llm.{n}") for n in offset_buffer_names(self.model.llm)}
        if self.model.video_projector is not None:
            buffers = self.model.video_projector.named_buffers()
            names |= {f"model.video_projector.{n}" for n, _ in buffers}
        return names

    def num_trainable_parameters(self) -> int:
        """Counted before any strategy shards the parameters (FSDP would show one shard)."""
        if self._num_trainable is None:
            self._num_trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return self._num_trainable

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from mmalign.inference.export import CKPT_KEY, describe

        checkpoint[CKPT_KEY] = describe(self.model)  # plain JSON types: loads with weights_only
        keep = self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign=False):
        """Load trainable weights; every missing key must belong to a frozen part."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        sync_base_offsets(self.model.llm)  # frozen weights minus the loaded init offsets
        trainable = self.trainable_names()
        missing = [k for k in result.missing_keys if k in trainable]
        if missing or result.unexpected_keys:
            raise RuntimeError(
                "checkpoint does not match the model: missing trainable keys "
                f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected keys "
                f"{result.unexpected_keys[:5]}{'...' if len(result.unexpected_keys) > 5 else ''}"
            )
        return result
