"""End to end through the real CLI on tiny models: fit, checkpoint, reload, test, export."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import tiny_llm_config, tiny_whisper_config, write_config

from mmalign.cli import cli_main, main

RATE, HIDDEN, LORA_R = 2, 16, 4


def expected_trainable() -> int:
    """What the config implies: projector MLP + 2 boundary vectors + LoRA on q and v."""
    enc, llm = tiny_whisper_config(), tiny_llm_config()
    d, h = enc["d_model"], llm["hidden_size"]
    kv = h // llm["num_attention_heads"] * llm["num_key_value_heads"]
    projector = (d * RATE * HIDDEN + HIDDEN) + (HIDDEN * h + h) + 2 * h
    lora = llm["num_hidden_layers"] * (LORA_R * (h + h) + LORA_R * (h + kv))
    return projector + lora


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tokenizer_dir, tone_shards):
    tmp = tmp_path_factory.mktemp("fit")
    config = write_config(tmp, tokenizer_dir, tone_shards)
    cli = cli_main(["fit", "--config", str(config)])
    return tmp, config, cli


def test_fit_writes_checkpoint_without_frozen_weights(fitted):
    tmp, _, cli = fitted
    assert cli.trainer.global_step == 4
    model = cli.model
    assert model.num_trainable_parameters() == expected_trainable()
    ckpt = torch.load(tmp / "ckpt" / "last.ckpt", weights_only=False)
    keys = set(ckpt["state_dict"])
    assert keys == model.trainable_names()
    assert not any(k.startswith("model.encoder.") for k in keys)
    assert all("lora_" in k or k.startswith("model.projector.") for k in keys)
    assert sum(v.numel() for v in ckpt["state_dict"].values()) == expected_trainable()
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"] and ckpt["loops"]
    assert ckpt["mmalign"]["encoder"]["class_path"].endswith("WhisperEncoder")


def test_metrics_logged(fitted):
    tmp, _, _ = fitted
    (metrics,) = (tmp / "run" / "logs").glob("version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    assert any(r.get("train/loss") for r in rows)
    wers = [float(r["val/wer"]) for r in rows if r.get("val/wer")]
    assert len(wers) == 2 and all(w >= 0 for w in wers)


def test_checkpoint_reloads_and_tests(fitted):
    tmp, config, cli = fitted
    trained = {k: v.clone() for k, v in cli.model.state_dict().items() if "lora_B" in k}
    assert any(v.abs().sum() > 0 for v in trained.values())  # LoRA B starts at zero
    test_cli = cli_main(
        ["test", "--config", str(config), "--ckpt_path", str(tmp / "ckpt" / "last.ckpt")]
    )
    reloaded = test_cli.model.state_dict()
    for k, v in trained.items():
        assert torch.equal(reloaded[k], v), k
    rows = [json.loads(x) for x in (tmp / "pred" / "utterances.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and {"reference", "hypothesis", "key"} <= set(rows[0])
    metrics = json.loads((tmp / "pred" / "test_metrics.json").read_text())
    assert 0 <= metrics["wer"] and metrics["utterances"] == 12


def test_checkpoint_with_wrong_trainable_keys_is_refused(fitted):
    _, _, cli = fitted
    state = {k: v for k, v in cli.model.state_dict().items() if k in cli.model.trainable_names()}
    state.pop(next(k for k in state if k.startswith("model.projector.")))
    with pytest.raises(RuntimeError, match="missing trainable keys"):
        cli.model.load_state_dict(state)
    with pytest.raises(RuntimeError, match="unexpected keys"):
        cli.model.load_state_dict({**cli.model.state_dict(), "model.bogus": torch.zeros(1)})


def test_export_loads_without_lightning(fitted, capsys):
    from peft import PeftModel

    from mmalign.inference.export import load_exported
    from mmalign.llm.load import load_llm

    tmp, _, cli = fitted
    out = tmp / "export"
    main(["export", str(tmp / "ckpt" / "last.ckpt"), str(out)])
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "projector.safetensors").is_file()
    desc = json.loads((out / "mmalign.json").read_text())
    # the adapter is plain peft: it loads onto the base model with PeftModel.from_pretrained
    base, _ = load_llm(
        "random",
        tokenizer=desc["llm"]["init_args"]["tokenizer"],
        config=desc["llm"]["init_args"]["config"],
    )
    peft_model = PeftModel.from_pretrained(base, out / "adapter")
    lora = {k: v for k, v in peft_model.state_dict().items() if "lora_B" in k}
    trained = {k: v for k, v in cli.model.state_dict().items() if "lora_B" in k}
    assert len(lora) == len(trained) > 0
    for (_, a), (_, b) in zip(sorted(lora.items()), sorted(trained.items()), strict=True):
        assert torch.equal(a, b)
    # the whole model comes back and decodes like the trained one (greedy, deterministic)
    model = load_exported(out)
    trained_projector = cli.model.model.projector.state_dict()
    loaded_projector = model.projector.state_dict()
    assert loaded_projector.keys() == trained_projector.keys()
    for name, value in trained_projector.items():
        torch.testing.assert_close(loaded_projector[name], value, msg=name)
    loaded_lora = {k: v for k, v in model.llm.model.state_dict().items() if "lora_" in k}
    trained_lora = {k: v for k, v in cli.model.model.llm.model.state_dict().items() if "lora_" in k}
    assert loaded_lora.keys() == trained_lora.keys() and loaded_lora
    for name, value in trained_lora.items():
        assert torch.equal(loaded_lora[name], value), name


def test_bad_config_fails_at_startup(tmp_path, tokenizer_dir, tone_shards):
    config = write_config(tmp_path, tokenizer_dir, tone_shards)
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(config), "--model.projector.init_args.rate", "zero"])
