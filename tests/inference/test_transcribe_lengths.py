"""``mmalign transcribe``: chunks that come back empty are a warning, too-short files a skip.

The tiny export's Whisper window is 3 s (chunks default to it) and its projector stacks 4 frames
a token, so the shortest decodable file is 0.08 s.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_tiny_export, write_tone

from mmalign.cli import main
from mmalign.inference import transcribe as tr
from mmalign.model import SpeechLLM


@pytest.fixture(scope="module")
def short_window_export(tmp_path_factory, tokenizer_dir) -> Path:
    return make_tiny_export(tmp_path_factory.mktemp("export3s"), tokenizer_dir)


def test_empty_chunks_warn_and_short_files_are_skipped(
    short_window_export, tmp_path, monkeypatch, capsys
):
    audio = tmp_path / "audio"
    audio.mkdir()
    write_tone(audio / "speech.wav", 7.5)  # chunks 0-3, 2.5-5.5, 5-7.5: three with sound
    write_tone(audio / "silence.wav", 4.0, amplitude=0.0)  # empty is right for silence
    write_tone(audio / "blip.wav", 0.05)  # less audio than one LLM token
    # a model that says nothing, as an under-trained one does on long-form audio
    monkeypatch.setattr(SpeechLLM, "generate", lambda self, batch, **kw: [""] * len(batch["texts"]))
    out = tmp_path / "out"

    main(
        ["transcribe", str(short_window_export), str(audio), "--out", str(out)]
        + ["--overlap-seconds", "0.5", "--no-progress"]
    )

    printed = capsys.readouterr().out
    first = printed.splitlines()[0]
    assert "0 failed; 1 skipped" in first
    assert "warning: 3 chunk(s) with sound came back empty in 1 file(s)" in first
    assert f"  warning: {audio / 'speech.wav'}: 3 of 3 chunk(s) came back empty" in printed
    assert f"  skipped: {audio / 'blip.wav'}: too short: 0.050 s < 0.080 s" in printed
    assert first.startswith("transcribed 2 file(s)")

    records = {Path(r["path"]).name: r for r in map(json.loads, (out / tr.LEDGER).open())}
    speech, silence, blip = records["speech.wav"], records["silence.wav"], records["blip.wav"]
    assert [(c["start"], c["end"]) for c in speech["chunks"]] == [(0, 3), (2.5, 5.5), (5, 7.5)]
    assert speech["empty_chunks"] == 3 and "3 of 3 chunk(s) came back empty" in speech["warning"]
    assert silence["empty_chunks"] == 0 and "warning" not in silence
    assert blip["error"] is None and blip["text"] == "" and blip["duration"] == 0.05
    assert blip["skipped"].startswith("too short") and "empty_chunks" not in blip
    assert (out / "blip.txt").read_text() == "\n"  # every input still gets its outputs

    main(
        ["transcribe", str(short_window_export), str(audio), "--out", str(out)]
        + ["--overlap-seconds", "0.5", "--no-progress"]
    )
    rerun = capsys.readouterr().out.splitlines()[0]
    assert "3 already done; 0 failed; outputs" in rerun  # a skip is final, not retried
