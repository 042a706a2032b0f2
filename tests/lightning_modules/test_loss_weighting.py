"""The step's gradient is the mean over its target tokens, however the step is split up."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from conftest import make_tiny_parts
from torch.utils.data import DataLoader

from mmalign.lightning_modules.alignment import AlignmentModule
from mmalign.projectors.mlp import MLPProjector

TEXTS = ["one two three four five six seven eight", "nine", "oh two"]


def whole_batch() -> dict:
    torch.manual_seed(3)
    lengths = torch.tensor([48, 30, 40])
    return {
        "audio_features": torch.randn(3, 80, 48),
        "audio_lengths": lengths,
        "texts": TEXTS,
        "task": ["asr"] * 3,
        "durations": lengths / 100,
        "keys": ["a", "b", "c"],
    }


def part(batch: dict, idx: list[int]) -> dict:
    frames = int(batch["audio_lengths"][idx].max())
    out = {k: [batch[k][i] for i in idx] for k in ("texts", "task", "keys")}
    out["audio_features"] = batch["audio_features"][idx, :, :frames]
    out["audio_lengths"] = batch["audio_lengths"][idx]
    out["durations"] = batch["durations"][idx]
    return out


def one_step_gradient(
    tokenizer_dir, batches: list[dict], **trainer_kwargs
) -> dict[str, torch.Tensor]:
    """The gradient of one optimizer step over ``batches`` (accumulated, or one per rank with
    ``strategy="ddp_spawn"``): SGD with lr 1, so the update is the gradient."""
    encoder, llm = make_tiny_parts(tokenizer_dir)
    torch.manual_seed(0)
    module = AlignmentModule(
        encoder,
        functools.partial(MLPProjector, rate=2),
        llm,
        optimizer=functools.partial(torch.optim.SGD, lr=1.0),
    )
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        accumulate_grad_batches=1 if trainer_kwargs else len(batches),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))  # as they are
    return {n: before[n] - p.detach() for n, p in module.named_parameters() if n in before}


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_accumulated_micro_batches_of_unequal_tokens_equal_one_batch(tokenizer_dir):
    batch = whole_batch()
    one = one_step_gradient(tokenizer_dir, [batch])
    split = one_step_gradient(tokenizer_dir, [part(batch, [0]), part(batch, [1, 2])])
    assert any(g.abs().sum() > 0 for g in one.values())
    for name, grad in one.items():
        torch.testing.assert_close(split[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_two_rank_ddp_equals_one_batch(tokenizer_dir):
    """Two gloo ranks with 9 and 4 target tokens: the step's gradient is the global token mean."""
    batch = whole_batch()
    one = one_step_gradient(tokenizer_dir, [batch])
    ddp = one_step_gradient(
        tokenizer_dir, [part(batch, [0]), part(batch, [1, 2])], strategy="ddp_spawn", devices=2
    )
    for name, grad in one.items():
        torch.testing.assert_close(ddp[name], grad, rtol=1e-4, atol=1e-6, msg=name)
