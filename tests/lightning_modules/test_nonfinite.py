"""Steps with a non-finite loss are skipped (no update) and counted; too many in a row stop."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import tiny_model_section

from mmalign.cli import cli_main


def _cli(tmp: Path, tokenizer_dir: Path, shards: Path, max_steps: int, patience: int):
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_steps": max_steps,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp),
        },
        "model": {
            **tiny_model_section(tokenizer_dir),
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2}},
            "scheduler": {
                "class_path": "mmalign.lightning_modules.schedules.WarmupCosine",
                "init_args": {"warmup_steps": 2},
            },
            "max_nonfinite_steps": patience,
        },
        "data": {"train": str(shards), "max_batch_seconds": 2.0, "max_skip_rate": None},
    }
    (tmp / "c.yaml").write_text(yaml.safe_dump(cfg))
    return cli_main(["--config", str(tmp / "c.yaml")], run=False)


class _Poison(L.Callback):
    """Makes the loss (or, with ``grads``, one gradient only) NaN at chosen steps and records
    the trainable weights after each."""

    def __init__(self, module: L.LightningModule, steps: set[int], grads: bool = False) -> None:
        self.steps, self.after = steps, []
        forward = module.model.forward

        def poisoned(batch, *a, **kw):
            loss = forward(batch, *a, **kw)
            if module.global_step not in self.steps:
                return loss
            if not grads:
                return loss * float("nan")
            param = next(p for p in module.parameters() if p.requires_grad)

            def nan_once(grad):  # finite loss, one NaN gradient, this step only
                handle.remove()
                return grad * float("nan")

            handle = param.register_hook(nan_once)
            return loss

        module.model.forward = poisoned

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.after.append(
            {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
        )


@pytest.mark.filterwarnings("ignore:Total length of .* across ranks is zero")  # no val data
@pytest.mark.parametrize("grads", [False, True], ids=["loss", "gradient"])
def test_nonfinite_steps_are_skipped_and_counted(
    tmp_path, tokenizer_dir, tone_shards, grads
) -> None:
    cli = _cli(tmp_path, tokenizer_dir, tone_shards, max_steps=5, patience=3)
    poison = _Poison(cli.model, {1, 2}, grads=grads)  # the 2nd and 3rd steps
    cli.trainer.callbacks.append(poison)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 5
    assert cli.model._nonfinite_total == 2
    w = poison.after
    unchanged = [all(torch.equal(w[i][n], w[i - 1][n]) for n in w[i]) for i in range(1, 5)]
    assert unchanged == [True, True, False, False]  # skipped, skipped, trained, trained
    assert all(torch.isfinite(p).all() for p in w[-1].values())
    # the LR schedule stays in step with the updates actually made (3 of 5)
    optimizer = cli.trainer.optimizers[0]
    updates = {int(s["step"]) for s in optimizer.state.values()}
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    assert updates == {3} and scheduler.last_epoch == 3


@pytest.mark.filterwarnings("ignore:Total length of .* across ranks is zero")  # no val data
def test_too_many_nonfinite_steps_in_a_row_stop(tmp_path, tokenizer_dir, tone_shards) -> None:
    cli = _cli(tmp_path, tokenizer_dir, tone_shards, max_steps=6, patience=2)
    cli.trainer.callbacks.append(_Poison(cli.model, {1, 2, 3}))
    with pytest.raises(FloatingPointError, match="2 steps in a row.*max_nonfinite_steps=2"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
