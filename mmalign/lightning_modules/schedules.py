"""Learning-rate schedules built over an optimizer and the run's total step count."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosine(LambdaLR):
    """Linear warmup then cosine decay to ``min_ratio`` of the base rate.

    ``total_steps`` is filled in by the module from ``trainer.estimated_stepping_batches``,
    so the YAML never repeats ``max_steps``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        warmup_steps: int = 100,
        min_ratio: float = 0.0,
    ) -> None:
        if warmup_steps < 0 or not 0.0 <= min_ratio <= 1.0:
            raise ValueError("warmup_steps must be >= 0 and min_ratio in [0, 1]")
        self.total_steps = max(int(total_steps), 1)
        self.warmup_steps = min(warmup_steps, self.total_steps)

        def factor(step: int) -> float:
            if step < self.warmup_steps:
                return (step + 1) / (self.warmup_steps + 1)
            span = max(self.total_steps - self.warmup_steps, 1)
            progress = min((step - self.warmup_steps) / span, 1.0)
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        super().__init__(optimizer, factor)
