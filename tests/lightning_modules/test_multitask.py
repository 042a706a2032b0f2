"""Multitask end to end on tiny models: a mixture of ASR and ST, per-task validation metrics
with BLEU and its signature, a two-stage curriculum that resumes, and adapter transfer."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_llm_config, tiny_model_section, write_translation_shards

from mmalign.cli import main


def fit_config(tmp: Path, tokenizer_dir: Path, shards: Path) -> Path:
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
            "limit_val_batches": 2,
            "val_check_interval": 2,
            "check_val_every_n_epoch": None,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp / "logs"), "name": "mt"},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(tmp / "ckpt"), "save_last": True},
                }
            ],
        },
        "model": {
            **tiny_model_section(tokenizer_dir),
            "prompts": {"st:en-de": "Say it in German: {modality}"},
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2}},
            "max_new_tokens": 3,
            "predictions_dir": str(tmp / "pred"),
        },
        "data": {"train": mix, "val": mix, "test": mix, "max_batch_seconds": 4.0},
    }
    path = tmp / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir):
    tmp = tmp_path_factory.mktemp("mt")
    shards = write_translation_shards(tmp / "data", 10)
    return tmp, fit_config(tmp, tokenizer_dir, shards), shards


def test_mixture_fit_logs_metrics_per_task(setup):
    tmp, config, _ = setup
    main(["fit", "--config", str(config)])
    (metrics,) = (tmp / "logs" / "mt").glob("version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    logged = {k for r in rows for k, v in r.items() if v}
    assert {"val/asr/wer", "val/st/bleu", "val/st/chrf", "val/wer"} <= logged
    main(["test", "--config", str(config), "--ckpt_path", str(tmp / "ckpt" / "last.ckpt")])
    result = json.loads((tmp / "pred" / "test_metrics.json").read_text())
    assert result["tasks"]["st"]["bleu_signature"].startswith("nrefs:1|")
    assert result["tasks"]["asr"]["utterances"] == 10 and result["tasks"]["st"]["utterances"] == 8
    assert result["utterances"] == 10  # val/test "wer" covers the transcription task only
    rows = [json.loads(x) for x in (tmp / "pred" / "utterances.jsonl").read_text().splitlines()]
    assert {r["task"] for r in rows} == {"asr", "st"}
    assert all(r["reference"].startswith("Wort") for r in rows if r["task"] == "st")


def test_curriculum_stages_chain_and_resume(setup, capsys):
    from mmalign.inference.export import load_checkpoint

    tmp, config, shards = setup
    plan = {
        "fit_config": str(config),
        "out_dir": str(tmp / "cur"),
        "stages": [
            {"name": "asr", "overrides": {"data.train": str(shards), "trainer.max_steps": 2}},
            {"name": "multitask", "overrides": {"trainer.max_steps": 3}},
        ],
    }
    path = tmp / "curriculum.yaml"
    path.write_text(yaml.safe_dump(plan))
    main(["curriculum", str(path)])
    first, second = tmp / "cur" / "0-asr", tmp / "cur" / "1-multitask"
    assert json.loads((first / "done.json").read_text())["steps"] == 2
    assert json.loads((second / "done.json").read_text())["steps"] == 3
    stage1 = load_checkpoint(first / "checkpoints" / "last.ckpt").state_dict()
    stage2 = load_checkpoint(second / "checkpoints" / "last.ckpt").state_dict()
    moved = [k for k in stage1 if "lora_B" in k and not torch.equal(stage1[k], stage2[k])]
    assert moved  # stage 2 trained on from stage 1's weights
    # stage 2 starts from stage 1's final weights exactly (init_from), not from scratch
    from mmalign.cli import cli_main

    cli = cli_main(
        ["--config", str(config), f"--model.init_from={first / 'checkpoints' / 'last.ckpt'}"],
        run=False,
    )
    own = cli.model.model.state_dict()
    for k, v in stage1.items():
        if "lora_" in k or k.startswith("projector."):
            assert torch.equal(own[k], v), k
    fresh = cli_main(
        ["--config", str(config), f"--model.init_from={first / 'checkpoints' / 'last.ckpt'}",
         "--model.init_adapter=fresh"],
        run=False,
    ).model.model.state_dict()  # fmt: skip
    assert all(fresh[k].abs().sum() == 0 for k in fresh if "lora_B" in k)  # new LoRA
    assert torch.equal(fresh["projector.boundary"], stage1["projector.boundary"])
    # a rerun skips finished stages; an unfinished stage resumes from its last checkpoint
    (second / "done.json").unlink()
    capsys.readouterr()
    main(["curriculum", str(path)])
    out = capsys.readouterr().out
    assert "stage 0 (asr): done, skipped" in out and "resuming" in out
    assert json.loads((second / "done.json").read_text())["steps"] == 3


def test_init_from_refuses_a_checkpoint_of_another_shape(setup, tmp_path):
    from mmalign.cli import cli_main

    tmp, config, _ = setup
    with pytest.raises(ValueError, match="do not fit"):
        cli_main(
            ["--config", str(config), f"--model.init_from={tmp / 'ckpt' / 'last.ckpt'}",
             "--model.projector.init_args.hidden_dim=32"],
            run=False,
        )  # fmt: skip


def test_adapter_transfer_to_a_same_architecture_llm_and_refusal(setup, tmp_path, tokenizer_dir):
    from mmalign.inference.export import load_checkpoint

    tmp, _, _ = setup
    ckpt = tmp / "ckpt" / "last.ckpt"
    # another LLM of the same architecture: a saved copy with different (random) weights
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other-llm"
    torch.manual_seed(5)
    LlamaForCausalLM(LlamaConfig(**tiny_llm_config())).save_pretrained(other)
    model = load_checkpoint(ckpt, llm=str(other))
    trained = load_checkpoint(ckpt)
    lora = {k: v for k, v in trained.state_dict().items() if "lora_" in k}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in lora.items())
    base = "model.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    key = next(k for k in model.state_dict() if k.endswith(base.split("model.", 1)[1]))
    assert not torch.equal(model.state_dict()[key], trained.state_dict()[key])  # other weights

    wider = tmp_path / "wider-llm"
    LlamaForCausalLM(LlamaConfig(**{**tiny_llm_config(), "num_hidden_layers": 3})).save_pretrained(
        wider
    )
    with pytest.raises(ValueError, match="num_hidden_layers"):
        load_checkpoint(ckpt, llm=str(wider))
    with pytest.raises(SystemExit, match="num_hidden_layers"):
        from mmalign.eval.evaluate import main as evaluate_main

        evaluate_main([str(ckpt), str(tmp / "data" / "shards"), "--out", str(tmp_path / "e"),
                       "--llm", str(wider), "--no-progress"])  # fmt: skip
