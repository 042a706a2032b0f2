"""prepare(): manifest and folder sources, bad items, index.json, read-back, resampling, caps."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds

from mmalign.data.encoding import sanitize_key
from mmalign.data.index import read_index
from mmalign.data.shards import prepare


def write_sine(path: Path, seconds: float, rate: int = 16000, channels: int = 1) -> int:
    """Write a quiet sine wave; returns its length in samples."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    wave = 0.3 * np.sin(2 * np.pi * 330 * t).astype(np.float32)
    data = np.stack([wave] * channels, axis=1) if channels > 1 else wave
    sf.write(path, data, rate)
    return n


def read_shards(out_dir: Path) -> list[dict]:
    urls = [str(out_dir / s["path"]) for s in read_index(out_dir)["shards"]]
    pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())
    samples = []
    for raw in pipeline:
        audio, rate = sf.read(io.BytesIO(raw["flac"]), dtype="float32")
        meta = json.loads(raw["json"])
        samples.append({**meta, "key": raw["__key__"], "audio": audio, "rate": rate, "meta": meta})
    return samples


@pytest.fixture
def manifest(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """A manifest with 5 good items and 4 bad ones (corrupt, missing, empty text, bad JSON)."""
    root = tmp_path / "corpus"
    write_sine(root / "wav" / "a.wav", 0.5)
    write_sine(root / "wav" / "b.wav", 1.0, rate=8000)
    write_sine(root / "wav" / "c.wav", 0.75, rate=44100, channels=2)
    write_sine(root / "wav" / "d.wav", 0.3)
    abs_path = tmp_path / "elsewhere" / "e.flac"
    write_sine(abs_path, 0.4)
    (root / "wav" / "corrupt.wav").write_bytes(b"RIFF\x00\x00not really a wave file" * 20)
    lines = [
        json.dumps({"audio": "wav/a.wav", "text": "alpha one", "key": "spk1.utt.a", "task": "asr"}),
        json.dumps({"audio": "wav/b.wav", "text": "bravo  two", "id": "b", "speaker": "s2"}),
        json.dumps({"audio": "wav/corrupt.wav", "text": "corrupt"}),  # line 3
        json.dumps({"audio": "wav/c.wav", "text": "charlie", "key": "spk1.utt.a"}),  # dup key
        json.dumps({"audio": "wav/missing.wav", "text": "missing"}),  # line 5
        "",
        json.dumps({"audio": "wav/d.wav", "text": "   "}),  # line 7: empty text
        '{"audio": "wav/d.wav", "text": ',  # line 8: bad JSON
        json.dumps({"audio": str(abs_path), "text": "echo", "key": "e"}),
    ]
    path = root / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    # key -> length in samples at 16 kHz
    expected = {"spk1_utt_a": 8000, "b": 16000, "spk1_utt_a_1": 12000, "e": 6400}
    return path, expected


def test_manifest_bad_items_reported_rest_written(manifest, tmp_path, caplog) -> None:
    path, expected = manifest
    out = tmp_path / "shards"
    with caplog.at_level("WARNING"):
        report = prepare(path, out, progress=False, root=tmp_path)  # e.flac lies beside corpus/
    assert report.ok and report.written == 4
    assert sorted(s.line for s in report.skipped) == [3, 5, 7, 8]
    by_line = {s.line: s.reason for s in report.skipped}
    assert "unreadable audio" in by_line[3]
    assert "not found" in by_line[5]
    assert "empty" in by_line[7]
    assert "invalid JSON" in by_line[8]
    assert all(s.source == str(path) for s in report.skipped)
    assert "train.jsonl:8" in caplog.text  # warnings name file and line

    index = json.loads((out / "index.json").read_text())
    assert index["total_samples"] == 4
    assert index["total_seconds"] == pytest.approx(sum(expected.values()) / 16000, abs=1e-3)
    assert sum(s["samples"] for s in index["shards"]) == 4
    assert len(index["skipped"]) == 4 and {s["line"] for s in index["skipped"]} == {3, 5, 7, 8}
    assert report.total_seconds == pytest.approx(index["total_seconds"])


def test_read_back_texts_lengths_and_fields(manifest, tmp_path) -> None:
    path, expected = manifest
    out = tmp_path / "shards"
    prepare(path, out, progress=False, root=tmp_path)
    samples = {s["key"]: s for s in read_shards(out)}
    assert set(samples) == set(expected)
    assert all("." not in key for key in samples)
    for key, n in expected.items():
        sample = samples[key]
        assert sample["rate"] == 16000 and sample["sample_rate"] == 16000
        assert sample["audio"].ndim == 1  # stereo input is down-mixed
        assert abs(len(sample["audio"]) - n) <= 1  # 8 kHz and 44.1 kHz inputs resampled
        assert sample["duration"] == pytest.approx(len(sample["audio"]) / 16000, abs=1e-4)
    assert samples["spk1_utt_a"]["text"] == "alpha one"
    assert samples["b"]["text"] == "bravo two"  # whitespace normalised
    assert samples["b"]["speaker"] == "s2" and samples["spk1_utt_a"]["task"] == "asr"
    assert samples["spk1_utt_a"]["source"].endswith("a.wav")
    assert samples["spk1_utt_a"]["meta"]["key"] == "spk1.utt.a"  # original key kept in the JSON


def test_resampling_keeps_pitch(tmp_path) -> None:
    write_sine(tmp_path / "low.wav", 1.0, rate=8000)
    (tmp_path / "m.jsonl").write_text(json.dumps({"audio": "low.wav", "text": "x"}) + "\n")
    prepare(tmp_path / "m.jsonl", tmp_path / "out", progress=False)
    (sample,) = read_shards(tmp_path / "out")
    audio = sample["audio"]
    assert len(audio) == 16000
    spectrum = np.abs(np.fft.rfft(audio))
    assert np.argmax(spectrum) == pytest.approx(330, abs=2)  # 1 Hz bins over one second


def test_folder_source(tmp_path) -> None:
    root = tmp_path / "corpus"
    write_sine(root / "spk1" / "u1.wav", 0.5)
    (root / "spk1" / "u1.txt").write_text("hello world\n")
    write_sine(root / "spk2" / "deep" / "u.2.flac", 0.25)
    (root / "spk2" / "deep" / "u.2.txt").write_text("second one")
    write_sine(root / "spk2" / "orphan.wav", 0.25)  # no transcript
    report = prepare(root, tmp_path / "out", progress=False)
    assert report.written == 2
    assert len(report.skipped) == 1 and "orphan.wav" in report.skipped[0].source
    assert report.skipped[0].line is None
    samples = {s["key"]: s["text"] for s in read_shards(tmp_path / "out")}
    assert samples == {"spk1_u1": "hello world", "spk2_deep_u_2": "second one"}


def test_size_and_count_caps_make_several_shards(tmp_path) -> None:
    lines = []
    rng = np.random.default_rng(0)
    for i in range(12):
        path = tmp_path / "wav" / f"n{i}.wav"
        path.parent.mkdir(exist_ok=True)
        sf.write(path, (0.1 * rng.standard_normal(8000)).astype(np.float32), 16000)  # ~16 kB FLAC
        lines.append(json.dumps({"audio": f"wav/n{i}.wav", "text": f"utt {i}"}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")

    report = prepare(
        tmp_path / "m.jsonl", tmp_path / "by_size", shard_max_bytes=40_000, progress=False
    )
    assert len(report.shards) >= 3
    assert sum(s.samples for s in report.shards) == 12
    tars = sorted(p.name for p in (tmp_path / "by_size").glob("*.tar"))
    assert tars == [s.path for s in report.shards] and tars[0] == "shard-000000.tar"

    report = prepare(
        tmp_path / "m.jsonl", tmp_path / "by_count", shard_max_count=5, prefix="dev", progress=False
    )
    assert [s.samples for s in report.shards] == [5, 5, 2]
    assert report.shards[0].path == "dev-000000.tar"
    assert len(read_shards(tmp_path / "by_count")) == 12


def test_nothing_written_is_not_ok(tmp_path) -> None:
    (tmp_path / "m.jsonl").write_text(json.dumps({"audio": "nope.wav", "text": "x"}) + "\n{oops\n")
    report = prepare(tmp_path / "m.jsonl", tmp_path / "out", progress=False)
    assert not report.ok and report.written == 0 and len(report.skipped) == 2
    assert not list((tmp_path / "out").glob("*.tar"))
    assert read_index(tmp_path / "out")["total_samples"] == 0


def test_rerun_replaces_old_shards(tmp_path) -> None:
    write_sine(tmp_path / "a.wav", 0.2)
    (tmp_path / "m.jsonl").write_text(json.dumps({"audio": "a.wav", "text": "a"}) + "\n")
    stale = tmp_path / "out" / "shard-000007.tar"
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    prepare(tmp_path / "m.jsonl", tmp_path / "out", progress=False)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["shard-000000.tar"]


def test_sanitize_key() -> None:
    assert sanitize_key("spk/utt.01 x") == "spk_utt_01_x"
    assert sanitize_key("...") == "sample"
