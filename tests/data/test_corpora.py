"""LibriSpeech and Common Voice layouts through ``mmalign prepare``: counts, durations, text,
kept fields, skips with reasons, auto-detection and split selection."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import soundfile as sf

from mmalign.cli import main
from mmalign.data.index import read_index
from mmalign.data.reading import read_shard_samples


def tone(path, seconds: float, fmt: str = "FLAC", rate: int = 16000) -> None:
    t = np.arange(int(rate * seconds)) / rate
    sf.write(path, (0.3 * np.sin(2 * np.pi * 220 * t)).astype("float32"), rate, format=fmt)


def librispeech(root, split: str, speakers: dict[str, list[float]]) -> None:
    """``root/split/speaker/chapter`` with one FLAC per duration and its transcript."""
    for speaker, durations in speakers.items():
        chapter = root / split / speaker / "100"
        chapter.mkdir(parents=True)
        lines = []
        for n, seconds in enumerate(durations):
            key = f"{speaker}-100-{n:04d}"
            tone(chapter / f"{key}.flac", seconds)
            lines.append(f"{key} WORDS OF {key.upper()}")
        (chapter / f"{speaker}-100.trans.txt").write_text("\n".join(lines) + "\n")


def test_librispeech_root_with_two_splits_in_one_call(tmp_path):
    librispeech(tmp_path / "LS", "train-clean-100", {"19": [1.0, 1.5], "26": [0.75]})
    librispeech(tmp_path / "LS", "train-other-500", {"31": [2.0]})
    librispeech(tmp_path / "LS", "dev-clean", {"84": [1.25]})
    chapter = tmp_path / "LS/train-clean-100/19/100"
    (chapter / "19-100-0001.flac").unlink()  # listed but missing
    with open(chapter / "19-100.trans.txt", "a") as fh:
        fh.write("19-100-0009\n")  # no text
    out = tmp_path / "shards"
    main(["prepare", str(tmp_path / "LS"), str(out), "--split", "train-clean-100,train-other-500"])
    index = read_index(out)
    assert index["source_format"] == "librispeech" and index["normalizer"] == "english"
    samples = {s["__key__"]: s for s in read_shard_samples(out)[0]}
    assert sorted(samples) == ["19-100-0000", "26-100-0000", "31-100-0000"]
    assert abs(samples["31-100-0000"]["duration"] - 2.0) < 1e-3
    assert samples["26-100-0000"]["text"] == "WORDS OF 26-100-0000"
    assert samples["26-100-0000"]["meta"]["speaker"] == "26"
    reasons = sorted(s["reason"] for s in index["skipped"])
    assert reasons[0].startswith("19-100-0009: empty text")
    assert reasons[1].startswith("audio file not found") and "19-100-0001.flac" in reasons[1]


def test_librispeech_split_folder_is_recognised(tmp_path):
    librispeech(tmp_path, "dev-clean", {"84": [0.5, 0.5]})
    main(["prepare", str(tmp_path / "dev-clean"), str(tmp_path / "out")])
    assert read_index(tmp_path / "out")["total_samples"] == 2
    with pytest.raises(SystemExit, match="split 'nope'"):
        main(["prepare", str(tmp_path), str(tmp_path / "x"), "--split", "nope"])


def common_voice(root) -> None:
    (root / "clips").mkdir(parents=True)
    header = ["client_id", "path", "sentence", "up_votes", "down_votes", "age", "locale"]
    rows = {
        "train": [
            ["c1", "a.mp3", "Hello there.", "2", "0", "twenties", "en"],
            ["c2", "b.mp3", "", "2", "0", "", "en"],
            ["c2", "missing.mp3", "Gone.", "3", "1", "", "en"],
            ["c3", "c.mp3", "Good bye.", "5", "1", "", "en"],
        ],
        "test": [["c4", "d.mp3", "Test one.", "2", "0", "", "en"]],
    }
    for name, seconds in (("a", 1.0), ("b", 1.0), ("c", 1.5), ("d", 0.5)):
        tone(root / "clips" / f"{name}.mp3", seconds, fmt="MP3")
    for split, table in rows.items():
        with open(root / f"{split}.tsv", "w", newline="") as fh:
            writer = csv.writer(fh, delimiter="\t")
            writer.writerow(header)
            writer.writerows(table)


def test_common_voice_release_folder(tmp_path):
    common_voice(tmp_path / "cv")
    out = tmp_path / "shards"
    main(["prepare", str(tmp_path / "cv"), str(out), "--split", "train"])
    index = read_index(out)
    assert index["source_format"] == "common_voice" and index["total_samples"] == 2
    samples = {s["__key__"]: s for s in read_shard_samples(out)[0]}
    assert samples["a"]["text"] == "Hello there."
    assert samples["c"]["meta"]["up_votes"] == 5 and samples["a"]["meta"]["age"] == "twenties"
    assert samples["c"]["meta"]["speaker"] == "c3"
    assert abs(samples["c"]["duration"] - 1.5) < 1e-3
    reasons = {s["line"]: s["reason"] for s in index["skipped"]}
    assert reasons[3] == "empty 'sentence'" and "missing.mp3" in reasons[4]
    with pytest.raises(SystemExit, match="pass split"):
        main(["prepare", str(tmp_path / "cv"), str(tmp_path / "x")])
