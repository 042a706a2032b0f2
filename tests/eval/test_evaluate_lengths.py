"""``mmalign evaluate`` on utterances longer than the encoder's window and shorter than a token.

The tiny export's Whisper window is 3 s, so a 7.5 s tone stands in for the issue's 40-minute clip
(the same "input has N frames; Whisper encodes at most M" crash on today's code) at a cost of
milliseconds; its projector stacks 4 frames a token, so the shortest decodable clip is 0.08 s
and the issue's 0.05 s clip is below it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_tiny_export, write_tone

from mmalign.cli import main


@pytest.fixture(scope="module")
def short_window_export(tmp_path_factory, tokenizer_dir) -> Path:
    return make_tiny_export(tmp_path_factory.mktemp("export3s"), tokenizer_dir)


def test_long_utterance_is_chunked_and_short_one_skipped(short_window_export, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    lines = []
    for key, seconds, text in [
        ("a", 0.6, "one two"),
        ("b", 0.9, "three"),
        ("forty-minutes", 7.5, "the quick brown fox jumps over the lazy dog"),
        ("blip", 0.05, "oh"),
    ]:
        write_tone(data / f"{key}.wav", seconds)
        lines.append(json.dumps({"audio": f"{key}.wav", "text": text, "key": key}))
    manifest = data / "m.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"

    main(
        ["evaluate", str(short_window_export), str(manifest), "--out", str(out)]
        + ["--no-progress", "--max-new-tokens", "4"]
    )

    metrics = json.loads((out / "metrics.json").read_text())
    lengths = metrics["data"]["lengths"]
    assert lengths["window_seconds"] == 3.0 and lengths["min_seconds"] == pytest.approx(0.08)
    assert lengths["counts"] == {"chunked": 1, "too_short": 1, "too_long": 0}
    # 3 s chunks overlapping by 0.3 s: 0-3, 2.7-5.7, 5.4-7.5
    assert lengths["chunked"] == [{"key": "forty-minutes", "duration": 7.5, "chunks": 3}]
    (skip,) = lengths["skipped"]
    assert skip["key"] == "blip" and skip["duration"] == 0.05
    assert skip["reason"].startswith("too short: 0.050 s < 0.080 s")
    assert any(s.startswith("blip (0.05 s): too short") for s in metrics["data"]["skipped"])
    assert metrics["data"]["utterances"] == 3

    rows = {
        r["key"]: r
        for r in map(json.loads, (out / "utterances.jsonl").read_text().split("\n")[:-1])
    }
    assert set(rows) == {"a", "b", "forty-minutes"}  # the short clip is not scored
    assert rows["forty-minutes"]["chunks"] == 3 and rows["forty-minutes"]["duration"] == 7.5
    assert "chunks" not in rows["a"]
    (result,) = metrics["results"]
    assert result["utterances"] == 3 and result["audio_seconds"] == pytest.approx(9.0)

    report = (out / "report.md").read_text()
    assert "1 longer utterance(s) decoded in 3 s chunks" in report
    assert "`forty-minutes` (7.5 s, 3 chunks)" in report
    assert "`blip` (0.05 s): too short" in report
    assert "wrote metrics.json" in capsys.readouterr().out


def test_only_too_short_clips_is_a_one_line_error_naming_them(short_window_export, tmp_path):
    write_tone(tmp_path / "blip.wav", 0.02)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio": "blip.wav", "text": "oh", "key": "blip"}) + "\n")
    with pytest.raises(SystemExit, match=r"no usable samples .*blip \(0\.02 s\): too short"):
        main(
            ["evaluate", str(short_window_export), str(manifest), "--out", str(tmp_path / "o")]
            + ["--no-progress"]
        )
