"""Scale and reliability through real `mmalign fit` processes on tiny models: a SIGKILLed run
resumes exactly, and 2-process DDP (gloo, CPU) reads uneven shards each sample once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import tiny_model_section, write_tone_corpus

from mmalign.data.shards import prepare

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory) -> Path:
    """19 tone clips in 5 shards of at most 4: they divide evenly neither by 2 ranks nor by
    2 workers."""
    root = tmp_path_factory.mktemp("uneven")
    manifest = write_tone_corpus(root / "raw", 19, seed=4)
    report = prepare(manifest, root / "shards", shard_max_count=4, progress=False)
    assert report.written == 19 and len(report.shards) == 5
    return root / "shards"


def _config(tmp: Path, tokenizer_dir: Path, shards: Path, **over: Any) -> Path:
    model = tiny_model_section(tokenizer_dir)
    model["llm"]["init_args"]["adapter"]["init_args"]["lora_dropout"] = 0.1  # seeded per step
    cfg: dict[str, Any] = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": -1,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": False,
            "default_root_dir": str(tmp / "run"),
            "callbacks": [
                {
                    "class_path": "mmalign.lightning_modules.callbacks.BatchLog",
                    "init_args": {"dirpath": str(tmp / "batches")},
                },
                {
                    "class_path": "scale_helpers.PauseAt",
                    "init_args": {"marker": str(tmp / "paused")},
                },
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(tmp / "ckpt"),
                        "save_last": True,
                        "save_top_k": 0,
                        "every_n_train_steps": 4,
                    },
                },
            ],
        },
        "model": {
            **model,
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}},
            "scheduler": {
                "class_path": "mmalign.lightning_modules.schedules.WarmupCosine",
                "init_args": {"warmup_steps": 2},
            },
            "max_new_tokens": 3,
        },
        "data": {
            "train": str(shards),
            "max_batch_seconds": 2.0,
            "bucket_buffer": 8,
            "shuffle_buffer": 8,
            "sampling": "exact",
            "seed": 3,
        },
    }
    for dotted, value in over.items():
        node = cfg
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "tests" / "lightning_modules"), str(REPO), env.get("PYTHONPATH", "")]
    )
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    env.pop("MMALIGN_TEST_PAUSE_AT", None)
    env.update(extra)
    return env


def _fit(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mmalign", "fit", "--config", str(config), *args]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env or _env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"timed out (a hang?):\n{out[-4000:]}") from None
    assert proc.returncode == 0, out[-4000:]
    return out


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_sigkill_mid_epoch_then_resume_repeats_uninterrupted_run(
    tmp_path, tokenizer_dir, uneven_shards
) -> None:
    """Two epochs (about 6 steps each) with 2 data workers; the killed run stops in epoch 2,
    after its last checkpoint (step 8)."""
    steps = {"trainer__max_steps": 13, "data__num_workers": 2, "data__max_batch_seconds": 3.0}
    straight = tmp_path / "straight"
    straight.mkdir()
    _finish(_fit(_config(straight, tokenizer_dir, uneven_shards, **steps)))
    expected = _rows(straight / "batches" / "rank0.jsonl")
    assert [r["step"] for r in expected] == list(range(1, 14))
    epoch_of = {r["step"]: r["epoch"] for r in expected}
    assert epoch_of[8] == epoch_of[11] > 0, epoch_of  # checkpoint and kill mid-epoch 2

    crashed = tmp_path / "crashed"
    crashed.mkdir()
    config = _config(crashed, tokenizer_dir, uneven_shards, **steps)
    proc = _fit(config, env=_env(MMALIGN_TEST_PAUSE_AT="10"))
    deadline = time.monotonic() + 300
    while not (crashed / "paused").exists():
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "the run never reached step 10"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    before = _rows(crashed / "batches" / "rank0.jsonl")
    assert [r["step"] for r in before] == list(range(1, 11))
    last = torch.load(crashed / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 8  # steps 9 and 10 were lost with the process

    out = _finish(_fit(config, "--ckpt_path", "last"))
    assert "not resumable" not in out  # Lightning sees a stateful loader position
    after = _rows(crashed / "batches" / "rank0.jsonl")[len(before) :]
    resumed = [r for r in before if r["step"] <= 8] + after
    assert [r["step"] for r in resumed] == [r["step"] for r in expected]
    assert [r["keys"] for r in resumed] == [r["keys"] for r in expected]
    for got, want in zip(resumed, expected, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6), (got, want)
    # the replayed steps 9 and 10 are those the killed run had trained on
    assert [r["keys"] for r in before[8:]] == [r["keys"] for r in after[:2]]


def test_ddp_two_processes_read_uneven_shards_once_per_epoch(
    tmp_path, tokenizer_dir, uneven_shards
) -> None:
    config = _config(
        tmp_path,
        tokenizer_dir,
        uneven_shards,
        trainer__max_epochs=2,
        trainer__devices=2,
        trainer__strategy="ddp",
        data__val=str(uneven_shards),
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(29500 + os.getpid() % 1000),
        "-m",
        "mmalign",
        "fit",
        "--config",
        str(config),
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    out = _finish(proc)
    ranks = [_rows(tmp_path / "batches" / f"rank{r}.jsonl") for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) > 0, out[-3000:]  # same number of steps
    everyone = {f"utt{i:03d}" for i in range(19)}
    pads = 0
    for epoch in (0, 1):
        seen = [
            [k for row in rows if row["epoch"] == epoch and not row["pad"] for k in row["keys"]]
            for rows in ranks
        ]
        both = Counter(seen[0] + seen[1])
        assert set(both) == everyone and set(both.values()) == {1}, both  # once, all of them
        assert not set(seen[0]) & set(seen[1])  # no sample on both ranks
        pads += sum(row["pad"] for rows in ranks for row in rows if row["epoch"] == epoch)
    assert pads > 0  # the shards did not divide evenly, and the short rank was padded
    assert "val/wer" in out  # validation ran on both ranks and was gathered


def test_ddp_spawn_with_spawned_workers_reads_each_sample_once(
    tmp_path, tokenizer_dir, uneven_shards
) -> None:
    """Lightning's own launcher (no torchrun: no RANK in the environment) and workers started
    with spawn, which have no process group: the main process tells them their rank."""
    config = _config(
        tmp_path,
        tokenizer_dir,
        uneven_shards,
        trainer__max_epochs=1,
        trainer__devices=2,
        trainer__strategy="ddp_spawn",
        data__num_workers=1,
        data__worker_context="spawn",
    )
    env = _env()
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    out = _finish(_fit(config, env=env))
    ranks = [_rows(tmp_path / "batches" / f"rank{r}.jsonl") for r in (0, 1)]
    seen = [[k for row in rows if not row["pad"] for k in row["keys"]] for rows in ranks]
    both = Counter(seen[0] + seen[1])
    assert set(both) == {f"utt{i:03d}" for i in range(19)}, out[-3000:]
    assert set(both.values()) == {1}, both  # each sample once, on one rank
