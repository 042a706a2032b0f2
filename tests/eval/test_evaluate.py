"""mmalign evaluate on tiny models: outputs, figures that agree, SNR/rate/task sweeps, BLEU."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from mmalign.cli import main
from mmalign.eval.evaluate import evaluate
from mmalign.eval.metrics import error_rates, translation_scores
from mmalign.eval.sweep import parse_snrs
from mmalign.model import SpeechLLM
from mmalign.projectors.base import Projector
from mmalign.projectors.compress import compress

PNG = b"\x89PNG\r\n\x1a\n"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_writes_all_outputs_with_consistent_figures(tiny_checkpoint, tone_shards, tmp_path):
    out = tmp_path / "eval"
    main(["evaluate", str(tiny_checkpoint), str(tone_shards), "--out", str(out), "--no-progress"])
    metrics = json.loads((out / "metrics.json").read_text())
    rows = read_jsonl(out / "utterances.jsonl")
    report = (out / "report.md").read_text()

    (result,) = metrics["results"]
    assert result["task"] == "asr" and result["rate"] == 2 and result["snr"] is None
    assert result["utterances"] == len(rows) == metrics["data"]["utterances"] == 12
    errors = sum(r["substitutions"] + r["deletions"] + r["insertions"] for r in rows)
    assert sum(r["ref_words"] for r in rows) == result["ref_words"]
    assert errors / result["ref_words"] == pytest.approx(result["wer"])
    again = error_rates([r["reference"] for r in rows], [r["hypothesis"] for r in rows])
    assert again["wer"] == pytest.approx(result["wer"])
    assert [r["wer"] for r in rows] == sorted((r["wer"] for r in rows), reverse=True)

    assert metrics["model"]["kind"] == "checkpoint"
    assert metrics["model"]["sha256"] == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert metrics["model"]["description"]["projector"]["class_path"].endswith("MLPProjector")
    assert metrics["normalizer"] == "english"
    assert metrics["decoding"]["greedy"] and metrics["decoding"]["num_beams"] == 1
    assert metrics["versions"]["jiwer"] and metrics["versions"]["torch"]
    assert f"{100 * result['wer']:.2f}" in report and "| asr | 2 | clean | 12 |" in report
    assert not list(out.glob("*.png"))  # single-point sweep: no plot


def test_snr_sweep_one_row_per_snr_and_a_plot(tiny_checkpoint, tone_shards, tmp_path):
    out = tmp_path / "snr"
    result = evaluate(
        tiny_checkpoint,
        tone_shards,
        out,
        snrs=["clean", 10, 0],
        normalizer="none",
        limit=6,
        progress=False,
    )
    rows = result.metrics["results"]
    assert [r["snr"] for r in rows] == [None, 10.0, 0.0]
    assert result.metrics["noise"] == {"source": "babble", "speakers": 3, "seed": 0}
    assert result.metrics["normalizer"] == "none"
    assert (out / "wer_vs_snr.png").read_bytes().startswith(PNG)
    assert "wer_vs_snr.png" in (out / "report.md").read_text()
    assert len(result.utterances) == 3 * 6
    for snr in (None, 10.0, 0.0):
        part = [u for u in result.utterances if u["snr"] == snr]
        errors = sum(u["substitutions"] + u["deletions"] + u["insertions"] for u in part)
        (row,) = [r for r in rows if r["snr"] == snr]
        assert errors / sum(u["ref_words"] for u in part) == pytest.approx(row["wer"])


def test_cli_flags_reach_the_record(tiny_checkpoint, tone_shards, tmp_path):
    out = tmp_path / "flags"
    main(
        [
            "evaluate",
            str(tiny_checkpoint),
            str(tone_shards),
            "--out",
            str(out),
            "--no-normalize",
            "--limit",
            "3",
            "--batch-size",
            "2",
            "--max-new-tokens",
            "3",
            "--no-progress",
        ]
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["normalizer"] == "none"
    assert metrics["decoding"]["batch_size"] == 2 and metrics["decoding"]["max_new_tokens"] == 3
    assert metrics["data"]["utterances"] == 3


def _manifest(tmp_path: Path) -> Path:
    """Two transcription and two translation samples in a JSONL manifest."""
    lines = []
    for i, (task, text) in enumerate(
        [("asr", "one two"), ("asr", "three"), ("st", "eins zwei"), ("st", "drei vier")]
    ):
        t = np.arange(int(16000 * (0.4 + 0.1 * i))) / 16000
        sf.write(tmp_path / f"a{i}.wav", (0.3 * np.sin(2 * np.pi * 300 * t)).astype("f4"), 16000)
        entry = {"audio": f"a{i}.wav", "text": text, "task": task, "id": f"u{i}"}
        if task == "st":
            entry["target_lang"] = "german"
        lines.append(json.dumps(entry))
    lines.append(json.dumps({"audio": "missing.wav", "text": "gone"}))
    path = tmp_path / "test.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_tasks_from_a_manifest_give_wer_and_bleu(tiny_checkpoint, tmp_path):
    result = evaluate(tiny_checkpoint, _manifest(tmp_path), tmp_path / "out", progress=False)
    by_task = {r["task"]: r for r in result.metrics["results"]}
    assert set(by_task) == {"asr", "st"}
    assert "wer" in by_task["asr"] and "bleu" not in by_task["asr"]
    st = by_task["st"]
    assert 0 <= st["bleu"] <= 100 and 0 <= st["chrf"] <= 100
    assert "nrefs:1" in st["bleu_signature"] and "nc:6" in st["chrf_signature"]
    assert all("bleu" in u for u in result.utterances if u["task"] == "st")
    assert result.metrics["data"]["tasks"] == {"asr": 2, "st": 2}
    assert len(result.metrics["data"]["skipped"]) == 1  # missing.wav, named
    assert "missing.wav" in result.metrics["data"]["skipped"][0]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "BLEU signature" in report and "## Transcription" in report


def test_translation_scores_are_sacrebleu_corpus_scores():
    refs = ["das ist ein kleiner test", "noch ein satz hier"]
    corpus, per = translation_scores(refs, refs)
    assert corpus["bleu"] == pytest.approx(100) and corpus["chrf"] == pytest.approx(100)
    assert [p["bleu"] for p in per] == pytest.approx([100, 100])
    corpus, _ = translation_scores(refs, ["ganz anders", "noch ein satz hier"])
    assert 0 < corpus["bleu"] < 100


class TwoRateProjector(Projector):
    """Test double of a multi-rate (Matryoshka) projector: average-pool by 2 or 4, one Linear."""

    rates = [2, 4]

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(in_dim, out_dim)
        self.rate = 4
        self.seen: list[int] = []
        self.net = torch.nn.Linear(in_dim, out_dim)

    def set_rate(self, rate: int) -> None:
        self.rate = rate

    def forward(self, features, lengths):
        self.seen.append(self.rate)
        x, lengths = compress(features, lengths, self.rate, "avgpool")
        return self.net(x), lengths


def test_rate_sweep_uses_the_multi_rate_hook(tiny_parts, tone_shards, tmp_path):
    encoder, llm = tiny_parts
    model = SpeechLLM(encoder, TwoRateProjector(encoder.dim, llm.hidden_size), llm)
    result = evaluate(model, tone_shards, tmp_path / "rates", limit=4, progress=False)
    assert [r["rate"] for r in result.metrics["results"]] == [2, 4]
    assert set(model.projector.seen) == {2, 4} and model.projector.rate == 4  # restored
    assert (tmp_path / "rates" / "wer_vs_rate.png").read_bytes().startswith(PNG)
    assert result.metrics["model"]["kind"] == "in-memory"

    only = evaluate(model, tone_shards, tmp_path / "one", rates=[2], limit=2, progress=False)
    assert [r["rate"] for r in only.metrics["results"]] == [2]
    with pytest.raises(ValueError, match=r"rate\(s\) \[3\] not available"):
        evaluate(model, tone_shards, tmp_path / "bad", rates=[3], progress=False)


def test_single_rate_model_refuses_another_rate(tiny_checkpoint, tone_shards, tmp_path):
    with pytest.raises(SystemExit, match="single compression rate"):
        main(
            [
                "evaluate",
                str(tiny_checkpoint),
                str(tone_shards),
                "--out",
                str(tmp_path),
                "--rates",
                "3",
            ]
        )


def test_parse_snrs():
    assert parse_snrs(None) == [None]
    assert parse_snrs(["clean", "10", 5, "inf", "10"]) == [None, 10.0, 5.0]
    with pytest.raises(ValueError, match="loud"):
        parse_snrs(["loud"])
