"""A real checkpoint from ``mmalign fit`` (tiny models, one step), shared by the evaluate tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import tiny_model_section


def write_fit_config(tmp: Path, tokenizer_dir: Path, shards: Path, steps: int = 1) -> Path:
    """The smallest config that trains and checkpoints (cut down from test_cli_fit's)."""
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": steps,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": False,
            "default_root_dir": str(tmp / "run"),
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(tmp / "ckpt"), "save_last": True},
                }
            ],
        },
        "model": {
            **tiny_model_section(tokenizer_dir, lora_targets=("q_proj",)),
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}},
        },
        "data": {"train": str(shards), "max_batch_seconds": 4.0},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer_dir, tone_shards) -> Path:
    """``last.ckpt`` of a one-step ``mmalign fit`` run on the tone shards."""
    from mmalign.cli import cli_main

    tmp = tmp_path_factory.mktemp("evalfit")
    cli_main(["fit", "--config", str(write_fit_config(tmp, tokenizer_dir, tone_shards))])
    ckpt = tmp / "ckpt" / "last.ckpt"
    assert ckpt.is_file()
    return ckpt
