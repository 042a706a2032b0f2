"""Corpus importers (CoVoST 2 TSV, MuST-C segments) through prepare(): texts, translations,
segment cuts, bad rows skipped with file:line, structural errors naming the files."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds

from mmalign.data.index import read_index
from mmalign.data.media import load_audio
from mmalign.data.shards import prepare
from mmalign.data.sources.covost import name_info, read_covost
from mmalign.data.sources.mustc import is_mustc, read_mustc

HEADER = "path\tsentence\ttranslation\tclient_id"


def write_sine(path: Path, seconds: float, rate: int = 16000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(round(seconds * rate))) / rate
    sf.write(path, 0.3 * np.sin(2 * np.pi * 330 * t).astype(np.float32), rate)


def read_shards(out_dir: Path) -> list[dict]:
    """Every sample's JSON plus its key and decoded audio."""
    urls = [str(out_dir / s["path"]) for s in read_index(out_dir)["shards"]]
    samples = []
    for raw in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
        audio, _ = sf.read(io.BytesIO(raw["flac"]), dtype="float32")
        samples.append({**json.loads(raw["json"]), "key": raw["__key__"], "audio": audio})
    return samples


def write_ramp(path: Path, seconds: float, rate: int = 16000) -> np.ndarray:
    """A slow ramp from -0.5 to 0.5: every sample tells where it came from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = int(round(seconds * rate))
    wave = np.linspace(-0.5, 0.5, n, dtype=np.float32)
    sf.write(path, wave, rate)
    return wave


@pytest.fixture
def covost(tmp_path: Path) -> Path:
    root = tmp_path / "cv"
    write_sine(root / "clips" / "cv_1.wav", 0.5)
    write_sine(root / "clips" / "cv_2.flac", 0.8, rate=48000)
    write_sine(root / "clips" / "cv_3.wav", 0.3)
    rows = [
        HEADER,
        'cv_1.wav\tHe said "hello" twice.\tEr sagte zweimal "hallo".\tspk-a',  # line 2: quotes
        "cv_2.flac\tThe second one.\tDer zweite.\tspk-b",
        "cv_3.wav\tNo translation column\tspk-c",  # line 4: a column short
        "cv_3.wav\t \tLeer.\tspk-c",  # line 5: empty sentence
        "cv_missing.wav\tWhere is the clip?\tWo ist der Clip?\tspk-d",  # line 6: no clip
        "",
        "cv_3.wav\tThe third one.\tDer dritte.\tspk-c",  # line 8
    ]
    tsv = root / "covost_v2.en_de.dev.tsv"
    tsv.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return tsv


def test_covost_name_info() -> None:
    assert name_info("covost_v2.en_de.dev.tsv") == ("en", "de", "dev")
    assert name_info("/x/covost_v2.zh-CN_en.train.tsv") == ("zh-CN", "en", "train")
    assert name_info("covost_v2.fr_en.tsv") == ("fr", "en", None)
    assert name_info("train.tsv") is None


def test_covost_to_shards(covost: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    report = prepare(covost, out, progress=False)  # auto: .tsv is CoVoST
    assert report.ok and report.written == 3
    assert read_index(out)["source_format"] == "covost"
    assert sorted(s.line for s in report.skipped) == [4, 5, 6]
    assert all(s.source == str(covost) for s in report.skipped)
    reasons = {s.line: s.reason for s in report.skipped}
    assert "expected 4 columns, got 3" in reasons[4]
    assert "empty 'sentence'" in reasons[5]
    assert "not found" in reasons[6]
    samples = {s["key"]: s for s in read_shards(out)}
    assert set(samples) == {"cv_1", "cv_2", "cv_3"}
    one = samples["cv_1"]
    assert one["text"] == 'He said "hello" twice.'
    assert one["translation"] == {"de": 'Er sagte zweimal "hallo".'}
    assert (one["source_lang"], one["target_lang"], one["speaker"]) == ("en", "de", "spk-a")
    assert samples["cv_2"]["duration"] == pytest.approx(0.8, abs=1e-3)  # 48 kHz resampled
    assert len(samples["cv_2"]["audio"]) == 12800


def test_covost_manifest_split_languages_and_errors(covost: Path, tmp_path: Path) -> None:
    imported = read_covost(covost)
    manifest = imported.write_jsonl(tmp_path / "covost.jsonl")
    report = prepare(manifest, tmp_path / "from-manifest", progress=False)
    assert report.written == 3  # the manifest carries the same samples
    line = json.loads(manifest.read_text(encoding="utf-8").splitlines()[0])
    assert line["translation"] == {"de": 'Er sagte zweimal "hallo".'}
    assert Path(line["audio"]) == covost.parent / "clips" / "cv_1.wav"

    combined = covost.parent / "all.tsv"  # combined file: split column, no languages in name
    combined.write_text(
        f"{HEADER}\tsplit\n"
        "cv_1.wav\tOne.\tEins.\ta\ttrain\n"
        "cv_2.flac\tTwo.\tZwei.\tb\tdev\n"
        "cv_3.wav\tThree.\tDrei.\tc\ttrain\n",
        encoding="utf-8",
    )
    with pytest.raises(ValueError, match="all.tsv.*source_lang and target_lang"):
        read_covost(combined)
    train = read_covost(combined, source_lang="fr", target_lang="en", split="train")
    assert [e.record["text"] for e in train.entries] == ["One.", "Three."]
    assert train.entries[1].line == 4 and train.entries[1].record["translation"] == {"en": "Drei."}
    with pytest.raises(ValueError, match="holds split 'dev', not 'test'"):
        read_covost(covost, split="test")
    bad = covost.parent / "covost_v2.en_de.test.tsv"
    bad.write_text("path\tsentence\tclient_id\ncv_1.wav\tx\ty\n", encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"covost_v2.en_de.test.tsv:1: header lacks \['translation'\]"
    ):
        prepare(bad, tmp_path / "bad", progress=False)

    other = tmp_path / "elsewhere"
    (covost.parent / "clips").rename(other)
    moved = prepare(covost, tmp_path / "moved", clips=other, progress=False)
    assert moved.written == 3


TALKS = {"ted_1": (3.0, 16000), "ted_2": (2.0, 8000)}
# offset, duration, talk, English, German
SEGMENTS = [
    (0.5, 1.0, "ted_1", "First words.", "Erste Worte."),
    (1.5, 1.25, "ted_1", "Then more.", "Dann mehr."),
    (0.0, 0.7, "ted_2", "Second talk.", "Zweiter Vortrag."),
    (1.8, 1.0, "ted_2", "Past the end.", "Nach dem Ende."),  # segment 4: outside the file
    (0.9, 0.5, "ted_2", "", "Leer."),  # segment 5: empty transcript
    (1.2, 0.8, "ted_2", "Up to the end.", "Bis zum Ende."),  # ends exactly at 2.0 s
]


def make_mustc(root: Path, split: str = "dev", segments=SEGMENTS) -> dict[str, np.ndarray]:
    data = root / "data" / split
    waves = {
        talk: write_ramp(data / "wav" / f"{talk}.wav", secs, rate)
        for talk, (secs, rate) in TALKS.items()
    }
    txt = data / "txt"
    txt.mkdir(parents=True, exist_ok=True)
    yaml_lines = [
        f"- {{duration: {dur:.6f}, offset: {off:.6f}, rW: 3, uW: 0, speaker_id: spk.{talk[-1]}, "
        f"wav: {talk}.wav}}"
        for off, dur, talk, _, _ in segments
    ]
    (txt / f"{split}.yaml").write_text("\n".join(yaml_lines) + "\n", encoding="utf-8")
    (txt / f"{split}.en").write_text("".join(s[3] + "\n" for s in segments), encoding="utf-8")
    (txt / f"{split}.de").write_text("".join(s[4] + "\n" for s in segments), encoding="utf-8")
    return waves


def test_mustc_segments_to_shards(tmp_path: Path) -> None:
    root = tmp_path / "en-de"
    waves = make_mustc(root)
    assert is_mustc(root) and not is_mustc(tmp_path)
    out = tmp_path / "shards"
    report = prepare(root, out, progress=False)  # auto: a MuST-C folder, one split
    assert read_index(out)["source_format"] == "mustc"
    assert report.written == 4
    yaml_path = root / "data/dev/txt/dev.yaml"
    reasons = {(s.source, s.line): s.reason for s in report.skipped}
    assert (
        "lies outside" in reasons[(str(yaml_path), 4)]
        and "2.000 s long" in reasons[(str(yaml_path), 4)]
    )
    assert "empty" in reasons[(str(root / "data/dev/txt/dev.en"), 5)]
    samples = {s["key"]: s for s in read_shards(out)}
    assert set(samples) == {"ted_1_0", "ted_1_1", "ted_2_0", "ted_2_3"}
    for (off, dur, talk, en, de), key in zip(
        [SEGMENTS[i] for i in (0, 1, 2, 5)],
        ["ted_1_0", "ted_1_1", "ted_2_0", "ted_2_3"],
        strict=True,
    ):
        s = samples[key]
        assert s["text"] == en and s["translation"] == {"de": de}
        assert (s["source_lang"], s["target_lang"], s["speaker"]) == ("en", "de", f"spk.{talk[-1]}")
        assert s["offset"] == pytest.approx(off) and s["source"].endswith(f"{talk}.wav")
        assert abs(s["duration"] - dur) < 1e-3
        assert abs(len(s["audio"]) / 16000 - dur) < 1e-3
    # the cut is the right part of the talk: the ramp's values at both ends
    ramp = waves["ted_1"]
    cut = samples["ted_1_1"]["audio"]
    start = int(1.5 * 16000)
    np.testing.assert_allclose(cut[[0, -1]], ramp[[start, start + len(cut) - 1]], atol=1e-3)


def test_mustc_mismatch_languages_and_splits(tmp_path: Path) -> None:
    root = tmp_path / "en-fr"
    make_mustc(root, "dev", SEGMENTS[:3])
    make_mustc(root, "tst-COMMON", SEGMENTS[:2])
    (root / "data/dev/txt/dev.fr").write_text("Un.\nDeux.\nTrois.\n", encoding="utf-8")
    with pytest.raises(ValueError, match="choose one with split"):
        prepare(root, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="no split 'train'"):
        read_mustc(root, split="train")
    dev = read_mustc(root, split="dev")  # languages from the folder name
    assert dev.entries[2].record["translation"] == {"fr": "Trois."}
    assert [e.record["key"] for e in dev.entries] == ["ted_1_0", "ted_1_1", "ted_2_0"]
    (root / "data/dev/txt/dev.fr").write_text("Un.\nDeux.\n", encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"dev.yaml has 3 segments but .*dev.en has 3 lines and .*dev.fr has 2"
    ):
        prepare(root, tmp_path / "out", split="dev", progress=False)
    # a folder not named like en-de: the text files tell the languages, or pass them
    plain = tmp_path / "corpus"
    make_mustc(plain, "dev", SEGMENTS[:1])
    assert read_mustc(plain).entries[0].record["target_lang"] == "de"
    assert read_mustc(plain, target_lang="de", source_lang="en").entries[0].line == 1
    (plain / "data/dev/txt/dev.de").rename(plain / "data/dev/txt/dev.it")
    (plain / "data/dev/txt/dev.en").rename(plain / "data/dev/txt/dev.es")
    with pytest.raises(ValueError, match="pass source_lang and target_lang"):
        read_mustc(plain)


def test_manifest_offsets_and_format_checks(tmp_path: Path) -> None:
    wave = write_ramp(tmp_path / "long.wav", 2.0)
    lines = [
        {"audio": "long.wav", "text": "middle", "offset": 0.5, "duration": 0.25},
        {"audio": "long.wav", "text": "head", "duration": 0.1},
        {"audio": "long.wav", "text": "tail", "offset": 1.5},
        {"audio": "long.wav", "text": "bad", "offset": "soon"},  # line 4
        {"audio": "long.wav", "text": "negative", "duration": -1.0},  # line 5
        {"audio": "long.wav", "text": "late", "offset": 2.5, "duration": 0.1},  # line 6
        {"audio": "long.wav", "text": "slack", "offset": 1.9, "duration": 0.105},  # cut at end
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    report = prepare(manifest, tmp_path / "out", progress=False)
    assert report.written == 4 and sorted(s.line for s in report.skipped) == [4, 5, 6]
    reasons = {s.line: s.reason for s in report.skipped}
    assert "bad 'offset'" in reasons[4] and "bad 'duration'" in reasons[5]
    assert "segment 2.500-2.600 s lies outside" in reasons[6]
    got = {s["text"]: s for s in read_shards(tmp_path / "out")}
    assert [len(got[t]["audio"]) for t in ("middle", "head", "tail", "slack")] == [
        4000,
        1600,
        8000,
        1600,
    ]
    assert "offset" not in got["head"] and got["tail"]["offset"] == 1.5
    np.testing.assert_allclose(
        load_audio(tmp_path / "long.wav", offset=0.5, duration=0.25).numpy(),
        wave[8000:12000],
        atol=1e-4,
    )
    with pytest.raises(ValueError, match="clips only applies"):
        prepare(manifest, tmp_path / "x", clips=tmp_path)
    with pytest.raises(ValueError, match=r"\['split'\] only apply"):
        prepare(manifest, tmp_path / "x", split="dev")
    with pytest.raises(ValueError, match="needs a folder"):
        prepare(manifest, tmp_path / "x", format="mustc")
    with pytest.raises(ValueError, match="format must be one of"):
        prepare(manifest, tmp_path / "x", format="kaldi")
