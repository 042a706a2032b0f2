"""Issue 19, "no data lost", through the real ``mmalign`` command: a killed ``prepare`` keeps the
old output and resumes; damaged or mis-indexed shards are counted by the samples they lose or
refused at start-up; odd manifest lines get their own reasons."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml
from conftest import write_config, write_tone_corpus

from mmalign.cli import main
from mmalign.data.index import read_index
from mmalign.data.reading import read_shard_samples
from mmalign.data.shardset import resolve_shards

ROOT = Path(__file__).resolve().parents[2]


def mmalign(*args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "mmalign", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def noisy_corpus(root: Path, n: int, seconds: float = 2.0) -> Path:
    """``n`` clips of seeded noise (FLAC barely compresses it: writing takes a while)."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    with open(root / "manifest.jsonl", "w") as f:
        for i in range(n):
            sf.write(root / f"n{i:03d}.wav", rng.uniform(-0.5, 0.5, int(16000 * seconds)), 16000)
            f.write(json.dumps({"audio": f"n{i:03d}.wav", "text": f"clip {i}"}) + "\n")
    return root / "manifest.jsonl"


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def keys_of(folder: Path) -> list[str]:
    return [s["__key__"] for s in read_shard_samples(folder)[0]]


def kill_after_first_shard(args: list[str], work: Path) -> None:
    """Start ``mmalign prepare``, SIGKILL it once its journal records a finished shard."""
    proc = mmalign("prepare", *args)
    journal = work / "progress.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads(journal.read_text())["shards"]:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    assert proc.poll() is None, f"prepare finished before it could be killed: {proc.stderr.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_killed_prepare_keeps_old_output_and_resumes_to_identical_shards(tmp_path):
    old = write_tone_corpus(tmp_path / "old", 15)
    new = noisy_corpus(tmp_path / "new", 60)
    out = tmp_path / "out"
    main(["prepare", str(old), str(out), "--shard_max_count", "8"])
    before, old_keys = shard_bytes(out), keys_of(out)
    assert len(before) == 2 and len(old_keys) == 15

    args = [str(new), str(out), "--shard_max_count", "6"]
    kill_after_first_shard(args, out / ".shard.partial")
    assert shard_bytes(out) == before  # the old output is whole: same shards, same index
    assert keys_of(out) == old_keys

    main(["prepare", *args])  # resumes
    assert read_index(out)["total_samples"] == 60
    reference = tmp_path / "reference"
    main(["prepare", str(new), str(reference), "--shard_max_count", "6"])
    assert shard_bytes(out) == shard_bytes(reference)
    assert read_index(out)["shards"] == read_index(reference)["shards"]
    assert not (out / ".shard.partial").exists()


def test_killed_prepare_into_a_fresh_folder_leaves_nothing_readable(tmp_path):
    new = noisy_corpus(tmp_path / "new", 40)
    out = tmp_path / "out"
    kill_after_first_shard([str(new), str(out), "--shard_max_count", "4"], out / ".shard.partial")
    assert not list(out.glob("*.tar")) and not (out / "index.json").exists()
    with pytest.raises(FileNotFoundError, match="unfinished prepare"):
        resolve_shards(out)


def truncate_inside(shard: Path, sample: int) -> None:
    """Cut ``shard`` inside the data of the first member of its ``sample``-th sample."""
    import tarfile

    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    first = members[2 * sample]  # flac, json per sample
    data = shard.read_bytes()
    shard.write_bytes(data[: first.offset_data + first.size // 2])


def test_truncated_shard_counts_every_lost_sample_against_max_skip_rate(tmp_path, tokenizer_dir):
    manifest = write_tone_corpus(tmp_path / "raw", 12)
    shards = tmp_path / "shards"
    main(["prepare", str(manifest), str(shards), "--shard_max_count", "12"])
    truncate_inside(shards / "shard-000000.tar", 9)  # 9 samples survive, 3 are lost
    config = write_config(tmp_path, tokenizer_dir, shards)
    cfg = yaml.safe_load(config.read_text())
    cfg["data"].update(max_skip_rate=0.2, skip_rate_min_samples=5, val=None, test=None)
    cfg["trainer"].update(limit_val_batches=0)
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(config)])
    line = str(stop.value.code)
    assert "3 of 12 samples" in line and "lost in damaged shard: 3" in line
    assert "\n" not in line


def test_an_undercounting_index_is_refused_at_start_up(tmp_path, tokenizer_dir):
    manifest = write_tone_corpus(tmp_path / "raw", 12)
    shards = tmp_path / "shards"
    main(["prepare", str(manifest), str(shards)])
    index = read_index(shards)
    index["shards"][0]["samples"] = 3
    (shards / "index.json").write_text(json.dumps(index))
    config = write_config(tmp_path, tokenizer_dir, shards)
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(config)])
    line = str(stop.value.code)
    assert "index.json" in line and "checksum" in line and "\n" not in line


def test_manifest_lines_that_are_not_utf8_fifos_or_folders_get_their_own_reasons(tmp_path):
    raw = tmp_path / "raw"
    manifest = write_tone_corpus(raw, 2)
    os.mkfifo(raw / "pipe.wav")
    (raw / "folder.wav").mkdir()
    with open(manifest, "ab") as f:
        f.write(b'{"audio": "utt000.wav", "text": "caf\xe9"}\n')
        f.write(b'{"audio": "pipe.wav", "text": "one"}\n')
        f.write(b'{"audio": "folder.wav", "text": "two"}\n')
    out = tmp_path / "out"
    main(["prepare", str(manifest), str(out)])
    reasons = {s["line"]: s["reason"] for s in read_index(out)["skipped"]}
    assert reasons[3].startswith("not UTF-8 (byte 0xe9")
    assert "FIFO" in reasons[4]
    assert "directory" in reasons[5]
    assert read_index(out)["total_samples"] == 2


def test_prepare_lists_or_drops_clips_outside_the_length_limits(tmp_path):
    raw = tmp_path / "raw"
    manifest = write_tone_corpus(raw, 3)
    sf.write(raw / "long.wav", np.zeros(16000 * 40, dtype="float32"), 16000)
    sf.write(raw / "short.wav", np.zeros(800, dtype="float32"), 16000)
    with open(manifest, "a") as f:
        f.write(json.dumps({"audio": "long.wav", "text": "long"}) + "\n")
        f.write(json.dumps({"audio": "short.wav", "text": "short"}) + "\n")
    main(["prepare", str(manifest), str(tmp_path / "kept")])
    kept = read_index(tmp_path / "kept")
    assert kept["total_samples"] == 5
    assert [e["line"] for e in kept["out_of_range"]] == [4, 5]
    assert "40.00 s, outside max_seconds=30" in kept["out_of_range"][0]["reason"]
    main(["prepare", str(manifest), str(tmp_path / "dropped"), "--out_of_range", "drop"])
    dropped = read_index(tmp_path / "dropped")
    assert dropped["total_samples"] == 3
    assert {s["line"] for s in dropped["skipped"]} == {4, 5}


def test_evaluation_data_reports_each_sample_a_truncated_shard_lost(tmp_path):
    manifest = write_tone_corpus(tmp_path / "raw", 12)
    shards = tmp_path / "shards"
    main(["prepare", str(manifest), str(shards), "--shard_max_count", "6"])
    truncate_inside(shards / "shard-000001.tar", 2)  # samples 8-11 lost
    samples, skipped = read_shard_samples(shards)
    assert len(samples) == 8
    assert len(skipped) == 4 and all("lost in damaged shard" in s for s in skipped)


def test_parallel_prepare_writes_the_same_shards_and_resumes(tmp_path):
    new = noisy_corpus(tmp_path / "new", 40)
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    main(["prepare", str(new), str(serial), "--shard_max_count", "4"])
    args = [str(new), str(parallel), "--shard_max_count", "4", "--jobs", "2"]
    kill_after_first_shard(args, parallel / ".shard.partial")
    main(["prepare", *args])
    assert shard_bytes(parallel) == shard_bytes(serial)
    assert read_index(parallel)["shards"] == read_index(serial)["shards"]
