"""The alignment schedule: CTC-only steps, projector-only warm-up, CTC as an auxiliary loss."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from conftest import make_tiny_parts, tiny_batch, write_config
from torch.utils.data import DataLoader

from mmalign.lightning_modules.alignment import AlignmentModule
from mmalign.lightning_modules.schedules import WarmupCosine
from mmalign.projectors.mlp import MLPProjector

pytestmark = pytest.mark.filterwarnings(
    "ignore:You defined a `validation_step` but have no `val_dataloader`"
)


def batches() -> list[dict]:
    torch.manual_seed(1)
    return [tiny_batch(t=80), tiny_batch(t=64)]  # one epoch = two steps


def module(tokenizer_dir, **kwargs) -> AlignmentModule:
    encoder, llm = make_tiny_parts(tokenizer_dir)
    torch.manual_seed(0)
    return AlignmentModule(
        encoder,
        functools.partial(MLPProjector, rate=2),
        llm,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
        **kwargs,
    )


def fit(m: AlignmentModule, steps: int, tmp_path=None, ckpt_path=None, **limits) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        **limits,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(m, train_dataloaders=DataLoader(batches(), batch_size=None), ckpt_path=ckpt_path)
    return trainer


def trained(m: AlignmentModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}


def changed(before: dict, after: dict, part: str) -> bool:
    return any(not torch.equal(before[n], after[n]) for n in before if part in n)


def test_weights_follow_the_step():
    m = AlignmentModule.__new__(AlignmentModule)
    m.ctc_only_steps, m.ctc_weight = 3, 0.25
    assert [m.loss_weights(s) for s in (0, 2, 3, 9)] == [(0, 1), (0, 1), (1, 0.25), (1, 0.25)]


def test_ctc_only_steps_never_run_the_llm_then_train_lora(tokenizer_dir, monkeypatch):
    m = module(tokenizer_dir, ctc_only_steps=2)
    start = trained(m)
    calls = []
    forward = type(m.model).forward
    monkeypatch.setattr(
        type(m.model), "forward", lambda *a, **k: calls.append(1) or forward(*a, **k)
    )
    fit(m, 2)
    after_ctc = trained(m)
    assert not calls  # no LLM pass in the CTC stage
    assert changed(start, after_ctc, "projector") and changed(start, after_ctc, "model.ctc.")
    assert not changed(start, after_ctc, "lora_")
    fit(m, 4)
    assert calls and changed(after_ctc, trained(m), "lora_")


def test_projector_warmup_keeps_lora_still(tokenizer_dir):
    m = module(tokenizer_dir, projector_warmup_steps=2)
    start = trained(m)
    fit(m, 2)
    warm = trained(m)
    assert changed(start, warm, "projector") and not changed(start, warm, "lora_")
    fit(m, 4)
    assert changed(warm, trained(m), "lora_")


def test_ctc_weight_adds_the_auxiliary_gradient(tokenizer_dir):
    plain, aux = module(tokenizer_dir), module(tokenizer_dir, ctc_weight=0.5)
    assert plain.model.ctc is None and aux.model.ctc is not None
    fit(plain, 1)
    fit(aux, 1)
    a, b = trained(plain), trained(aux)
    assert changed({n: a[n] for n in a}, {n: b[n] for n in a}, "projector")


def test_schedule_resumes_exactly(tmp_path, tokenizer_dir, tone_shards):
    """Two steps, stop, resume to four (crossing the CTC stage and the warm-up) = four straight."""
    from mmalign.cli import cli_main

    def run(name: str, steps: int, *extra: str) -> dict[str, torch.Tensor]:
        (tmp_path / name).mkdir(exist_ok=True)
        config = write_config(tmp_path / name, tokenizer_dir, tone_shards)
        schedule = ["--model.ctc_only_steps", "1", "--model.projector_warmup_steps", "3"]
        schedule += ["--model.ctc_weight", "0.5", "--model.scheduler", "null"]
        args = ["fit", "--config", str(config), "--trainer.max_steps", str(steps), *schedule]
        cli_main([*args, "--trainer.limit_val_batches", "0", *extra])
        last = torch.load(tmp_path / name / "ckpt" / "last.ckpt", weights_only=True)
        assert last["global_step"] == steps
        return last["state_dict"]

    straight = run("straight", 4)
    run("resumed", 2)
    resumed = run("resumed", 4, "--ckpt_path", "last")
    assert any("model.ctc." in k for k in straight) and straight.keys() == resumed.keys()
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)


def test_each_stage_gets_the_whole_lr_schedule(tokenizer_dir):
    """LoRA learns only after the CTC stage, so the schedule restarts there, warm-up and all;
    one schedule over both stages would start LoRA at an already decayed rate."""
    m = module(
        tokenizer_dir, ctc_only_steps=2, scheduler=functools.partial(WarmupCosine, warmup_steps=1)
    )
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, *_):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    fit(m, 5, callbacks=[Record()])
    # stage 1 (2 steps): warm-up, peak; stage 2 (3 steps): warm-up, peak, half-way down
    assert seen == pytest.approx([f * 1e-2 for f in (0.5, 1.0, 0.5, 1.0, 0.5)])


def test_bad_schedule_fails_at_construction(tokenizer_dir):
    with pytest.raises(ValueError, match="ctc_only_steps"):
        module(tokenizer_dir, ctc_only_steps=-1)
    with pytest.raises(ValueError, match="ctc_weight"):
        module(tokenizer_dir, ctc_weight=float("nan"))


def test_validation_logs_the_ctc_heads_own_wer(tokenizer_dir):
    m = module(tokenizer_dir, ctc_only_steps=1)
    m.max_new_tokens = 2
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    (metrics,) = trainer.validate(m, DataLoader(batches(), batch_size=None))
    assert "val/ctc_wer" in metrics and metrics["val/ctc_wer"] >= 0
    texts = m.model.ctc_transcribe(batches()[0])
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)


def test_shrinking_model_exports_its_ctc_head_and_decodes_the_same(tokenizer_dir, tmp_path):
    from mmalign.inference.export import CTC_FILE, export, load_exported

    m = module(tokenizer_dir, ctc_only_steps=1, ctc_weight=0.5, ctc_shrink=True)
    trainer = fit(m, 2, tmp_path)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    out = export(tmp_path / "m.ckpt", tmp_path / "export")
    assert (out / CTC_FILE).is_file()
    torch.manual_seed(0)  # the tiny encoder and LLM are random: rebuild the same frozen weights
    loaded = load_exported(out)
    assert loaded.ctc_shrink and loaded.ctc is not None
    for name, value in m.model.ctc.state_dict().items():
        torch.testing.assert_close(loaded.ctc.state_dict()[name], value)
    batch = batches()[0]
    m.model.eval()
    assert loaded.generate(batch, max_new_tokens=4) == m.model.generate(batch, max_new_tokens=4)
