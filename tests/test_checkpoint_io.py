"""Atomic checkpoint writes and weights_only loads, unit and end to end through the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_model_section, write_translation_shards
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from mmalign.checkpoint_io import (
    AtomicCheckpointIO,
    CheckpointLoadError,
    CheckpointSaveError,
    checkpoint_plugins,
    load_checkpoint_file,
    plain_hparams,
)
from mmalign.data.stages import MixSource

REPO = Path(__file__).resolve().parents[1]


class Custom:
    """An arbitrary class, which weights_only refuses."""


class Payload:
    """Unpickling this runs ``__reduce__``'s call: it touches ``marker``."""

    def __init__(self, marker: str = "") -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).touch, ())


def folder_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_failed_write_keeps_previous_checkpoint_and_no_temp(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, target)
    real_save = torch.save

    def half_then_fail(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, target)
    monkeypatch.setattr(torch, "save", real_save)
    assert folder_names(tmp_path) == ["last.ckpt"]
    ckpt = io.load_checkpoint(target)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.ones(3))
    io.save_checkpoint({"step": 3, "w": torch.zeros(3)}, target)
    assert io.load_checkpoint(target)["step"] == 3
    assert folder_names(tmp_path) == ["last.ckpt"]


def test_save_replaces_a_symlinked_last_with_a_file(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, tmp_path / "epoch=0.ckpt")
    (tmp_path / "last.ckpt").symlink_to(tmp_path / "epoch=0.ckpt")
    io.save_checkpoint({"step": 2}, tmp_path / "last.ckpt")
    assert not (tmp_path / "last.ckpt").is_symlink()
    assert io.load_checkpoint(tmp_path / "last.ckpt")["step"] == 2
    assert io.load_checkpoint(tmp_path / "epoch=0.ckpt")["step"] == 1


def test_checkpoint_that_would_not_load_is_not_written(tmp_path):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, target)
    with pytest.raises(CheckpointSaveError, match=r"Custom.*'callbacks'.*left as it was"):
        io.save_checkpoint({"step": 2, "callbacks": {"x": Custom()}}, target)
    assert folder_names(tmp_path) == ["last.ckpt"]
    assert io.load_checkpoint(target)["step"] == 1


def test_hyperparameters_are_stored_as_plain_types(tmp_path):
    from jsonargparse import Namespace as JNamespace

    io = AtomicCheckpointIO()
    hparams = {
        "train": [MixSource("a/shards", task="asr"), MixSource("b", 2.0, "st", "de")],
        "cfg": JNamespace(lr=1e-3, inner=JNamespace(x=Path("/data"))),
        "plain": Namespace(k=(1, 2)),
        "numbers": [np.float32(0.5), np.arange(2)],
    }
    io.save_checkpoint({"datamodule_hyper_parameters": hparams}, tmp_path / "x.ckpt")
    loaded = torch.load(tmp_path / "x.ckpt", weights_only=True)["datamodule_hyper_parameters"]
    assert loaded["train"] == [
        {"shards": "a/shards", "weight": 1.0, "task": "asr", "target_lang": None},
        {"shards": "b", "weight": 2.0, "task": "st", "target_lang": "de"},
    ]
    assert loaded["cfg"] == {"lr": 1e-3, "inner": {"x": "/data"}}
    assert loaded["plain"] == {"k": (1, 2)} and loaded["numbers"] == [0.5, [0, 1]]
    assert isinstance(hparams["train"][0], MixSource)  # the caller's objects are untouched
    assert plain_hparams({"f": Custom}) == {"f": f"{__name__}.Custom"}


def test_load_refuses_weights_only_false(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, tmp_path / "a.ckpt")
    with pytest.raises(ValueError, match="weights_only=False.*arbitrary code"):
        io.load_checkpoint(tmp_path / "a.ckpt", weights_only=False)


def test_load_refuses_a_pickled_object_naming_the_file(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": Custom(), "y": Payload(str(marker))}, evil)
    for load in (AtomicCheckpointIO().load_checkpoint, load_checkpoint_file):
        with pytest.raises(CheckpointLoadError, match=r"evil\.ckpt.*weights_only=True") as err:
            load(evil)
        assert "Custom" in str(err.value)
    assert not marker.exists()  # nothing in the file ran


def test_load_of_a_non_checkpoint_names_the_file(tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"definitely not a zip")
    with pytest.raises(CheckpointLoadError, match=r"junk\.ckpt: not a readable checkpoint"):
        AtomicCheckpointIO().load_checkpoint(junk)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_checkpoint_file(tmp_path / "missing.ckpt")


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    target = tmp_path / "last.ckpt"
    ready = tmp_path / "ready"
    script = textwrap.dedent(
        f"""
        import time, torch
        from mmalign.checkpoint_io import AtomicCheckpointIO
        io = AtomicCheckpointIO()
        io.save_checkpoint({{"step": 1}}, {str(target)!r})
        def slow(obj, f, *a, **k):
            f.write(b"PK" + bytes(1 << 16))
            f.flush()
            open({str(ready)!r}, "w").close()
            time.sleep(60)
        torch.save = slow
        io.save_checkpoint({{"step": 2}}, {str(target)!r})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "child did not start"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    stale = [n for n in folder_names(tmp_path) if n.startswith(".last.ckpt.tmp-")]
    assert len(stale) == 1  # the half-written temporary, never the target
    io = AtomicCheckpointIO()
    assert io.load_checkpoint(target)["step"] == 1
    io.save_checkpoint({"step": 3}, target)  # the next save clears the dead process's temp
    assert folder_names(tmp_path) == ["last.ckpt", "ready"]


def test_plugin_added_unless_config_brings_its_own():
    (io,) = checkpoint_plugins(None, "auto")
    assert isinstance(io, AtomicCheckpointIO)
    assert checkpoint_plugins([TorchCheckpointIO()], "auto") is None
    assert checkpoint_plugins(None, "deepspeed_stage_2") is None
    mixed = checkpoint_plugins("bf16-mixed", "ddp")
    assert mixed[0] == "bf16-mixed" and isinstance(mixed[1], AtomicCheckpointIO)


# -- end to end: tiny fit over a mixture of sources, resume with --ckpt_path last ----------------


def mixture_config(tmp: Path, tokenizer_dir: Path, shards: Path, max_steps: int) -> Path:
    mix = [
        {"shards": str(shards), "task": "asr"},
        {"shards": str(shards), "task": "st", "target_lang": "de", "weight": 0.5},
    ]
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": max_steps,
            "val_check_interval": 2,
            "check_val_every_n_epoch": None,
            "limit_val_batches": 1,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
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
            **tiny_model_section(tokenizer_dir),
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}},
            "scheduler": {
                "class_path": "mmalign.lightning_modules.schedules.WarmupCosine",
                "init_args": {"warmup_steps": 1},
            },
            "max_new_tokens": 3,
            "predictions_dir": str(tmp / "pred"),
        },
        "data": {"train": mix, "val": mix, "max_batch_seconds": 4.0},
    }
    path = tmp / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tokenizer_dir):
    from mmalign.cli import cli_main

    tmp = tmp_path_factory.mktemp("atomic")
    shards = write_translation_shards(tmp / "data", 8)
    config = mixture_config(tmp, tokenizer_dir, shards, max_steps=2)
    cli = cli_main(["fit", "--config", str(config)])
    return tmp, config, cli


def test_fit_uses_atomic_io_and_last_loads_weights_only(fitted):
    tmp, _, cli = fitted
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    last = tmp / "ckpt" / "last.ckpt"
    assert last.is_file() and not last.is_symlink()
    assert not [n for n in folder_names(tmp / "ckpt") if ".tmp-" in n]
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    train = ckpt["datamodule_hyper_parameters"]["train"]
    assert [s["task"] for s in train] == ["asr", "st"] and train[1]["target_lang"] == "de"
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"] and ckpt["mmalign"]


def test_fit_resumes_from_last(fitted):
    from mmalign.cli import cli_main

    tmp, config, _ = fitted
    last = tmp / "ckpt" / "last.ckpt"
    cli = cli_main(
        ["fit", "--config", str(config), "--trainer.max_steps", "4", "--ckpt_path", "last"]
    )
    assert Path(cli.trainer.ckpt_path) == last
    assert cli.trainer.global_step == 4
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4
    steps = {float(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()}
    assert steps == {4.0}  # AdamW went on from step 2, not from scratch


def test_cli_refuses_a_pickled_checkpoint_naming_it(fitted):
    from mmalign.cli import cli_main

    tmp, config, _ = fitted
    marker = tmp / "ran"
    evil = tmp / "evil.ckpt"
    good = torch.load(tmp / "ckpt" / "last.ckpt", weights_only=True)
    torch.save({**good, "extra": Payload(str(marker))}, evil)
    with pytest.raises(SystemExit, match=r"evil\.ckpt.*weights_only=True"):
        cli_main(["validate", "--config", str(config), "--ckpt_path", str(evil)])
    assert not marker.exists()


def test_cli_refuses_weights_only_false(fitted):
    from mmalign.cli import cli_main

    tmp, config, _ = fitted
    last = str(tmp / "ckpt" / "last.ckpt")
    args = ["validate", "--config", str(config), "--ckpt_path", last, "--weights_only", "false"]
    with pytest.raises((SystemExit, ValueError), match="weights_only=False.*arbitrary code"):
        cli_main(args)


def test_export_is_safetensors_and_loads_without_pickle(fitted, monkeypatch):
    from mmalign.cli import main
    from mmalign.inference.export import load_exported

    tmp, _, cli = fitted
    out = tmp / "export"
    main(["export", str(tmp / "ckpt" / "last.ckpt"), str(out)])
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".json", ".safetensors", ".md"}, files
    assert (out / "adapter" / "adapter_model.safetensors").is_file()

    def no_pickle(*args, **kwargs):
        raise AssertionError("loading an export must not unpickle anything")

    monkeypatch.setattr(torch, "load", no_pickle)
    model = load_exported(out)
    assert model.projector.state_dict().keys() == cli.model.model.projector.state_dict().keys()
