"""The video path end to end on tiny models: prepare, fit (modality dropout, babble
augmentation), test, export, evaluate as asr/vsr/avsr under noise, transcribe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from conftest import DIGITS, tiny_clip_config, tiny_model_section

from mmalign.cli import cli_main, main

RATE = 16000


def write_av_corpus(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` tone clips with 96 px mouth-like videos (brightness per digit) and a manifest."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        digits = [int(d) for d in rng.integers(0, 10, size=int(rng.integers(1, 3)))]
        seconds = float(rng.uniform(0.3, 0.7))
        t = np.arange(int(seconds * RATE)) / RATE
        wav = 0.3 * np.sin(2 * np.pi * (200 + 40 * digits[0]) * t)
        sf.write(root / f"a{i}.wav", wav.astype(np.float32), RATE)
        frames = int(round(seconds * 25)) + int(rng.integers(-1, 2))  # off by up to a frame
        video = np.full((frames, 96, 96), 20 * digits[-1], dtype=np.uint8)
        video[:, 30:60, 20:76] = rng.integers(0, 255, size=(frames, 30, 56), dtype=np.uint8)
        np.save(root / f"v{i}.npy", video)
        text = " ".join(DIGITS[d] for d in digits)
        lines.append({"audio": f"a{i}.wav", "video": f"v{i}.npy", "text": text, "task": "avsr"})
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return manifest


def write_config(tmp: Path, tokenizer_dir: Path, shards: Path) -> Path:
    model = tiny_model_section(tokenizer_dir, rate=2, hidden_dim=16)
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 4,
            "limit_val_batches": 1,
            "val_check_interval": 4,
            "check_val_every_n_epoch": None,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
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
            **model,
            "video_encoder": {
                "class_path": "mmalign.encoders.clip_video.CLIPVideoEncoder",
                "init_args": {"model": "tiny", "config": tiny_clip_config(), "freeze": False},
            },
            "video_projector": {
                "class_path": "mmalign.projectors.mlp.MLPProjector",
                "init_args": {"rate": 2, "hidden_dim": 16},
            },
            "modality_dropout": {"asr": 0.3, "vsr": 0.3},
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}},
            "max_new_tokens": 4,
            "predictions_dir": str(tmp / "pred"),
        },
        "data": {
            "train": str(shards),
            "val": str(shards),
            "test": str(shards),
            "max_batch_seconds": 3.0,
            "require_video": True,
            "video_time_masks": 1,
            "noise_snrs": [None, 0.0],
        },
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def av_fitted(tmp_path_factory, tokenizer_dir):
    from mmalign.data.shards import prepare

    tmp = tmp_path_factory.mktemp("avsr")
    manifest = write_av_corpus(tmp / "raw", 10)
    assert prepare(manifest, tmp / "shards", progress=False).written == 10
    config = write_config(tmp, tokenizer_dir, tmp / "shards")
    cli = cli_main(["fit", "--config", str(config)])
    return tmp, config, cli, manifest


def test_fit_trains_both_branches_and_checkpoints_them(av_fitted):
    tmp, _, cli, _ = av_fitted
    assert cli.trainer.global_step == 4
    ckpt = torch.load(tmp / "ckpt" / "last.ckpt", weights_only=False)
    keys = set(ckpt["state_dict"])
    assert keys == cli.model.trainable_names()
    assert any(k.startswith("model.video_projector.") for k in keys)
    assert any(k.startswith("model.video_encoder.") for k in keys)  # freeze: false
    assert not any(k.startswith("model.encoder.") for k in keys)  # Whisper stays frozen
    assert ckpt["mmalign"]["video_encoder"]["class_path"].endswith("CLIPVideoEncoder")


def test_test_stage_decodes_video_batches(av_fitted):
    tmp, config, _, _ = av_fitted
    cli_main(["test", "--config", str(config), "--ckpt_path", str(tmp / "ckpt" / "last.ckpt")])
    rows = (tmp / "pred" / "utterances.jsonl").read_text().splitlines()
    assert len(rows) == 10


def test_export_evaluate_and_transcribe_with_video(av_fitted):
    from mmalign.eval.evaluate import main as evaluate_main
    from mmalign.inference.export import load_checkpoint, load_exported
    from mmalign.inference.transcribe import main as transcribe_main

    tmp, _, _, manifest = av_fitted
    out = tmp / "export"
    main(["export", str(tmp / "ckpt" / "last.ckpt"), str(out)])
    assert (out / "video_projector.safetensors").is_file()
    assert (out / "video_encoder.safetensors").is_file()
    exported, trained = load_exported(out), load_checkpoint(tmp / "ckpt" / "last.ckpt")
    for a, b in [(exported.video_projector, trained.video_projector)]:
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert ka == kb and torch.equal(va, vb)
    assert exported.modalities == ("audio", "video")

    result = evaluate_main(
        [str(out), str(tmp / "shards"), "--out", str(tmp / "eval"), "--as-tasks", "asr",
         "vsr", "avsr", "--snr", "clean", "0", "--no-progress", "--max-new-tokens", "3"]
    )  # fmt: skip
    rows = result.metrics["results"]
    assert {(r["task"], r["snr"]) for r in rows} == {
        (t, s) for t in ("asr", "vsr", "avsr") for s in (None, 0.0)
    }
    assert result.metrics["data"]["utterances"] == 10
    vsr = {r["snr"]: r["wer"] for r in rows if r["task"] == "vsr"}
    assert vsr[None] == vsr[0.0]  # audio noise cannot change what lip reading sees

    summary = transcribe_main(
        [str(out), str(manifest), "--out", str(tmp / "tx"), "--no-progress",
         "--max-new-tokens", "3", "--formats", "txt"]
    )  # fmt: skip
    assert summary.transcribed == 10 and not summary.failed
    ledger = [json.loads(x) for x in (tmp / "tx" / "transcripts.jsonl").read_text().splitlines()]
    assert len(ledger) == 10 and all(r.get("error") is None for r in ledger)


def test_audio_only_input_to_a_video_model_is_a_per_file_error(av_fitted, tmp_path):
    from mmalign.inference.transcribe import transcribe

    tmp, _, _, _ = av_fitted
    summary = transcribe(
        tmp / "ckpt" / "last.ckpt",
        [tmp / "raw" / "a0.wav"],
        tmp_path / "tx",
        progress=False,
        formats=["txt"],
    )
    assert summary.transcribed == 0 and "has none" in summary.failed[0][1]
