"""Hugging Face datasets (arrow and parquet) and lhotse manifests through ``mmalign prepare``:
counts, durations within 1 ms of the source, text, kept columns, skips with their reasons."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from mmalign.cli import main
from mmalign.data.index import read_index
from mmalign.data.reading import read_shard_samples

datasets = pytest.importorskip("datasets")


def wav_bytes(seconds: float, rate: int) -> bytes:
    t = np.arange(round(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 220 * t)).astype("float32"), rate, format="WAV")
    return buf.getvalue()


def hf_dataset(rows: list[tuple]) -> datasets.Dataset:
    """rows of (audio bytes, sentence, speaker, duration column)."""
    table = {
        "audio": [{"bytes": audio, "path": None} for audio, *_ in rows],
        "sentence": [r[1] for r in rows],
        "speaker": [r[2] for r in rows],
        "duration": [r[3] for r in rows],  # a column named like a manifest field: kept aside
        "id": [f"utt{n}" for n in range(len(rows))],
    }
    return datasets.Dataset.from_dict(table).cast_column("audio", datasets.Audio())


ROWS = [
    (wav_bytes(1.0, 8000), "Eight kilohertz.", "s1", 9.0),
    (wav_bytes(0.75, 22050), "Twenty two.", "s2", 9.0),
    (b"not audio at all", "Broken.", "s3", 9.0),
    (wav_bytes(0.5, 16000), "  ", "s4", 9.0),
    (wav_bytes(1.25, 48000), "Forty eight.", "s1", 9.0),
]


def check(out, source_format: str = "hf") -> None:
    index = read_index(out)
    assert index["source_format"] == source_format and index["total_samples"] == 3
    samples = {s["__key__"]: s for s in read_shard_samples(out)[0]}
    assert sorted(samples) == ["utt0", "utt1", "utt4"]
    for key, seconds in (("utt0", 1.0), ("utt1", 0.75), ("utt4", 1.25)):
        assert abs(samples[key]["duration"] - seconds) < 1e-3
        assert abs(samples[key]["audio"].numel() - seconds * 16000) <= 1  # resampled
    assert samples["utt1"]["text"] == "Twenty two."
    meta = samples["utt4"]["meta"]
    assert meta["speaker"] == "s1" and meta["hf_duration"] == 9.0 and meta["row"] == 4
    skipped = {s["line"]: s["reason"] for s in index["skipped"]}
    assert sorted(skipped) == [2, 3]
    assert skipped[3] == "row 3: empty text column 'sentence'"
    assert "row 2, column 'audio'" in skipped[2] and "unreadable audio" in skipped[2]


def test_save_to_disk_dataset_dict_split(tmp_path):
    dd = datasets.DatasetDict({"train": hf_dataset(ROWS), "test": hf_dataset(ROWS[:1])})
    dd.save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "shards"
    main(["prepare", str(tmp_path / "ds"), str(out), "--split", "train", "--jobs", "2"])
    check(out)
    with pytest.raises(SystemExit, match="pick one with --split"):
        main(["prepare", str(tmp_path / "ds"), str(tmp_path / "x")])


def test_parquet_glob_and_text_column(tmp_path):
    (tmp_path / "data").mkdir()
    hf_dataset(ROWS[:2]).to_parquet(str(tmp_path / "data/train-00000-of-00002.parquet"))
    rest = hf_dataset(ROWS).select(range(2, 5))
    rest.to_parquet(str(tmp_path / "data/train-00001-of-00002.parquet"))
    hf_dataset(ROWS[:1]).to_parquet(str(tmp_path / "data/test-00000-of-00001.parquet"))
    out = tmp_path / "shards"
    glob = str(tmp_path / "data/train-*.parquet")
    main(["prepare", glob, str(out), "--text_column", "sentence"])
    index = read_index(out)
    assert index["total_samples"] == 3
    # rows count per file: the second file's rows 0 and 1 are the broken and the empty one
    assert sorted(s["line"] for s in index["skipped"]) == [0, 1]
    # the folder holds two splits: --split picks the files
    main(["prepare", str(tmp_path / "data"), str(tmp_path / "t"), "--split", "test"])
    assert read_index(tmp_path / "t")["total_samples"] == 1
    with pytest.raises(SystemExit, match="no text column 'words'"):
        main(["prepare", glob, str(tmp_path / "x"), "--text_column", "words"])


def test_killed_hf_prepare_resumes_to_identical_shards(tmp_path, capsys):
    from data.test_no_data_lost import kill_after_first_shard, shard_bytes

    rng = np.random.default_rng(2)
    rows = []
    for n in range(60):  # seeded noise: FLAC barely compresses it, so writing takes a while
        buf = io.BytesIO()
        sf.write(buf, rng.uniform(-0.5, 0.5, 32000).astype("float32"), 16000, format="WAV")
        rows.append((buf.getvalue(), f"clip {n}", "s", 2.0))
    hf_dataset(rows).save_to_disk(str(tmp_path / "ds"))
    out, reference = tmp_path / "out", tmp_path / "reference"
    args = [str(tmp_path / "ds"), str(out), "--shard_max_count", "6"]
    kill_after_first_shard(args, out / ".shard.partial")
    capsys.readouterr()
    main(["prepare", *args])
    assert "resumed after" in capsys.readouterr().out  # the rows' readers fingerprint alike
    main(["prepare", str(tmp_path / "ds"), str(reference), "--shard_max_count", "6"])
    assert shard_bytes(out) == shard_bytes(reference) and len(shard_bytes(out)) == 10


def test_hf_without_datasets_names_the_extra(tmp_path, monkeypatch):
    hf_dataset(ROWS[:1]).to_parquet(str(tmp_path / "train.parquet"))
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)
    with pytest.raises(SystemExit, match=r"pip install 'mmalign\[hf\]'"):
        main(["prepare", str(tmp_path / "train.parquet"), str(tmp_path / "x")])


lhotse = pytest.importorskip("lhotse")


def recording(path, seconds: float, rate: int, rec_id: str):
    t = np.arange(round(seconds * rate)) / rate
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, t.size)  # every sample tells
    sf.write(path, noise.astype("float32"), rate, subtype="PCM_16")
    return lhotse.Recording.from_file(path, recording_id=rec_id)


def segment(rec, sid: str, start: float, duration: float, text: str, speaker: str = "spk1"):
    return lhotse.SupervisionSegment(sid, rec.id, start, duration, text=text, speaker=speaker)


def test_lhotse_cuts_with_offsets_are_cut_exactly(tmp_path):
    long = recording(tmp_path / "long.wav", 4.0, 16000, "long")
    narrow = recording(tmp_path / "narrow.wav", 2.0, 8000, "narrow")

    def cut(cid, rec, start, duration):
        return lhotse.MonoCut(cid, start, duration, 0, recording=rec, supervisions=[])

    cuts = [
        cut("c1", long, 0.5, 1.2345),
        cut("c2", long, 2.0, 1.75),
        cut("c3", narrow, 0.25, 1.5),
        cut("silent", long, 3.0, 0.5),
    ]
    cuts[0].supervisions = [segment(long, "s1", 0.0, 1.2345, "first words")]
    cuts[1].supervisions = [
        segment(long, "s3", 1.0, 0.75, "later", speaker="spk2"),
        segment(long, "s2", 0.0, 0.9, "earlier", speaker="spk2"),
    ]
    cuts[2].supervisions = [segment(narrow, "s4", 0.0, 1.5, "narrow band")]
    cutset = lhotse.CutSet.from_cuts(cuts + [cuts[0].append(cuts[1])])  # a MixedCut: skipped
    (tmp_path / "data").mkdir()
    manifest = tmp_path / "data/librispeech_cuts_dev.jsonl.gz"
    cutset.to_file(manifest)
    out = tmp_path / "shards"
    main(["prepare", str(manifest), str(out), "--root", str(tmp_path)])
    index = read_index(out)
    assert index["source_format"] == "lhotse" and index["total_samples"] == 3
    samples = {s["__key__"]: s for s in read_shard_samples(out)[0]}
    for c in cuts[:2]:  # 16 kHz: the very samples lhotse reads
        expected = c.load_audio()[0]
        got = samples[c.id]["audio"].numpy()
        assert got.size == expected.size == round(c.duration * 16000)
        assert np.abs(got - expected).max() < 1e-4
    assert abs(samples["c3"]["duration"] - 1.5) < 1e-3
    assert abs(samples["c1"]["duration"] - 1.2345) < 1e-3
    assert samples["c2"]["text"] == "earlier later" and samples["c2"]["meta"]["speaker"] == "spk2"
    assert samples["c1"]["meta"]["offset"] == 0.5
    reasons = {s["line"]: s["reason"] for s in index["skipped"]}
    assert sorted(reasons) == [4, 5] and reasons[4] == "silent: no supervision text"
    assert reasons[5].endswith(": a MixedCut, not a recording slice (MonoCut)")


def test_lhotse_recordings_and_supervisions_folder(tmp_path):
    rec = recording(tmp_path / "talk.wav", 3.0, 16000, "talk")
    url = lhotse.Recording(
        "remote", [lhotse.AudioSource("url", [0], "https://example.org/a.wav")], 16000, 16000, 1.0
    )
    lhotse.RecordingSet.from_recordings([rec, url]).to_file(tmp_path / "x_recordings_dev.jsonl.gz")
    sups = [
        segment(rec, "talk-1", 0.1, 1.0, "one"),
        segment(rec, "talk-2", 1.5, 1.25, "two"),
        lhotse.SupervisionSegment("far", "remote", 0.0, 1.0, text="away"),
        lhotse.SupervisionSegment("ghost", "nobody", 0.0, 1.0, text="boo"),
    ]
    lhotse.SupervisionSet.from_segments(sups).to_file(tmp_path / "x_supervisions_dev.jsonl.gz")
    out = tmp_path / "shards"
    main(["prepare", str(tmp_path), str(out), "--split", "dev"])
    samples = {s["__key__"]: s for s in read_shard_samples(out)[0]}
    assert sorted(samples) == ["talk-1", "talk-2"]
    assert samples["talk-2"]["audio"].numel() == 20000 and samples["talk-2"]["text"] == "two"
    reasons = {s["line"]: s["reason"] for s in read_index(out)["skipped"]}
    assert reasons == {
        3: "far: recording sources ['url'], not one audio file",
        4: "ghost: no recording 'nobody'",
    }
