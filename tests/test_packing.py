"""Packing several samples into one LLM row: same loss as unpacked, no attention across samples."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_parts, tiny_llm_config, tiny_model_section, tiny_whisper_config
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from mmalign.llm.prompt import (
    IGNORE_INDEX,
    attention_inputs,
    first_fit_decreasing,
    padding_efficiency,
    splice,
)
from mmalign.model import SpeechLLM
from mmalign.projectors.mlp import MLPProjector

TEXTS = ["one two three four five six", "three", "four five", "seven", "the quick brown fox"]
FRAMES = [240, 22, 36, 14, 60]  # log-mel frames (Whisper halves them, the projector halves again)


def make_model(tokenizer_dir, attn="sdpa", **kwargs):
    if attn == "sdpa":
        encoder, llm = make_tiny_parts(tokenizer_dir)
    else:
        from peft import LoraConfig

        from mmalign.encoders.whisper import WhisperEncoder
        from mmalign.llm.load import CausalLM

        torch.manual_seed(0)
        encoder = WhisperEncoder(source="random", config=tiny_whisper_config())
        llm = CausalLM(
            "random",
            adapter=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
            tokenizer=str(tokenizer_dir),
            config=tiny_llm_config(),
            attn_implementation=attn,
        )
    torch.manual_seed(1)
    projector = MLPProjector(encoder.dim, llm.hidden_size, rate=2)
    return SpeechLLM(encoder, projector, llm, **kwargs).eval()


def make_batch(seed=0, frames=FRAMES, texts=TEXTS, tasks=None):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(frames)
    return {
        "audio_features": torch.randn(len(frames), 80, max(frames), generator=g),
        "audio_lengths": lengths,
        "texts": list(texts),
        "task": list(tasks or ["asr"] * len(frames)),
        "durations": lengths / 100,
        "keys": [f"k{i}" for i in range(len(frames))],
    }


def packed_loss(model, s, impl):
    """Mean target-token cross-entropy of spliced ``s`` with the attention inputs of ``impl``."""
    logits = model.llm.model(inputs_embeds=s.inputs_embeds, **attention_inputs(s, impl)).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), s.labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


def sample_logits(model, s, impl="sdpa"):
    """Per-sample logits ``{batch index: [L_i, V]}`` of a packed ``s``."""
    logits = model.llm.model(inputs_embeds=s.inputs_embeds, **attention_inputs(s, impl)).logits
    return {int(i): logits[s.sequence_ids == i] for i in s.sequence_ids.unique() if i >= 0}


def test_first_fit_decreasing():
    rows = first_fit_decreasing([5, 9, 3, 4, 1, 9], capacity=10)
    assert rows == [[1, 4], [5], [0, 3], [2]]
    assert first_fit_decreasing([12, 3], capacity=10) == [[0], [1]]  # too long: a row alone


def test_splice_packs_rows_with_restarting_positions():
    def embed(ids):
        return ids[:, None].float().repeat(1, 4)

    heads, tails = [[5, 6], [7], [7]], [[8], [9, 9], [9]]
    targets = [[11, 12, 2], [13, 2], [2]]
    spans = [torch.full((3, 4), -1.0), torch.full((2, 4), -2.0), torch.full((1, 4), -3.0)]
    s = splice(embed, heads, spans, tails, targets, packing="rows", max_packed_tokens=12)
    # lengths 9, 7, 4 -> rows [0] and [1, 2] (7 + 4 = 11 <= 12)
    assert s.inputs_embeds.shape == (2, 11, 4)
    assert s.sequence_ids.tolist() == [[0] * 9 + [-1] * 2, [1] * 7 + [2] * 4]
    assert s.position_ids[1].tolist() == list(range(7)) + list(range(4))
    assert s.position_ids[0, 9:].tolist() == [0, 1]  # padding reads as a sequence of its own
    assert s.modality_start.tolist() == [2, 1, 8]
    assert torch.equal(s.inputs_embeds[1, 8], spans[2][0])
    assert s.labels[1].tolist() == [IGNORE_INDEX] * 5 + [13, 2] + [IGNORE_INDEX] * 3 + [2]
    assert padding_efficiency(s) == 20 / 22
    flat = splice(embed, heads, spans, tails, targets, packing="flat")
    assert flat.inputs_embeds.shape == (1, 20, 4) and padding_efficiency(flat) == 1.0


def test_packed_positions_give_transformers_the_sample_blocks():
    """Packed rows pass no mask: transformers builds the block-diagonal causal mask from the
    restarting positions, one block per sample and one for the padding run."""
    from transformers.masking_utils import find_packed_sequence_indices

    positions = torch.tensor([[0, 1, 0, 1, 0]])  # two samples of 2, then padding
    blocks = find_packed_sequence_indices(positions)
    assert torch.equal(blocks, torch.tensor([[0, 0, 1, 1, 2]]))


@pytest.fixture
def spliced(monkeypatch) -> list:
    """Every LLM input the model builds (so a test can see that packing really happened)."""
    import mmalign.model

    seen = []
    real = mmalign.model.splice

    def recording(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(mmalign.model, "splice", recording)
    return seen


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked(tokenizer_dir, attn, spliced):
    model = make_model(tokenizer_dir, attn)
    assert model.attn_implementation == attn
    batch = make_batch()
    with torch.no_grad():
        unpacked = model(batch)
        assert not spliced[-1].packed
        model.packing = True
        packed = model(batch)
        # the forward itself packed the batch into fewer rows
        assert spliced[-1].packed and spliced[-1].inputs_embeds.shape[0] < len(TEXTS)
        s = model.splice_batch(batch, train=True, packing="rows")
        plain = model.splice_batch(batch, train=True)
        # the test can fail: the same packed rows under a plain causal mask (attention
        # crossing samples, positions running on) give another loss
        crossing = F.cross_entropy(
            model.llm.model(
                inputs_embeds=s.inputs_embeds, attention_mask=s.attention_mask, use_cache=False
            )
            .logits[:, :-1]
            .flatten(0, 1),
            s.labels[:, 1:].flatten(),
            ignore_index=IGNORE_INDEX,
        )
    assert s.inputs_embeds.shape[0] < len(TEXTS)  # samples did share rows
    assert s.inputs_embeds.shape[1] == plain.inputs_embeds.shape[1]  # rows no longer
    assert padding_efficiency(s) > padding_efficiency(plain)
    torch.testing.assert_close(packed, unpacked, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(crossing, unpacked, rtol=1e-5, atol=1e-6)


def test_flash_varlen_inputs_match_transformers(tokenizer_dir):
    """The flat layout's varlen boundaries are those transformers derives from position ids,
    and the same inputs (no mask, restarting positions) give the unpacked loss under SDPA."""
    model = make_model(tokenizer_dir)
    batch = make_batch()
    with torch.no_grad():
        unpacked = model(batch)
        s = model.splice_batch(batch, train=True, packing="flat")
        kwargs = attention_inputs(s, "flash_attention_2")
        (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(s.position_ids)
        flat = packed_loss(model, s, "flash_attention_2")
    assert s.inputs_embeds.shape[0] == 1 and padding_efficiency(s) == 1.0
    assert kwargs["attention_mask"] is None
    assert torch.equal(kwargs["cu_seq_lens_q"], cu_q) and torch.equal(kwargs["cu_seq_lens_k"], cu_k)
    assert kwargs["max_length_q"] == int(max_q) == kwargs["max_length_k"]
    assert len(cu_q) == len(TEXTS) + 1
    torch.testing.assert_close(flat, unpacked, rtol=1e-5, atol=1e-6)


def test_rows_under_other_kernels_rely_on_position_ids(tokenizer_dir):
    """With no mask given, transformers' masking_utils builds the blocks from the restarting
    position ids (the path for attention kernels other than sdpa/eager)."""
    model = make_model(tokenizer_dir)
    batch = make_batch()
    with torch.no_grad():
        unpacked = model(batch)
        s = model.splice_batch(batch, train=True, packing="rows")
        assert attention_inputs(s, "flex_attention")["attention_mask"] is None
        loss = packed_loss(model, s, "flex_attention")  # the sdpa model, with no 4D mask
    torch.testing.assert_close(loss, unpacked, rtol=1e-5, atol=1e-6)


def test_packed_gradients_equal_unpacked(tokenizer_dir):
    model = make_model(tokenizer_dir)
    batch = make_batch()
    grads = []
    for packing in (False, True):
        model.zero_grad()
        model.packing = packing
        model(batch).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("change", ["audio", "prompt", "target"])
def test_attention_does_not_cross_samples(tokenizer_dir, change):
    """Changing sample 1 (its audio, its prompt or its transcript) leaves the logits of every
    other sample packed beside it unchanged, and does change its own."""
    model = make_model(
        tokenizer_dir,
        prompts={"asr2": "Please write out the speech you hear: {modality}"},
        task_modalities={"asr2": ["audio"]},
        max_packed_tokens=400,  # every sample in one row
    )
    base = make_batch()
    other = make_batch()
    if change == "audio":
        other["audio_features"][1] = torch.randn(80, max(FRAMES))
    elif change == "prompt":
        other["task"][1] = "asr2"
    else:
        other["texts"][1] = "hello world this is a tiny test"
    with torch.no_grad():
        a = model.splice_batch(base, train=True, packing="rows")
        b = model.splice_batch(other, train=True, packing="rows")
        assert a.inputs_embeds.shape[0] == b.inputs_embeds.shape[0] == 1
        la, lb = sample_logits(model, a), sample_logits(model, b)
    for i in range(len(TEXTS)):
        if i == 1:
            assert la[i].shape != lb[i].shape or not torch.allclose(la[i], lb[i], atol=1e-4)
        else:
            torch.testing.assert_close(lb[i], la[i], rtol=1e-5, atol=1e-5, msg=f"sample {i}")


def test_decoding_is_not_packed(tokenizer_dir):
    model = make_model(tokenizer_dir, packing=True)
    with pytest.raises(ValueError, match="packing is for training"):
        model.splice_batch(make_batch(), train=False, packing="rows")
    with pytest.raises(ValueError, match="max_packed_tokens"):
        make_model(tokenizer_dir, max_packed_tokens=0)


def fit_losses(tmp_path, tokenizer_dir, shards, name, model_args, data_args):
    """Train 3 steps through the CLI; the logged ``train/loss`` of each step."""
    import csv

    import yaml

    from mmalign.cli import cli_main

    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 3,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_checkpointing": False,
            "default_root_dir": str(tmp_path / name),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp_path / name), "name": "logs"},
            },
        },
        "model": {
            **tiny_model_section(tokenizer_dir),
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2}},
            **model_args,
        },
        "data": {"train": str(shards), "max_batch_seconds": 4.0, **data_args},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = cli_main(["fit", "--config", str(path)])
    assert cli.model.model.packing == bool(model_args.get("packing"))
    with open(Path(cli.trainer.logger.log_dir) / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def test_cli_fit_with_packing_trains_like_unpacked(tmp_path, tokenizer_dir, tone_shards, spliced):
    """``model.packing`` and ``data.max_batch_tokens`` through the real CLI: the same losses
    as an unpacked run, step after step (the gradients are the same too)."""
    data = {"max_batch_tokens": 400, "llm_tokens_per_second": 12.5, "llm_prompt_tokens": 20}
    plain = fit_losses(tmp_path, tokenizer_dir, tone_shards, "plain", {}, data)
    assert spliced and not any(s.packed for s in spliced)
    spliced.clear()
    packing = {"packing": True, "max_packed_tokens": 512}  # a batch in one or two rows
    packed = fit_losses(tmp_path, tokenizer_dir, tone_shards, "packed", packing, data)
    assert len(plain) == len(packed) == 3
    assert packed == pytest.approx(plain, rel=1e-4)
    # training steps ran packed: several samples shared a row
    rows = [(s.inputs_embeds.shape[0], len(s.modality_start)) for s in spliced if s.packed]
    assert len(rows) >= 3 and all(r < n for r, n in rows)
