"""Callbacks: an audit trail of what each training step saw, and a training clock."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L


class BatchLog(L.Callback):
    """Appends one JSON line per training batch to ``<dirpath>/rank<r>.jsonl``: step, epoch,
    batch index, sample keys, loss, and whether it was a padding batch.

    Lines are flushed as written, so the file survives a crash: it shows which samples a run
    consumed and in what order, e.g. to check that a resumed run repeats an uninterrupted one
    or that ranks read disjoint data.
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self._file: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.dirpath.mkdir(parents=True, exist_ok=True)
            self._file = open(self.dirpath / f"rank{trainer.global_rank}.jsonl", "a")

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._file is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        row = {
            "step": int(trainer.global_step),
            "epoch": int(trainer.current_epoch),
            "batch_idx": int(batch_idx),
            "keys": list(batch.get("keys", [])),
            "pad": bool(batch.get("pad", False)),
            "loss": None if loss is None else float(loss.detach().float().cpu()),
        }
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TrainClock(L.Callback):
    """Seconds spent in training batches (data loading included, validation excluded), kept in
    checkpoints so a resumed run counts on, and logged as ``time/train_minutes``.

    Convergence is a question of time as much as of steps: with this in every checkpoint, "how
    many CPU minutes to reach WER x" is read off the checkpoints (``bench/convergence.py``).
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self._last: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = time.perf_counter()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._tick()
        self._last = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        self._tick()
        pl_module.log("time/train_minutes", self.seconds / 60, rank_zero_only=True)

    def _tick(self) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.seconds += now - self._last
        self._last = now

    def state_dict(self) -> dict[str, float]:
        return {"seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.seconds = float(state_dict["seconds"])
