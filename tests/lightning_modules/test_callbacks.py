"""TrainClock: training seconds only (validation excluded), carried across a resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from mmalign.lightning_modules import callbacks
from mmalign.lightning_modules.callbacks import TrainClock

NOW = [0.0]


class Timed(BoringModel):
    """Each training step takes 1 s on a fake clock, each validation step 100 s."""

    def training_step(self, batch, batch_idx):
        NOW[0] += 1.0
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        NOW[0] += 100.0
        return super().validation_step(batch, batch_idx)


def fit(clock: TrainClock, steps: int, tmp_path, ckpt_path=None) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        limit_train_batches=4,
        limit_val_batches=2,
        val_check_interval=2,
        callbacks=[clock],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    torch.manual_seed(0)
    trainer.fit(Timed(), ckpt_path=ckpt_path)
    return trainer


@pytest.fixture(autouse=True)
def fake_clock(monkeypatch):
    NOW[0] = 0.0
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: NOW[0])


def test_counts_training_not_validation(tmp_path):
    clock = TrainClock()
    fit(clock, 6, tmp_path)
    assert clock.seconds == 6.0  # 6 steps; 3 validations (600 s) left out


def test_resumed_run_counts_on(tmp_path):
    first = TrainClock()
    trainer = fit(first, 4, tmp_path)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    ckpt = torch.load(tmp_path / "half.ckpt", weights_only=True)
    assert ckpt["callbacks"]["TrainClock"] == {"seconds": 4.0}
    resumed = TrainClock()
    fit(resumed, 8, tmp_path, ckpt_path=str(tmp_path / "half.ckpt"))
    assert resumed.seconds == 8.0
