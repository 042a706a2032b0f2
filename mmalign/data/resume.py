"""Exact resume of the training data: :class:`ExactResume`, the data module's checkpoint hooks.

Every training batch carries its loader position; the position of the last batch handed to the
model goes into each checkpoint (:meth:`ExactResume.state_dict`, from every rank), and a run
resumed from it replays the epoch's stream up to that point without computing features, so it
sees the same samples in the same order as an uninterrupted run.
"""

from __future__ import annotations

from typing import Any

import torch

from mmalign.data.pipeline import ShardPipeline


class ExactResume:
    """The training position hooks of a Lightning data module whose batch pipelines are in
    ``self._pipelines`` (split -> :class:`ShardPipeline`); call :meth:`_start_resume` in its
    ``__init__``."""

    _pipelines: dict[str, ShardPipeline]
    trainer: Any

    def _start_resume(self) -> None:
        self._train_epoch = 0
        self._resume: dict[str, Any] | None = None
        self._consumed: dict[str, Any] | None = None

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Remember the loader position of the training batch about to be used (for
        checkpoints); everything else passes untouched."""
        trainer = self.trainer
        if (
            trainer is not None
            and trainer.training
            and isinstance(batch, dict)
            and isinstance(batch.get("position"), dict)
        ):
            self._consumed = batch["position"]
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The training data position: the epoch to run next and, mid-epoch, every rank's loader
        state after its last consumed batch (gathered, so call it on all ranks, as Lightning
        does when it saves a checkpoint)."""
        pipe = self._pipelines.get("train")
        if pipe is None or not pipe.state.started:
            state: dict[str, Any] = {"train_epoch": self._train_epoch}
            if self._resume is not None:
                state["position"] = self._resume
            return state
        current = pipe.state.current
        mine = self._consumed if self._consumed and self._consumed["epoch"] == current else None
        if pipe.state.finished == current:
            return {"train_epoch": current + 1}
        ranks = _gather(mine)
        if all(r is None for r in ranks):
            return {"train_epoch": current}
        return {"train_epoch": current, "position": {"epoch": current, "ranks": ranks}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._train_epoch = int(state_dict.get("train_epoch", 0))
        self._resume = state_dict.get("position")
        if "train" in self._pipelines:
            self._apply_resume(self._pipelines["train"])

    def _apply_resume(self, pipe: ShardPipeline) -> None:
        pipe.set_epoch(self._train_epoch)
        pipe.state.resume = self._resume


def _gather(value: Any) -> list[Any]:
    """``value`` from every rank, in rank order (just ``[value]`` without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        values: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(values, value)
        return values
    return [value]
