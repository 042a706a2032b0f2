"""mmalign transcribe on a tiny exported model: inputs, outputs, long audio, failures, resuming."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import srt
import torch
import webvtt
from conftest import tiny_llm_config, tiny_whisper_config
from safetensors.torch import save_file

from mmalign.cli import main
from mmalign.inference import transcribe as tr
from mmalign.inference.decode import DecodeOptions

OPTIONS = DecodeOptions(batch_size=4, max_new_tokens=4)
CHUNKED = {"chunk_seconds": 2.0, "overlap_seconds": 0.5, "progress": False, "options": OPTIONS}


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, tokenizer_dir) -> Path:
    """An export folder (adapter, projector, mmalign.json) of a random tiny model, written the
    way ``mmalign export`` lays it out, without a Lightning run."""
    from peft import LoraConfig

    from mmalign.encoders.whisper import WhisperEncoder
    from mmalign.inference.export import CONFIG_NAME, describe
    from mmalign.llm.load import CausalLM
    from mmalign.model import SpeechLLM
    from mmalign.projectors.mlp import MLPProjector

    torch.manual_seed(0)
    encoder = WhisperEncoder(source="random", config=tiny_whisper_config())
    llm = CausalLM(
        "random",
        adapter=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]),
        tokenizer=str(tokenizer_dir),
        config=tiny_llm_config(),
    )
    model = SpeechLLM(encoder, MLPProjector(encoder.dim, llm.hidden_size, rate=2), llm)
    out = tmp_path_factory.mktemp("export")
    model.llm.model.save_pretrained(out / "adapter")
    save_file(
        {k: v.contiguous() for k, v in model.projector.state_dict().items()},
        out / "projector.safetensors",
    )
    (out / CONFIG_NAME).write_text(json.dumps(describe(model)))
    return out


def tone(path: Path, seconds: float, freq: float = 300.0, channels: int = 1, rate: int = 16000):
    t = np.arange(int(rate * seconds)) / rate
    wave = (0.3 * np.sin(2 * np.pi * freq * t)).astype("f4")
    sf.write(path, np.stack([wave] * channels, axis=1) if channels > 1 else wave, rate)
    return path


@pytest.fixture
def audio_dir(tmp_path) -> Path:
    """A folder: short clips (one stereo at 44.1 kHz, one in a subfolder), one 5 s clip that
    needs chunking, a corrupt .wav, and a text file that must be ignored."""
    root = tmp_path / "audio"
    (root / "sub").mkdir(parents=True)
    tone(root / "a.wav", 0.6)
    tone(root / "b.flac", 0.8, 400, channels=2, rate=44100)
    tone(root / "sub" / "c.wav", 0.5, 500)
    tone(root / "long.wav", 5.0, 250)
    (root / "bad.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    (root / "notes.txt").write_text("not audio")
    return root


def ledger(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / tr.LEDGER).read_text().splitlines()]


def test_inputs_from_folder_list_and_manifest(audio_dir, tmp_path):
    listing = tmp_path / "files.lst"
    listing.write_text("# clips\naudio/a.wav\n\naudio/sub/c.wav\n")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        json.dumps({"audio": "audio/long.wav", "id": "L", "task": "asr"})
        + "\n{not json\n"
        + json.dumps({"text": "no audio key"})
        + "\n"
    )
    items = tr.collect_inputs([audio_dir, listing, manifest, tmp_path / "nope.wav"])
    names = [i.path.name for i in items]
    assert names[:5] == ["a.wav", "b.flac", "bad.wav", "long.wav", "c.wav"]  # folder, sorted
    assert names.count("a.wav") == 1  # listed again: deduplicated
    bad = [i for i in items if i.error]
    assert len(bad) == 3 and "m.jsonl:2" in bad[0].error and "no such file" in bad[2].error
    (long_item,) = [i for i in items if i.path.name == "long.wav"]
    assert long_item.meta == {}  # found in the folder first; the manifest line is a duplicate
    manifest_only = tr.collect_inputs([manifest])
    assert manifest_only[0].meta["id"] == "L"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no audio files"):
        tr.collect_inputs([tmp_path / "empty"])


def test_cli_transcribes_chunks_and_reports_unreadable(tiny_export, audio_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["transcribe", str(tiny_export), str(audio_dir), "--out", str(out), "--no-progress"]
    main([*argv, "--chunk-seconds", "2", "--overlap-seconds", "0.5", "--max-new-tokens", "4"])
    records = {Path(r["path"]).name: r for r in ledger(out)}
    assert set(records) == {"a.wav", "b.flac", "c.wav", "long.wav", "bad.wav"}
    assert records["bad.wav"]["error"] and records["bad.wav"]["text"] is None
    assert "bad.wav" in capsys.readouterr().out  # named in the final summary
    long = records["long.wav"]
    assert long["error"] is None and long["duration"] == pytest.approx(5.0)
    spans = long["chunks"]
    assert [(s["start"], s["end"]) for s in spans] == [(0, 2), (1.5, 3.5), (3.0, 5.0)]
    assert " ".join(s["text"] for s in spans if s["text"]) == long["text"]
    assert records["b.flac"]["duration"] == pytest.approx(0.8, abs=1e-3)  # 44.1 kHz stereo
    assert records["c.wav"]["name"] == "sub/c" and (out / "sub" / "c.srt").is_file()
    for record in records.values():
        if record["error"] is None:
            assert record["outputs"] == {f: f"{record['name']}.{f}" for f in ("txt", "srt", "vtt")}
            assert (out / f"{record['name']}.txt").read_text() == record["text"] + "\n"
            cues = list(srt.parse((out / f"{record['name']}.srt").read_text()))
            captions = list(webvtt.from_string((out / f"{record['name']}.vtt").read_text()))
            assert len(cues) == len(captions) == sum(bool(s["text"]) for s in record["chunks"])
    assert not (out / "bad.txt").exists()


def test_resume_after_interruption(tiny_export, audio_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_append, real_read = tr.Ledger.append, tr.read_audio

    def crash_after_two(self, record):
        if len(ledger(out)) == 2:
            raise KeyboardInterrupt("simulated interruption")
        real_append(self, record)

    monkeypatch.setattr(tr.Ledger, "append", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        tr.transcribe(tiny_export, [audio_dir], out, **CHUNKED)
    first = ledger(out)
    assert len(first) == 2
    monkeypatch.setattr(tr.Ledger, "append", real_append)

    reads: list[str] = []
    monkeypatch.setattr(
        tr, "read_audio", lambda p, sr: reads.append(Path(p).name) or real_read(p, sr)
    )
    summary = tr.transcribe(tiny_export, [audio_dir], out, **CHUNKED)
    done_before = {Path(r["path"]).name for r in first}
    assert summary.already_done == 2 and not done_before & set(reads)
    final = ledger(out)
    assert final[:2] == first  # nothing lost or rewritten
    assert sorted(Path(r["path"]).name for r in final) == sorted(
        ["a.wav", "b.flac", "bad.wav", "long.wav", "c.wav"]
    )

    reads.clear()
    again = tr.transcribe(tiny_export, [audio_dir], out, **CHUNKED)
    assert reads == [] and again.already_done == 5 and len(ledger(out)) == 5
    tr.transcribe(tiny_export, [audio_dir], out, retry_errors=True, **CHUNKED)
    assert reads == ["bad.wav"] and len(ledger(out)) == 5
    reads.clear()
    tr.transcribe(tiny_export, [audio_dir], out, overwrite=True, **CHUNKED)
    assert len(reads) == 5 and len(ledger(out)) == 5


def test_a_line_cut_short_is_dropped(tmp_path):
    path = tmp_path / tr.LEDGER
    good = json.dumps({"path": "/x/a.wav", "text": "hi"}) + "\n"
    path.write_text(good + '{"path": "/x/b.w')
    assert list(tr.read_ledger(path)) == ["/x/a.wav"]
    assert path.read_text() == good
    path.write_text('{"path": "/x/b.w\n' + good)
    with pytest.raises(ValueError, match="corrupt line"):
        tr.read_ledger(path)


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg to write an .m4a")
def test_formats_soundfile_lacks_go_through_torchcodec(tiny_export, tmp_path):
    src = tone(tmp_path / "x.wav", 1.0)
    m4a = tmp_path / "x.m4a"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(src), str(m4a)], check=True)
    summary = tr.transcribe(tiny_export, [m4a], tmp_path / "out", **CHUNKED)
    (record,) = ledger(tmp_path / "out")
    assert summary.transcribed == 1 and record["error"] is None
    assert record["duration"] == pytest.approx(1.0, abs=0.05)


def test_chunks_longer_than_the_encoder_window_are_refused(tiny_export, audio_dir, tmp_path):
    with pytest.raises(ValueError, match="encoder window"):
        tr.transcribe(tiny_export, [audio_dir], tmp_path, chunk_seconds=45, progress=False)
