"""Synthetic audio-visual corpus: phoneme timings, visemes, rendering, determinism, a tiny run."""

from __future__ import annotations

import hashlib
import json
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest

from mmalign.data.synthetic import espeak, lips

pytestmark = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("sox") is None or lips.find_library() is None,
    reason=f"espeak-ng, libespeak-ng and sox are not installed ({lips.LIB_INSTALL_HINT})",
)

FIELDS = {"audio", "video", "video_fps", "text", "key", "voice", "speed", "pitch", "task"}


def read(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def frame(viseme: str, voice: str = "en-gb") -> np.ndarray:
    track = np.asarray([lips.VISEMES[viseme]], dtype=np.float32)
    return lips.render_mouth(track, lips.speaker_style(voice))[0]


def test_phoneme_events_monotonic_and_within_audio() -> None:
    rate, samples, events = lips.phoneme_events("three one four", "en-us+m3", 160, 50)
    assert rate == 22050 and samples.dtype == np.int16 and len(samples) > rate // 2
    times = [t for t, _ in events]
    assert times == sorted(times) and times[0] >= 0
    assert times[-1] <= len(samples) / rate
    names = [name for _, name in events]
    assert names[:3] == ["T", "r", "i:"] and "f" in names
    # a fresh process per utterance: the same call gives the same samples
    assert np.array_equal(lips.phoneme_events("three one four", "en-us+m3", 160, 50)[1], samples)


def test_every_emitted_mnemonic_has_a_viseme() -> None:
    accents = sorted({voice.split("+")[0] for voice in espeak.english_voices()})
    digits = " ".join(espeak.DIGIT_WORDS)
    seen: set[str] = set()
    for i, accent in enumerate(accents):  # a third of the sentences each, ~330 words
        text = " ".join([digits, *espeak.SENTENCES[i % 3 :: 3]])
        seen |= {name for _, name in lips.phoneme_events(text, accent)[2]}
    unknown = seen - set(lips.PHONEME_VISEMES)
    assert not unknown, f"no viseme for espeak phonemes {sorted(unknown)}"
    assert all(v in lips.VISEMES for vs in lips.PHONEME_VISEMES.values() for v in vs)
    assert 10 <= len(lips.VISEMES) <= 14
    # unknown names are guessed, never fatal
    for name in ("", "_x", "zz9", "@@7", "q"):
        assert set(lips.phoneme_visemes(name)) <= set(lips.VISEMES)


def test_visemes_look_different_except_shared_ones() -> None:
    style = lips.speaker_style("en-gb")
    dark = {v: int((frame(v) < style.lips - 10).sum()) for v in lips.VISEMES}
    assert dark["AA"] > 5 * dark["PBM"]
    assert lips.phoneme_visemes("p") == lips.phoneme_visemes("b") == lips.phoneme_visemes("m")
    names = list(lips.VISEMES)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if {a, b} != {"SIL", "PBM"}:  # both closed lips, as in real lip reading
                diff = np.abs(frame(a).astype(float) - frame(b)).mean()
                assert diff > 0.3, (a, b, diff)


def test_track_follows_phonemes() -> None:
    events = [(0.0, "_"), (0.1, "m"), (0.3, "A:"), (0.7, "p"), (0.8, "_:")]
    track = lips.mouth_track(events, 1.01, fps=25.0)
    assert track.shape == (25, 5) and track.dtype == np.float32  # round(1.01 * 25)
    opening = track[:, 0]
    assert opening[5] < 0.05  # 0.22 s: lips closed for m
    assert opening[12] > 0.9  # 0.5 s: wide open for A:
    assert opening[-1] < 0.05  # silence at the end
    assert lips.mouth_track([], 0.001).shape == (1, 5)


def test_small_corpus(tmp_path: Path) -> None:
    manifests = lips.synthesize_av(tmp_path, kind="mixed", n_train=4, n_val=2, n_test=2, seed=3)
    rows = {split: read(path) for split, path in manifests.items()}
    assert [len(rows[s]) for s in ("train", "val", "test")] == [4, 2, 2]
    for split, items in rows.items():
        for item in items:
            assert set(item) == FIELDS | {"synthetic"} and item["synthetic"] is True
            assert item["task"] == "avsr" and item["video_fps"] == 25.0
            assert item["audio"] == f"{split}/{item['key']}.wav"
            assert item["video"] == f"{split}/{item['key']}.npy"
            with wave.open(str(tmp_path / item["audio"]), "rb") as wav:
                assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2)
                seconds = wav.getnframes() / 16000
                pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16)
            peak_db = 20 * np.log10(np.abs(pcm).max() / 32768)
            assert -1.5 < peak_db < -0.5  # gain -n -1 (before resampling)
            video = np.load(tmp_path / item["video"])
            assert video.dtype == np.uint8 and video.shape[1:] == (96, 96)
            assert abs(len(video) - seconds * 25.0) <= 1
            assert video.std(axis=0).max() > 20  # the mouth moves
    voices = json.loads((tmp_path / "voices.json").read_text())
    assert {r["voice"] for r in rows["test"]} <= set(voices["held_out"])
    # the same plan as the audio-only corpus
    plan, _, _ = espeak._plan("mixed", {"train": 4, "val": 2, "test": 2}, 3, 8, 3, 8)
    assert [u.text for u in plan] == [r["text"] for s in ("train", "val", "test") for r in rows[s]]


def test_deterministic(tmp_path: Path) -> None:
    kwargs = dict(kind="digits", n_train=2, n_val=1, n_test=1, seed=5, size=64, fps=30.0)
    first = lips.synthesize_av(tmp_path / "a", **kwargs, jobs=1)
    second = lips.synthesize_av(tmp_path / "b", **kwargs, jobs=2)

    def digest(root: Path, pattern: str) -> dict[str, str]:
        files = sorted(root.rglob(pattern))
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}

    for split in first:
        assert first[split].read_text() == second[split].read_text()
    assert digest(tmp_path / "a", "*.npy") == digest(tmp_path / "b", "*.npy")
    assert digest(tmp_path / "a", "*.wav") == digest(tmp_path / "b", "*.wav")
    assert np.load(tmp_path / "a/train/train-000000.npy").shape[1:] == (64, 64)
    assert lips.speaker_style("en-gb+m3") == lips.speaker_style("en-gb+m3")
    assert lips.speaker_style("en-gb+m3") != lips.speaker_style("en-us+f2")
    assert not np.array_equal(frame("AA", "en-gb+m3"), frame("AA", "en-us+f2"))


def test_missing_library(monkeypatch) -> None:
    monkeypatch.setattr(lips, "find_library", lambda: None)
    lips.espeak_library.cache_clear()
    try:
        with pytest.raises(espeak.MissingToolError, match="apt-get install .*libespeak-ng1"):
            lips.check_av_tools()
    finally:
        lips.espeak_library.cache_clear()


def test_cli_video_flag(tmp_path: Path) -> None:
    from mmalign.cli import main

    main(
        [
            "synth",
            str(tmp_path),
            "--n_train",
            "1",
            "--n_val",
            "1",
            "--n_test",
            "1",
            "--video",
            "true",
        ]
    )
    row = read(tmp_path / "train.jsonl")[0]
    assert row["task"] == "avsr" and (tmp_path / row["video"]).is_file()
