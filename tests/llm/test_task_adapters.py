"""Task-specific adapters (per-sample routing) and prompt-aware adapter scaling on tiny models."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    make_tiny_parts,
    tiny_batch,
    tiny_llm_config,
    tiny_model_section,
    tiny_whisper_config,
    write_translation_shards,
)
from peft import LoraConfig

from mmalign.llm.scaling import DeltaScale, tuner_layers
from mmalign.model import SpeechLLM
from mmalign.projectors.mlp import MLPProjector

ROUTES = {"asr": "speech", "st": "translation"}


def model_with(tokenizer_dir, **kwargs) -> SpeechLLM:
    encoder, llm = make_tiny_parts(tokenizer_dir)
    projector = MLPProjector(encoder.dim, llm.hidden_size, rate=2, hidden_dim=16)
    return SpeechLLM(encoder, projector, llm, **kwargs)


def batch(tasks: list[str]) -> dict:
    b = tiny_batch(len(tasks))
    b["task"] = tasks
    b["meta"] = [{"target_lang": "de"} if t == "st" else {} for t in tasks]
    return b


def subset(b: dict, idx: list[int]) -> dict:
    n = len(b["texts"])
    return {
        k: (v[idx] if isinstance(v, torch.Tensor) else [v[i] for i in idx])
        if (isinstance(v, torch.Tensor | list) and len(v) == n)
        else v
        for k, v in b.items()
    }


def perturb_lora_b(model: SpeechLLM, seed: int = 0) -> None:
    """LoRA's B starts at zero; give every B weights so each adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.llm.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


def lora_grads(model: SpeechLLM, adapter: str) -> list[torch.Tensor | None]:
    return [p.grad for n, p in model.llm.model.named_parameters() if f".{adapter}." in n]


def target_tokens(model: SpeechLLM, b: dict) -> int:
    return sum(len(model.prompt.target(t)) for t in b["texts"])


# ------------------------------------------------------------------------ task adapters


def test_per_sample_routing_trains_only_the_samples_adapters(tokenizer_dir):
    model = model_with(tokenizer_dir, task_adapters=ROUTES)
    assert set(model.llm.model.peft_config) == {"speech", "translation"}  # no ``default``
    perturb_lora_b(model)
    # a batch of ASR samples only: the translation adapter takes no part (grad None)
    model(batch(["asr", "asr", "asr"])).backward()
    assert all(g is not None and g.abs().sum() > 0 for g in lora_grads(model, "speech")[1::2])
    assert all(g is None for g in lora_grads(model, "translation"))
    model.zero_grad(set_to_none=True)
    model(batch(["st", "st"])).backward()
    assert all(g is None for g in lora_grads(model, "speech"))
    assert all(g is not None for g in lora_grads(model, "translation"))
    # a mixed batch trains both, and every adapter keeps requires_grad
    model.zero_grad(set_to_none=True)
    model(batch(["asr", "st", "asr"])).backward()
    for name in ("speech", "translation"):
        assert all(g is not None and g.abs().sum() > 0 for g in lora_grads(model, name)[1::2])
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_mixed_batch_loss_is_the_token_weighted_mean_of_group_losses(tokenizer_dir):
    model = model_with(tokenizer_dir, task_adapters=ROUTES).eval()
    perturb_lora_b(model)
    mixed = batch(["asr", "st", "asr"])
    asr, st = subset(mixed, [0, 2]), subset(mixed, [1])
    n_asr, n_st = target_tokens(model, asr), target_tokens(model, st)
    with torch.no_grad():
        expected = (model(asr) * n_asr + model(st) * n_st) / (n_asr + n_st)
        torch.testing.assert_close(model(mixed), expected)
        asr_before, st_before = model(asr), model(st)
        for n, p in model.llm.model.named_parameters():
            if ".translation." in n and "lora_B" in n:
                p.mul_(3.0)
        assert torch.equal(model(asr), asr_before)  # ASR samples never see that adapter
        assert not torch.allclose(model(st), st_before)


def test_shared_plus_task_adapters_and_grouped_decoding(tokenizer_dir):
    routes = {"asr": ["shared", "asr"], "st": ["shared", "st"]}
    model = model_with(tokenizer_dir, task_adapters=routes)
    perturb_lora_b(model)
    model(batch(["asr", "asr"])).backward()
    assert all(g is not None for g in lora_grads(model, "shared"))
    assert all(g is not None for g in lora_grads(model, "asr"))
    assert all(g is None for g in lora_grads(model, "st"))
    model.eval()
    mixed = batch(["st", "asr", "st"])
    texts = model.generate(mixed, max_new_tokens=4)
    alone = {}
    for idx in ([0, 2], [1]):
        for i, t in zip(idx, model.generate(subset(mixed, idx), max_new_tokens=4), strict=True):
            alone[i] = t
    assert texts == [alone[i] for i in range(3)]


def test_audio_visual_modality_adapters(tokenizer_dir):
    """Phi-4-multimodal's layout: a speech and a vision adapter, both for AVSR."""
    from conftest import tiny_clip_config

    from mmalign.encoders.clip_video import CLIPVideoEncoder

    encoder, llm = make_tiny_parts(tokenizer_dir)
    video = CLIPVideoEncoder(model="tiny", config=tiny_clip_config(), frame_rate=25.0)
    routes = {"asr": "speech", "vsr": "vision", "avsr": ["speech", "vision"]}
    model = SpeechLLM(
        encoder,
        MLPProjector(encoder.dim, llm.hidden_size, rate=2, hidden_dim=8),
        llm,
        video_encoder=video,
        video_projector=MLPProjector(video.dim, llm.hidden_size, rate=1, hidden_dim=8),
        task_adapters=routes,
    )
    perturb_lora_b(model)
    b = tiny_batch(3)
    b["video"] = torch.randint(0, 256, (3, 6, 1, 40, 40), dtype=torch.uint8)
    b["video_lengths"] = torch.tensor([6, 5, 4])
    for tasks, used in (
        (["vsr", "vsr", "vsr"], {"vision"}),
        (["asr", "asr", "asr"], {"speech"}),
        (["avsr", "vsr", "asr"], {"speech", "vision"}),
    ):
        model.zero_grad(set_to_none=True)
        model({**b, "task": tasks}).backward()
        for name in ("speech", "vision"):
            grads = lora_grads(model, name)
            assert all((g is not None) == (name in used) for g in grads), (tasks, name)
    assert model.adapter_groups({**b, "task": ["avsr", "vsr", "asr"]}) == [
        (("speech", "vision"), [0]),
        (("vision",), [1]),
        (("speech",), [2]),
    ]


def test_task_adapter_refusals(tokenizer_dir):
    with pytest.raises(ValueError, match="distinct adapter names"):
        model_with(tokenizer_dir, task_adapters={"asr": ["a.b"]})
    with pytest.raises(ValueError, match="empty"):
        model_with(tokenizer_dir, task_adapters={})
    model = model_with(tokenizer_dir, task_adapters={"asr": "speech"})
    with pytest.raises(KeyError, match="'st' has no adapter"):
        model(batch(["asr", "st"]))
    encoder, _ = make_tiny_parts(tokenizer_dir)
    from mmalign.llm.load import CausalLM

    pissa = CausalLM(
        "random",
        adapter=LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"),
        tokenizer=str(tokenizer_dir),
        config=tiny_llm_config(),
    )
    proj = MLPProjector(encoder.dim, pissa.hidden_size, rate=2, hidden_dim=8)
    with pytest.raises(ValueError, match="pissa"):
        SpeechLLM(encoder, proj, pissa, task_adapters=ROUTES)
    checkpointed = CausalLM(
        "random",
        adapter=LoraConfig(r=4, target_modules=["q_proj"]),
        tokenizer=str(tokenizer_dir),
        config=tiny_llm_config(),
        gradient_checkpointing=True,
    )
    with pytest.raises(ValueError, match="checkpointing"):
        SpeechLLM(encoder, proj, checkpointed, task_adapters=ROUTES)


# -------------------------------------------------------------------- prompt-aware scaling


def test_delta_scale_multiplies_the_adapter_delta_only(tokenizer_dir):
    model = model_with(tokenizer_dir)
    perturb_lora_b(model)
    layer = tuner_layers(model.llm.model)[0]
    x = torch.randn(2, 5, model.llm.hidden_size)
    with torch.no_grad():
        base, plain = layer.base_layer(x), layer(x)
        scale = DeltaScale()
        assert scale.install(model.llm.model) == len(tuner_layers(model.llm.model))
        scale.install(model.llm.model)  # idempotent: hooks are not stacked
        scale.set(torch.tensor([0.25, 1.5]))
        scaled = layer(x)
    delta = plain - base
    assert delta.abs().max() > 0.01
    torch.testing.assert_close(scaled, base + torch.tensor([0.25, 1.5])[:, None, None] * delta)
    scale.clear()
    torch.testing.assert_close(layer(x), plain)


def test_prompt_aware_scales_differ_across_prompts(tokenizer_dir):
    model = model_with(tokenizer_dir, prompt_aware_scaling=True)
    b = batch(["asr", "st", "asr"])
    heads, tails = model._segments(b)
    scales = model.prompt_scales(heads, tails)
    assert scales.shape == (3,) and bool(((scales > 0) & (scales < 2)).all())
    assert scales[0] == scales[2] and abs(float((scales[0] - scales[1]).detach())) > 1e-3
    # another wording of the same task gives another scale
    other = model_with(tokenizer_dir, prompt_aware_scaling=True, prompts={"asr": "Hi {modality}"})
    other.prompt_scaler.load_state_dict(model.prompt_scaler.state_dict())
    h2, t2 = other._segments(b)
    assert abs(float((other.prompt_scales(h2, t2)[0] - scales[0]).detach())) > 1e-3
    # gradients reach the head through the scaled LoRA output
    perturb_lora_b(model)
    model(b).backward()
    grads = [p.grad for p in model.prompt_scaler.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def constant_scale(model: SpeechLLM, bias: float) -> None:
    """Make the head output ``2 sigmoid(bias)`` for every prompt."""
    last = model.prompt_scaler.net[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(bias)


def test_scale_one_is_plain_lora_and_scale_zero_the_bare_llm(tokenizer_dir):
    model = model_with(tokenizer_dir, prompt_aware_scaling=True).eval()
    perturb_lora_b(model)
    b = batch(["asr", "st", "asr"])
    with torch.no_grad():
        scaler, model.prompt_scaler = model.prompt_scaler, None
        plain = model(b)
        with model.llm.model.disable_adapter():
            bare = model(b)
        model.prompt_scaler = scaler
        constant_scale(model, 0.0)  # scale 1
        torch.testing.assert_close(model(b), plain)
        constant_scale(model, -40.0)  # scale ~0
        torch.testing.assert_close(model(b), bare)
    assert not torch.allclose(plain, bare)


def test_prompt_scaling_with_packing_and_beams(tokenizer_dir):
    model = model_with(tokenizer_dir, prompt_aware_scaling=True, task_adapters=ROUTES).eval()
    perturb_lora_b(model)
    b = batch(["asr", "st", "asr", "st"][:3])
    with torch.no_grad():
        unpacked = model(b)
        model.packing = True  # per-position scales in packed rows
        torch.testing.assert_close(model(b), unpacked)
        model.packing = False
        assert len(model.generate(b, max_new_tokens=3, num_beams=2)) == 3
    assert model._delta_scale.scale is None  # nothing left behind without checkpointing


def test_prompt_scaling_under_gradient_checkpointing(tokenizer_dir):
    """The backward pass recomputes the LLM layers: the scales must still be there."""
    from mmalign.llm.load import CausalLM

    plain = model_with(tokenizer_dir, prompt_aware_scaling=True)
    encoder, _ = make_tiny_parts(tokenizer_dir)
    llm = CausalLM(
        "random",
        adapter=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        tokenizer=str(tokenizer_dir),
        config=tiny_llm_config(),
        gradient_checkpointing=True,
    )
    projector = MLPProjector(encoder.dim, llm.hidden_size, rate=2, hidden_dim=16)
    checkpointed = SpeechLLM(encoder, projector, llm, prompt_aware_scaling=True)
    perturb_lora_b(plain)
    checkpointed.load_state_dict(plain.state_dict())
    b = batch(["asr", "st", "asr"])
    for model in (plain, checkpointed):
        model.train()
        model(b).backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    assert any("prompt_scaler" in n for n in grads) and any("lora_A" in n for n in grads)
    for n, p in checkpointed.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------- fit, checkpoint, export


def fit_config(tmp: Path, frozen: dict[str, str], shards: Path, **model: object) -> Path:
    section = tiny_model_section(Path(frozen["llm"]))
    section["encoder"]["init_args"] = {"source": frozen["encoder"]}
    adapter = section["llm"]["init_args"]["adapter"]
    section["llm"]["init_args"] = {"source": frozen["llm"], "adapter": adapter}
    mix = [
        {"shards": str(shards), "task": "asr"},
        {"shards": str(shards), "task": "st", "target_lang": "de"},
    ]
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 2,
            "limit_val_batches": 1,
            "val_check_interval": 2,
            "check_val_every_n_epoch": None,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp / "logs"), "name": "run"},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(tmp / "ckpt"), "save_last": True},
                }
            ],
        },
        "model": {
            **section,
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2}},
            "max_new_tokens": 2,
            **model,
        },
        "data": {"train": mix, "val": mix, "max_batch_seconds": 4.0},
    }
    path = tmp / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_translation_shards(tmp_path_factory.mktemp("st") / "data", 6)


@pytest.fixture(scope="module")
def frozen(tmp_path_factory, tokenizer_dir) -> dict[str, str]:
    """Tiny random encoder and LLM saved to folders, so that a reload gets the same frozen
    weights (``source: random`` would draw new ones)."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from mmalign.llm.load import load_llm

    root = tmp_path_factory.mktemp("frozen")
    torch.manual_seed(0)
    encoder = WhisperEncoder(WhisperConfig(**tiny_whisper_config()))
    encoder.config.architectures = ["WhisperEncoder"]
    encoder.save_pretrained(root / "encoder")
    llm, tok = load_llm("random", tokenizer=str(tokenizer_dir), config=tiny_llm_config())
    llm.save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    return {"encoder": str(root / "encoder"), "llm": str(root / "llm")}


@pytest.mark.parametrize(
    "options",
    [
        {"task_adapters": {"asr": "speech", "st": ["speech", "translation"]}},
        {"prompt_aware_scaling": True, "prompt_scaling_dim": 8},
    ],
    ids=["task_adapters", "prompt_aware_scaling"],
)
def test_fit_checkpoint_export_reload(tmp_path, frozen, shards, options):
    from mmalign.cli import cli_main
    from mmalign.inference.export import export, load_checkpoint, load_exported

    config = fit_config(tmp_path, frozen, shards, **options)
    cli = cli_main(["fit", "--config", str(config)])
    module = cli.model
    (metrics,) = (tmp_path / "logs" / "run").glob("version_*/metrics.csv")
    logged = {k for r in csv.DictReader(metrics.open()) for k, v in r.items() if v}
    assert {"train/loss", "val/asr/wer", "val/st/bleu"} <= logged
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    lora = sum(p.numel() for n, p in module.named_parameters() if "lora_" in n)
    if "task_adapters" in options:
        assert {"speech", "translation"} == set(module.model.llm.model.peft_config)
        assert any(".translation." in k for k in state) and any(".speech." in k for k in state)
        per_adapter = {
            name: sum(p.numel() for n, p in module.named_parameters() if f".{name}." in n)
            for name in ("speech", "translation")
        }
        assert per_adapter["speech"] == per_adapter["translation"] > 0
        assert lora == 2 * per_adapter["speech"]
    else:
        scaler = sum(p.numel() for p in module.model.prompt_scaler.parameters())
        assert scaler == 32 * 8 + 8 + 8 + 1
        assert sum(v.numel() for k, v in state.items() if "prompt_scaler" in k) == scaler
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert module.num_trainable_parameters() == trainable

    out = export(ckpt, tmp_path / "export")
    desc = json.loads((out / "mmalign.json").read_text())
    loaded, exported = load_checkpoint(ckpt).eval(), load_exported(out).eval()
    b = batch(["asr", "st", "asr"])
    with torch.no_grad():
        torch.testing.assert_close(exported(b), loaded(b), rtol=0, atol=1e-6)
        torch.testing.assert_close(loaded(b), module.model.eval()(b), rtol=0, atol=1e-6)
    assert exported.generate(b, max_new_tokens=3) == loaded.generate(b, max_new_tokens=3)
    if "task_adapters" in options:
        assert desc["task_adapters"] == {"asr": ["speech"], "st": ["speech", "translation"]}
        assert (out / "adapter" / "translation" / "adapter_model.safetensors").is_file()
    else:
        assert (
            desc["prompt_aware_scaling"] is True and (out / "prompt_scaler.safetensors").is_file()
        )
        for k, v in loaded.prompt_scaler.state_dict().items():
            assert torch.equal(exported.prompt_scaler.state_dict()[k], v)
