"""A default ``mmalign fit`` skips and counts samples longer than the encoder's window, and
clips too short to carry one LLM token.

The tiny Whisper here has a 2 s window (``max_source_positions`` 100), so a 3 s tone stands in
for the issue's 40-minute clip: on today's code it crashed the step it landed in ("input has
300 frames; Whisper encodes at most 200").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import tiny_model_section, write_tone, write_tone_corpus

from mmalign.cli import cli_main

WINDOW_POSITIONS = 100  # Whisper frames after the stride-2 conv: 200 mel frames, 2 s


@pytest.fixture(scope="module")
def shards_with_a_long_sample(tmp_path_factory) -> Path:
    """Five short tones, one 3 s tone and one of 0.02 s, prepared into shards."""
    from mmalign.data.shards import prepare

    root = tmp_path_factory.mktemp("long")
    manifest = write_tone_corpus(root / "raw", 5)
    write_tone(root / "raw" / "long.wav", 3.0)
    with open(manifest, "a") as fh:
        fh.write(json.dumps({"audio": "long.wav", "text": "one two three four"}) + "\n")
        fh.write(json.dumps({"audio": "blip.wav", "text": "one"}) + "\n")
    write_tone(root / "raw" / "blip.wav", 0.02)
    assert prepare(manifest, root / "shards", progress=False).ok
    return root / "shards"


def write_config(tmp: Path, tokenizer_dir: Path, shards: Path, **data: object) -> Path:
    """One pass over every training sample (``exact`` sampling) with a 2 s Whisper window."""
    model = tiny_model_section(tokenizer_dir, lora_targets=("q_proj",))
    model["encoder"]["init_args"]["config"]["max_source_positions"] = WINDOW_POSITIONS
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 1,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "enable_checkpointing": False,
            "logger": False,
            "default_root_dir": str(tmp / "run"),
        },
        "model": {
            **model,
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}},
        },
        "data": {"train": str(shards), "max_batch_seconds": 4.0, "sampling": "exact", **data},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_default_fit_skips_and_counts_a_sample_longer_than_the_window(
    tmp_path, tokenizer_dir, shards_with_a_long_sample
):
    config = write_config(tmp_path, tokenizer_dir, shards_with_a_long_sample)
    cli = cli_main(["fit", "--config", str(config)])
    assert cli.trainer.global_step >= 1
    assert cli.datamodule.max_audio_seconds == 2.0  # unset: the encoder's window
    assert cli.datamodule.min_audio_seconds == 0.04  # one token: 2 frames at 50 frames/s
    assert cli.datamodule.skipped_by_reason["train"] == {"audio too long": 1, "audio too short": 1}


def test_a_limit_longer_than_the_window_is_refused_naming_the_field(
    tmp_path, tokenizer_dir, shards_with_a_long_sample
):
    config = write_config(tmp_path, tokenizer_dir, shards_with_a_long_sample, max_audio_seconds=5)
    with pytest.raises((ValueError, SystemExit), match=r"data\.max_audio_seconds=5 .*2 s window"):
        cli_main(["fit", "--config", str(config)])
