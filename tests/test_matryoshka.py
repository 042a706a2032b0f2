"""Matryoshka (multi-rate) models: projector, rate switching, LoRA strategies, export round trip."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import make_tiny_parts, tiny_batch

from mmalign.lightning_modules.alignment import AlignmentModule
from mmalign.llm.lora import STRATEGIES, adapter_names
from mmalign.model import SpeechLLM
from mmalign.projectors.compress import compressed_lengths
from mmalign.projectors.matryoshka import MatryoshkaProjector
from mmalign.projectors.mlp import MLPProjector

RATES = [2, 4, 8]


def parts(tokenizer_dir):
    return make_tiny_parts(tokenizer_dir)


def module(tokenizer_dir, strategy: str, **kwargs) -> AlignmentModule:
    encoder, llm = parts(tokenizer_dir)
    projector = functools.partial(MatryoshkaProjector, rates=RATES, hidden_dim=16)
    return AlignmentModule(encoder, projector, llm, lora_strategy=strategy, **kwargs)


def batch(n: int = 3, t: int = 48) -> dict:
    return tiny_batch(n, t, (0, 13, 22))


def lora_grads(model: SpeechLLM) -> dict[str, bool]:
    """Adapter name -> whether any of its parameters received a gradient."""
    got: dict[str, bool] = {}
    for name, p in model.llm.model.named_parameters():
        if "lora_" in name:
            adapter = name.split(".")[-2]
            got[adapter] = got.get(adapter, False) or p.grad is not None
    return got


def test_projector_rates_shapes_and_errors():
    x, lengths = torch.randn(2, 17, 6), torch.tensor([17, 9])
    proj = MatryoshkaProjector(6, 10, rates=[2, 4], hidden_dim=8)
    assert proj.rate == 2 and proj.init_config()["rates"] == [2, 4]
    for rate in (2, 4):
        proj.set_rate(rate)
        y, n = proj(x, lengths)
        assert y.shape == (2, -(-17 // rate), 10)
        assert torch.equal(n, compressed_lengths(lengths, rate))
        assert y[1, int(n[1]) :].abs().sum() == 0
    with pytest.raises(ValueError, match=r"rate 3 was not trained.*\[2, 4\]"):
        proj.set_rate(3)
    with pytest.raises(ValueError, match="rates must be distinct"):
        MatryoshkaProjector(6, 10, rates=[2, 2])
    with pytest.raises(ValueError, match="rate 8 is not one of its rates"):
        MatryoshkaProjector(6, 10, rates=[2, 4], rate=8)
    # shared: stack keeps a per-rate input layer (its width depends on the rate), avgpool none
    stack = MatryoshkaProjector(6, 10, rates=[2, 4], hidden_dim=8, shared=True)
    assert set(stack.first) == {"2", "4"} and set(stack.second) == {"shared"}
    pool = MatryoshkaProjector(6, 10, rates=[2, 4], mode="avgpool", hidden_dim=8, shared=True)
    assert set(pool.first) == set(pool.second) == {"shared"}
    rebuilt = MatryoshkaProjector(6, 10, **pool.init_config())
    assert rebuilt.load_state_dict(pool.state_dict()) is not None


def test_rate_changes_llm_input_length_exactly(tokenizer_dir):
    encoder, llm = parts(tokenizer_dir)
    model = SpeechLLM(encoder, MatryoshkaProjector(encoder.dim, llm.hidden_size, rates=RATES), llm)
    b = batch()
    _, frames = model.encode(b)["audio"]
    overhead = None
    for rate in RATES:
        model.projector.set_rate(rate)  # what `mmalign evaluate` calls
        tokens = model.splice_batch(b, train=False).attention_mask.sum(1)
        extra = tokens - compressed_lengths(frames, rate)
        overhead = extra if overhead is None else overhead
        assert torch.equal(extra, overhead), rate  # prompt + 2 boundaries, whatever the rate
    assert (overhead > 2).all()


@pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")  # a step without a Trainer
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_gradients_reach_only_active_adapters(tokenizer_dir, strategy):
    m = module(tokenizer_dir, strategy, rate_sampling="sample", rate_weights=[0, 1, 0])
    names = adapter_names(strategy, RATES)
    assert sorted(lora_grads(m.model)) == sorted(names)
    assert m.training_rates(0) == [4]
    m.training_step(batch(), 0).backward()
    active = {"default", "rate4"} & set(names)
    assert lora_grads(m.model) == {n: n in active for n in names}
    other = ("first.2.", "first.8.", "second.2.", "second.8.")
    for name, p in m.model.projector.named_parameters():  # other rates' MLPs stay untouched
        assert (p.grad is not None) == (not name.startswith(other)), name
    # every adapter stays trainable (in the optimizer and in checkpoints) whichever is active
    assert all(p.requires_grad for n, p in m.named_parameters() if "lora_" in n)
    m.zero_grad(set_to_none=True)
    m.rate_sampling = "all"
    m.training_step(batch(), 0).backward()
    assert all(lora_grads(m.model).values())
    assert all(p.grad is not None for p in m.model.projector.parameters())


def test_sample_mode_is_seeded_and_weighted(tokenizer_dir):
    m = module(tokenizer_dir, "shared", rate_sampling="sample", rate_weights=[1, 1, 0])
    draws = [m.training_rates(i)[0] for i in range(40)]
    assert draws == [m.training_rates(i)[0] for i in range(40)] and set(draws) == {2, 4}
    with pytest.raises(ValueError, match="rate_weights"):
        module(tokenizer_dir, "shared", rate_weights=[1, 1])
    with pytest.raises(ValueError, match="lora_strategy 'bogus'"):
        module(tokenizer_dir, "bogus")


@pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")  # a step without a Trainer
def test_encoder_runs_once_per_step_in_all_mode(tokenizer_dir, monkeypatch):
    m = module(tokenizer_dir, "shared+per_rate", rate_sampling="all", max_new_tokens=2)
    calls = []
    forward = m.model.encoder.forward
    monkeypatch.setattr(m.model.encoder, "forward", lambda *a: calls.append(1) or forward(*a))
    m.training_step(batch(), 0)
    assert len(calls) == 1
    m.validation_step(batch(), 0)  # loss and decoding at every rate, one encoder pass
    assert len(calls) == 2
    assert sorted({o["rate"] for o in m._outputs}) == RATES and len(m._outputs) == 3 * len(RATES)


@pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")  # a step without a Trainer
def test_single_rate_validation_encodes_once(tokenizer_dir, monkeypatch):
    encoder, llm = parts(tokenizer_dir)
    m = AlignmentModule(encoder, functools.partial(MLPProjector, rate=2), llm, max_new_tokens=2)
    calls = []
    forward = m.model.encoder.forward
    monkeypatch.setattr(m.model.encoder, "forward", lambda *a: calls.append(1) or forward(*a))
    m.validation_step(batch(), 0)  # the loss and the decoding share one encoder pass
    assert len(calls) == 1 and len(m._outputs) == 3


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_export_round_trip_per_strategy(tokenizer_dir, tmp_path, strategy):
    from mmalign.inference.export import CKPT_KEY, describe, export, load_exported

    m = module(tokenizer_dir, strategy)
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero: make every adapter do something distinct
        for name, p in m.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    ckpt = tmp_path / "m.ckpt"
    state = {k: v for k, v in m.state_dict().items() if k in m.trainable_names()}
    torch.save({CKPT_KEY: describe(m.model), "state_dict": state}, ckpt)
    out = export(ckpt, tmp_path / "export")
    for name in adapter_names(strategy, RATES):
        sub = out / "adapter" if name == "default" else out / "adapter" / name
        assert (sub / "adapter_config.json").is_file(), name
    torch.manual_seed(0)  # "random" tiny encoder/LLM: rebuild the same frozen weights
    loaded = load_exported(out)
    model = m.model.eval()
    b = batch()

    seen = []
    with torch.no_grad():
        for rate in RATES:
            model.set_rate(rate)
            # only the projector is told, as `mmalign evaluate` does: the loss and generate
            # calls must switch the adapters themselves (nothing here activates them)
            loaded.projector.set_rate(rate)
            before, after = model(b), loaded(b)
            torch.testing.assert_close(after, before)
            seen.append(before)
            assert model.generate(b, max_new_tokens=4) == loaded.generate(b, max_new_tokens=4)
    assert not torch.allclose(seen[0], seen[1])
    assert not any(p.requires_grad for n, p in loaded.named_parameters() if "lora_" in n)
