"""Synthetic espeak-ng corpus: a tiny run, held-out voices, determinism."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import soundfile as sf

from mmalign.data.synthetic import espeak

pytestmark = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("sox") is None,
    reason=f"espeak-ng and sox are not installed ({espeak.INSTALL_HINT})",
)


def read(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def test_small_corpus(tmp_path: Path) -> None:
    manifests = espeak.synthesize(tmp_path, kind="mixed", n_train=4, n_val=2, n_test=2, seed=3)
    assert set(manifests) == {"train", "val", "test"}
    rows = {split: read(path) for split, path in manifests.items()}
    assert [len(rows[s]) for s in ("train", "val", "test")] == [4, 2, 2]
    for items in rows.values():
        for item in items:
            assert set(item) == {"audio", "text", "key", "voice", "speed", "pitch", "task"}
            assert item["task"] == "asr" and item["text"].strip()
            assert 130 <= item["speed"] <= 200 and 30 <= item["pitch"] <= 70
            info = sf.info(tmp_path / item["audio"])
            assert info.samplerate == 16000 and info.channels == 1 and info.duration > 0.2
    train_voices = {r["voice"] for r in rows["train"] + rows["val"]}
    assert not train_voices & {r["voice"] for r in rows["test"]}
    voices = json.loads((tmp_path / "voices.json").read_text())
    assert not set(voices["train"]) & set(voices["held_out"])
    assert {r["voice"] for r in rows["test"]} <= set(voices["held_out"])
    assert train_voices <= set(voices["train"])
    train_texts = {r["text"] for r in rows["train"]}
    assert not train_texts & {r["text"] for r in rows["val"] + rows["test"]}


def test_digits_are_words_and_deterministic(tmp_path: Path) -> None:
    kwargs = dict(kind="digits", n_train=3, n_val=1, n_test=1, seed=7, min_digits=3, max_digits=4)
    first = espeak.synthesize(tmp_path / "a", **kwargs, jobs=1)
    second = espeak.synthesize(tmp_path / "b", **kwargs, jobs=2)
    for split in first:
        assert first[split].read_text() == second[split].read_text()
    for row in read(first["train"]):
        words = row["text"].split()
        assert 3 <= len(words) <= 4 and set(words) <= set(espeak.DIGIT_WORDS)
    other = espeak.synthesize(tmp_path / "c", **{**kwargs, "seed": 8})
    assert other["train"].read_text() != first["train"].read_text()


def test_voice_pool_and_sentences() -> None:
    voices = espeak.english_voices()
    assert len(voices) > 50 and "en-us" in voices and any("+f" in v for v in voices)
    assert len(espeak.SENTENCES) >= 100 and len(set(espeak.SENTENCES)) == len(espeak.SENTENCES)


def test_missing_tool_message(monkeypatch) -> None:
    monkeypatch.setattr(espeak.shutil, "which", lambda tool: None)
    with pytest.raises(espeak.MissingToolError, match="apt-get install espeak-ng sox"):
        espeak.check_tools()
