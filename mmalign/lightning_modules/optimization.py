"""The optimizer step: token-mean gradients, projector warm-up, non-finite steps skipped.

Mixed into :class:`~mmalign.lightning_modules.alignment.AlignmentModule`, whose constructor sets
``projector_warmup_steps``, ``max_nonfinite_steps`` and the running counts read here.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

log = logging.getLogger(__name__)


class OptimizerStep:
    """What happens between the step's backward passes and the optimizer's update."""

    def _token_weighted(self) -> bool:
        """Whether the step's gradient is the mean over its target tokens (every strategy whose
        gradients mmalign sees: not DeepSpeed, which accumulates inside its engine)."""
        trainer = self._trainer
        return trainer is None or "DeepSpeed" not in type(trainer.strategy).__name__

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Make the gradient the mean over every target token of the optimizer step.

        Each micro-batch's loss is a token sum, which Lightning divides by
        ``accumulate_grad_batches`` and DDP/FSDP average over ranks; scaling by
        ``accumulate * world_size / tokens`` (tokens summed over micro-batches and ranks) turns
        that into the global token mean, so neither how the step was split into micro-batches
        nor a rank's pad batch changes it.
        """
        tokens, self._step_tokens = self._step_tokens, 0
        if self.global_step < self.projector_warmup_steps:  # AdamW skips a None gradient
            for p in self.model.llm.parameters():
                p.grad = None
        if not self._token_weighted():
            return
        grads = [p.grad for p in self.parameters() if p.requires_grad and p.grad is not None]
        if not grads:
            return
        trainer = self.trainer
        if trainer.world_size > 1:  # one collective (and one sync) per optimizer step
            count = torch.tensor(float(tokens), device=grads[0].device)
            tokens = int(trainer.strategy.reduce(count, reduce_op="sum").item())
        scale = trainer.accumulate_grad_batches * trainer.world_size / max(tokens, 1)
        torch._foreach_mul_(grads, scale)

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        """Skip the update when the loss or any gradient is not finite (all ranks agree).

        One fused norm over all gradients tells, so the check costs one device sync, not one per
        trainable tensor. A skipped step does not step the LR scheduler either (see
        :meth:`lr_scheduler_step`), so the schedule stays in step with the optimizer.
        """
        self._skipped_update = False
        if str(self.trainer.precision).startswith("16"):  # AMP's scaler skips such steps
            optimizer.step(closure=optimizer_closure)
            return
        if optimizer_closure is not None:
            optimizer_closure()
        grads = [p.grad for p in self.parameters() if p.requires_grad and p.grad is not None]
        finite = torch.as_tensor(self._loss_finite)
        if grads:
            norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
            finite = finite.to(norm.device) & torch.isfinite(norm)
        finite = bool(self.trainer.strategy.reduce_boolean_decision(bool(finite), all=True))
        self._loss_finite = True
        if finite:
            self._nonfinite_in_a_row = 0
            optimizer.step()
            return
        self._skipped_update = True
        self._step_tokens = 0
        optimizer.zero_grad(set_to_none=True)
        self._nonfinite_in_a_row += 1
        self._nonfinite_total += 1
        self.log("train/nonfinite_steps", float(self._nonfinite_total), rank_zero_only=True)
        log.warning(
            "step %d: non-finite loss or gradients, update skipped (%d in a row, %d in all)",
            self.global_step,
            self._nonfinite_in_a_row,
            self._nonfinite_total,
        )
        if self._nonfinite_in_a_row >= self.max_nonfinite_steps:
            raise FloatingPointError(
                f"{self._nonfinite_in_a_row} steps in a row had non-finite loss or gradients "
                f"(model.max_nonfinite_steps={self.max_nonfinite_steps}); lower the learning "
                "rate, check the data, or use bf16/fp32"
            )

    def lr_scheduler_step(self, scheduler: LRScheduler, metric: Any = None) -> None:
        """Lightning steps schedulers after every optimizer step; not after a skipped one."""
        if not self._skipped_update:
            super().lr_scheduler_step(scheduler, metric)
