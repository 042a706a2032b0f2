"""Callbacks: an audit trail of what each training step saw."""

from __future__ import annotations

import json
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
