"""The Matryoshka demo config, shrunk to tiny models, fits two steps through the real CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
import yaml
from conftest import tiny_llm_config, tiny_whisper_config

from mmalign.cli import cli_main

CONFIG = Path(__file__).parents[2] / "configs/demo/whisper-tiny_smollm2-135m_matryoshka.yaml"


def test_matryoshka_config_fits_on_tiny_models(tmp_path, tokenizer_dir, tone_shards):
    cfg = yaml.safe_load(CONFIG.read_text())
    rates = cfg["model"]["projector"]["init_args"]["rates"]
    trainer = cfg["trainer"]
    trainer.update(
        precision="32-true",
        max_steps=2,
        val_check_interval=2,
        limit_val_batches=1,
        log_every_n_steps=1,
        enable_progress_bar=False,
        default_root_dir=str(tmp_path),
    )
    trainer["logger"]["init_args"]["save_dir"] = str(tmp_path)
    trainer["callbacks"][0]["init_args"]["dirpath"] = str(tmp_path / "ckpt")
    model = cfg["model"]
    model["encoder"]["init_args"] = {"source": "random", "config": tiny_whisper_config()}
    model["projector"]["init_args"]["hidden_dim"] = 16
    model["llm"]["init_args"].update(
        source="random", tokenizer=str(tokenizer_dir), config=tiny_llm_config()
    )
    model.update(max_new_tokens=3, lora_strategy="shared+per_rate")
    cfg["data"] = {**cfg["data"], "train": str(tone_shards), "val": str(tone_shards)}
    cfg["data"].pop("test")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))

    cli = cli_main(["fit", "--config", str(path)])
    assert cli.trainer.global_step == 2
    (metrics,) = (tmp_path / "logs").glob("version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    for key in ["val/wer", *(f"val/wer_r{r}" for r in rates), *(f"train/loss_r{r}" for r in rates)]:
        assert any(r.get(key) for r in rows), key
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    assert set(state) == cli.model.trainable_names()
    for name in ["default", *(f"rate{r}" for r in rates)]:
        assert any(f".lora_B.{name}." in k for k in state), name
    assert any(k.startswith(f"model.projector.first.{rates[-1]}.") for k in state)
