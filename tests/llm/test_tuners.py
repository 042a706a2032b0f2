"""Every supported peft tuner trains two steps through ``mmalign fit`` and round-trips export;
unsupported ones are refused at start-up with the reason."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
import yaml
from conftest import (
    tiny_batch,
    tiny_llm_config,
    tiny_model_section,
    tiny_whisper_config,
)

from mmalign.cli import cli_main, main
from mmalign.inference.export import load_checkpoint, load_exported
from mmalign.llm import calibration, offsets, tuners
from mmalign.llm.load import CausalLM

QV = ["q_proj", "v_proj"]
MMALIGN_LORA = "mmalign.llm.tuners.LoraConfig"

# EVA and CorDA are built with peft's default settings here on purpose; peft says so each time
pytestmark = [
    pytest.mark.filterwarnings("ignore:lora with eva initialization used with low_cpu_mem_usage"),
    pytest.mark.filterwarnings("ignore:`init_lora_weights` is 'corda' but `corda_config`"),
]


def lora(class_path: str = "peft.LoraConfig", **kwargs) -> dict:
    return {
        "class_path": class_path,
        "init_args": {"r": 4, "lora_alpha": 8, "target_modules": QV, **kwargs},
    }


TUNERS = {
    "lora": lora(),
    "dora": lora(use_dora=True),
    "rslora": lora(use_rslora=True),
    "pissa": lora(init_lora_weights="pissa"),
    "pissa_niter": lora(MMALIGN_LORA, init_lora_weights="pissa_niter_2"),
    "olora": lora(init_lora_weights="olora"),
    "orthogonal": lora(init_lora_weights="orthogonal"),
    "mica": lora(init_lora_weights="mica"),
    "eva": lora(init_lora_weights="eva", eva_config={"rho": 2.0}),
    "corda": lora(init_lora_weights="corda"),
    "lora_ga": lora(MMALIGN_LORA, init_lora_weights="lora_ga", lora_ga_config={"stable_gamma": 8}),
    "lora_one": lora(MMALIGN_LORA, init_lora_weights="lora_one", lora_one_config={"gamma": 16}),
    "lora_one_dora": lora(MMALIGN_LORA, init_lora_weights="lora_one", use_dora=True),
    "kasa": lora(kasa_config={"beta": 1e-4}),
    "vera": {"class_path": "peft.VeraConfig", "init_args": {"r": 8, "target_modules": QV}},
    "randlora": {"class_path": "peft.RandLoraConfig", "init_args": {"r": 8, "target_modules": QV}},
    "pvera": {"class_path": "peft.PveraConfig", "init_args": {"r": 8, "target_modules": QV}},
    "miss": {"class_path": "peft.MissConfig", "init_args": {"r": 8, "target_modules": QV}},
    "adaption_prompt": {
        "class_path": "peft.AdaptionPromptConfig",
        "init_args": {"adapter_len": 4, "adapter_layers": 2},
    },
}


@pytest.fixture(scope="module")
def frozen(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """Tiny random encoder and LLM saved to folders: a reload gets the same frozen weights
    (``source: random`` would draw new ones), as with real models."""
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
    return {"encoder": root / "encoder", "llm": root / "llm"}


def model_section(frozen: dict[str, Path], adapter: dict) -> dict:
    model = tiny_model_section(frozen["llm"])
    model["encoder"]["init_args"] = {"source": str(frozen["encoder"])}
    model["llm"]["init_args"] = {"source": str(frozen["llm"]), "adapter": adapter}
    return model


def write_config(tmp: Path, frozen: dict[str, Path], shards: Path, adapter: dict) -> Path:
    model = model_section(frozen, adapter)
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 2,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": False,
            "default_root_dir": str(tmp / "run"),
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(tmp / "ckpt"), "every_n_train_steps": 2},
                }
            ],
        },
        "model": {
            **model,
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2}},
            "adapter_init_batches": 2,
        },
        "data": {"train": str(shards), "max_batch_seconds": 4.0},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@torch.no_grad()
def outputs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits at the target positions) of ``model`` on ``batch``, in eval mode."""
    model.eval()
    seen = []
    head = model.llm.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        loss = model(batch)
    finally:
        handle.remove()
    return loss, seen[0]


@pytest.mark.parametrize("name", list(TUNERS))
def test_tuner_trains_and_round_trips_export(name, tmp_path, frozen, tone_shards):
    config = write_config(tmp_path, frozen, tone_shards, TUNERS[name])
    cli = cli_main(["fit", "--config", str(config)])
    assert cli.trainer.global_step == 2
    trained = cli.model.model
    assert trained.llm.pending_init is None  # a data-driven init ran before training
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    batch = tiny_batch()
    torch.manual_seed(0)
    loss, logits = outputs(trained, batch)
    assert torch.isfinite(loss)

    from_ckpt = load_checkpoint(ckpt)
    out = tmp_path / "export"
    main(["export", str(ckpt), str(out)])
    exported = load_exported(out)
    for reloaded in (from_ckpt, exported):
        got_loss, got_logits = outputs(reloaded, batch)
        torch.testing.assert_close(got_logits, logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got_loss, loss, rtol=1e-4, atol=1e-4)
    # the exported adapter is peft's own format, loadable on the untouched base model
    assert (out / "adapter" / "adapter_config.json").is_file()
    if tuners.moves_weights(tuners.init_of(trained.llm.adapter)):
        cfg = peft.PeftConfig.from_pretrained(str(out / "adapter"))
        assert cfg.init_lora_weights is True and cfg.r == 2 * TUNERS[name]["init_args"]["r"]


def test_resume_rederives_frozen_weights_from_checkpoint_offsets(tmp_path, frozen, tone_shards):
    """A resumed fit calibrates again (here on other batches), then the checkpoint's init
    offsets replace the new ones: the frozen weights are the original ones minus the
    checkpoint's s B0 A0."""
    from safetensors.torch import load_file

    config = write_config(tmp_path, frozen, tone_shards, TUNERS["lora_ga"])
    cli_main(["fit", "--config", str(config)])
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    args = ["fit", "--config", str(config), "--trainer.max_steps", "3", "--ckpt_path", str(ckpt)]
    resumed = cli_main([*args, "--model.adapter_init_batches", "1"])
    assert resumed.trainer.global_step == 3
    original = load_file(frozen["llm"] / "model.safetensors")
    q = resumed.model.model.llm.model.base_model.model.model.layers[0].self_attn.q_proj
    prefix = "model.llm.model.base_model.model.model.layers.0.self_attn.q_proj."
    B0, A0 = saved[prefix + "init_offset_B"], saved[prefix + "init_offset_A"]
    assert torch.equal(q.init_offset_B, B0) and torch.equal(q.init_offset_A, A0)
    expected = original["model.layers.0.self_attn.q_proj.weight"] - q.scaling["default"] * B0 @ A0
    torch.testing.assert_close(q.base_layer.weight, expected, rtol=1e-5, atol=1e-6)


def test_data_driven_inits_change_the_adapter(tokenizer_dir):
    """LoRA-One starts the adapter one gradient step away (B != 0, frozen weights untouched);
    LoRA-GA and CorDA move s B0 A0 out of the frozen weights (the initial output is kept)."""
    batches = [tiny_batch(), tiny_batch(n=2)]
    for init, keeps_output in (("lora_one", False), ("lora_ga", True), ("corda", True)):
        model = speech_llm(tokenizer_dir, tuners.LoraConfig(**_cfg(init)))
        q = model.llm.model.base_model.model.model.layers[0].self_attn.q_proj
        w0 = q.base_layer.weight.detach().clone()
        assert model.llm.pending_init == init
        loss0 = _loss(model, batches[0])
        assert calibration.initialize_adapter(model.llm, model, batches) == init
        assert model.llm.pending_init is None
        assert q.lora_B["default"].weight.abs().sum() > 0
        assert torch.equal(q.base_layer.weight, w0) != keeps_output, init
        loss1 = _loss(model, batches[0])
        if keeps_output:
            torch.testing.assert_close(loss1, loss0, rtol=1e-4, atol=1e-4)
            assert q.init_offset_B.abs().sum() > 0
        else:
            assert not torch.isclose(loss1, loss0)
            assert not hasattr(q, "init_offset_B")


def test_offsets_follow_a_loaded_checkpoint(tokenizer_dir):
    """Loading other init offsets re-derives the frozen weight from the original one."""
    model = speech_llm(tokenizer_dir, tuners.LoraConfig(**_cfg("pissa_niter_2")))
    q = model.llm.model.base_model.model.model.layers[0].self_attn.q_proj
    B0, A0 = q.init_offset_B.clone(), q.init_offset_A.clone()
    original = q.base_layer.weight + q.scaling["default"] * (B0 @ A0)
    with torch.no_grad():
        q.init_offset_A.mul_(0.5)
    assert offsets.sync_base_offsets(model.llm) == 1
    expected = original - q.scaling["default"] * (B0 @ (0.5 * A0))
    torch.testing.assert_close(q.base_layer.weight, expected, rtol=1e-5, atol=1e-6)
    assert offsets.sync_base_offsets(model.llm) == 0


def _cfg(init: str) -> dict:
    return {"r": 4, "lora_alpha": 8, "target_modules": QV, "init_lora_weights": init}


def speech_llm(tokenizer_dir: Path, adapter):
    from mmalign.encoders.whisper import WhisperEncoder
    from mmalign.model import SpeechLLM
    from mmalign.projectors.mlp import MLPProjector

    torch.manual_seed(0)
    encoder = WhisperEncoder(source="random", config=tiny_whisper_config())
    llm = _llm(tokenizer_dir, adapter)
    return SpeechLLM(encoder, MLPProjector(encoder.dim, llm.hidden_size, rate=2), llm)


@torch.no_grad()
def _loss(model, batch) -> torch.Tensor:
    model.eval()
    return model(batch)


# ----------------------------------------------------------------------------- refusals


def _llm(tokenizer_dir: Path, adapter) -> CausalLM:
    return CausalLM(
        "random", adapter=adapter, tokenizer=str(tokenizer_dir), config=tiny_llm_config()
    )


REFUSED = {
    "prefix": (lambda: peft.PrefixTuningConfig(num_virtual_tokens=4), "virtual tokens"),
    "prompt": (lambda: peft.PromptTuningConfig(num_virtual_tokens=4), "virtual tokens"),
    "p-tuning": (lambda: peft.PromptEncoderConfig(num_virtual_tokens=4), "virtual tokens"),
    "loftq": (lambda: tuners.LoraConfig(target_modules=QV, init_lora_weights="loftq"), "LoftQ"),
    "task_type": (lambda: peft.LoraConfig(target_modules=QV, task_type="SEQ_CLS"), "CAUSAL_LM"),
    "unknown_init": (lambda: tuners.LoraConfig(init_lora_weights="nonsense"), "not one of"),
    "niter": (lambda: tuners.LoraConfig(init_lora_weights="pissa_niter_x"), "integer"),
    "xlora": (lambda: peft.XLoraConfig(hidden_size=32, adapters={"a": "/nowhere"}), "X-LoRA"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_unsupported_adapters_are_refused(tokenizer_dir, name):
    make, match = REFUSED[name]
    with pytest.raises(ValueError, match=match):
        _llm(tokenizer_dir, make())


def test_missing_target_modules_are_named(tokenizer_dir):
    with pytest.raises(ValueError) as e:
        _llm(tokenizer_dir, peft.VeraConfig(r=4, target_modules=["q_proj", "qkv"]))
    assert "['qkv']" in str(e.value) and "q_proj" in str(e.value) and "down_proj" in str(e.value)


def test_task_type_defaults_to_causal_lm(tokenizer_dir):
    adapter = peft.VeraConfig(r=4, target_modules=QV)
    _llm(tokenizer_dir, adapter)
    assert str(adapter.task_type) in ("CAUSAL_LM", "TaskType.CAUSAL_LM")


def test_per_rate_adapters_refuse_managed_inits(tokenizer_dir):
    llm = _llm(tokenizer_dir, tuners.LoraConfig(**_cfg("lora_one")))
    with pytest.raises(ValueError, match="lora_strategy 'shared'"):
        tuners.check_strategy(llm, "per_rate")


def test_peft_class_names_missing_tuners():
    assert tuners.peft_class("VeraConfig") is peft.VeraConfig
    with pytest.raises(ImportError, match=f"peft {peft.__version__} has no NoSuchConfig"):
        tuners.peft_class("NoSuchConfig")


def test_issue_tuners_exist_in_installed_peft():
    """The docstring of mmalign.llm.tuners says which of the issue's tuners peft provides."""
    for name in ("VeraConfig", "RandLoraConfig", "PveraConfig", "MissConfig"):
        assert issubclass(tuners.peft_class(name), peft.PeftConfig)
    for name in ("KasaConfig", "LoraGAConfig"):  # sub-configs of LoraConfig
        assert not issubclass(tuners.peft_class(name), peft.PeftConfig)


def test_lora_config_parses_strings_peft_literal_omits():
    cfg = tuners.LoraConfig(target_modules=QV, init_lora_weights="lora_one")
    d = cfg.to_dict()
    back = tuners.config_from_dict({**d, "lora_one_config": {"gamma": 4.0}})
    assert back.init_lora_weights == "lora_one" and back.lora_one_config.gamma == 4.0
    plain = tuners.to_peft(back)
    assert type(plain) is peft.LoraConfig and plain.init_lora_weights is True


ADAPTER_CONFIGS = sorted(Path(__file__).parents[2].joinpath("configs", "adapters").glob("*.yaml"))


@pytest.mark.parametrize("path", ADAPTER_CONFIGS, ids=lambda p: p.stem)
def test_adapter_configs_build_on_the_tiny_llm(path, tokenizer_dir):
    """Each configs/adapters/*.yaml adapter passes the start-up checks and builds (peft
    validates its settings) on a tiny Llama with the same module names as the demo LLM."""
    import importlib

    spec = yaml.safe_load(path.read_text())["model"]["llm"]["init_args"]["adapter"]
    module, name = spec["class_path"].rsplit(".", 1)
    kwargs = {**spec["init_args"], "r": min(8, spec["init_args"]["r"])}  # the tiny LLM is 32 wide
    adapter = getattr(importlib.import_module(module), name)(**kwargs)
    llm = _llm(tokenizer_dir, adapter)
    assert llm.pending_init == (tuners.init_of(adapter) if path.stem in DATA_DRIVEN else None)
    assert sum(p.numel() for p in llm.parameters() if p.requires_grad) > 0


DATA_DRIVEN = {"eva", "corda", "lora_ga", "lora_one"}
