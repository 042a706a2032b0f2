"""The open-vocabulary corpus: text filters, splits that never share a sentence or a voice."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import soundfile as sf

from mmalign.data.synthetic import sentences as sent


def pool(n: int) -> list[tuple[str, str]]:
    return [(f"Sentence number {i} is here.", ("fortunes", "gettext")[i % 2]) for i in range(n)]


ESPEAK = [f"en+v{i}" for i in range(20)]
COUNTS = {"train": 300, "val": 20, "test": 30, "test_synth": 15}


@pytest.mark.parametrize(
    ("text", "keep"),
    [
        ("The cat sat on the mat.", True),
        ("Is it raining in the hills today?", True),
        ("Too short.", False),
        ("It costs 3 dollars and more.", False),  # digits: said one way, written another
        ("Call glCompileShader before you link.", False),  # camelCase identifier
        ("This is a VERY LOUD sentence here.", False),
        ("no capital at the start here.", False),
        ("A label without a full stop at the end", False),
        ("Use the (optional) flag with care.", False),
    ],
)
def test_speakable(text, keep):
    assert sent.speakable(text) is keep


def test_fortune_entries_are_split_into_sentences(tmp_path):
    (tmp_path / "wisdom").write_text(
        "A fool and his money are soon parted. Every cloud has a silver lining indeed.\n%\n"
        "Short.\n%\nThe early bird catches the worm,\n  but the second mouse gets the cheese.\n"
    )
    (tmp_path / "wisdom.dat").write_bytes(b"\x00\x01")  # the index beside it is not text
    assert sent.fortune_sentences(str(tmp_path)) == {
        "A fool and his money are soon parted.",
        "Every cloud has a silver lining indeed.",
        "The early bird catches the worm, but the second mouse gets the cheese.",
    }


def test_splits_never_share_a_sentence_or_a_voice():
    utts, voices = sent.plan(pool(500), COUNTS, 7, espeak_voices=ESPEAK, held_out_voices=4)
    by = {s: [u for u in utts if u.split == s] for s in sent.SPLITS}
    assert {s: len(v) for s, v in by.items()} == COUNTS
    texts = {s: {u.text for u in v} for s, v in by.items()}
    assert not texts["train"] & (texts["val"] | texts["test"] | texts["test_synth"])
    assert not texts["val"] & texts["test"]
    assert texts["test_synth"] <= texts["test"]  # the same sentences, another synthesiser
    heard = {(u.synth, u.voice) for u in by["train"] + by["val"]}
    unseen = {(u.synth, u.voice) for u in by["test"] + by["test_synth"]}
    assert not heard & unseen
    assert {u.synth for u in by["train"]} == {"espeak", "flite"}
    assert {u.synth for u in by["test"]} == {"espeak", "flite"}
    assert {u.synth for u in by["test_synth"]} == {"festival"}
    assert len({u.voice for u in by["test"] if u.synth == "espeak"}) <= 4
    assert voices["test_synth"] == [f"festival:{v}" for v in sent.FESTIVAL_VOICES]


def test_plan_is_seeded():
    a = sent.plan(pool(200), COUNTS, 3, espeak_voices=ESPEAK)
    assert a == sent.plan(pool(200), COUNTS, 3, espeak_voices=ESPEAK)
    assert a != sent.plan(pool(200), COUNTS, 4, espeak_voices=ESPEAK)


@pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("espeak-ng", "sox", "flite", "text2wave"))
    or not Path(sent.FORTUNES, "fortunes").is_file(),
    reason="needs espeak-ng, sox, flite, festival and fortunes (make system-deps)",
)
def test_synthesize_writes_16k_audio_for_every_split(tmp_path):
    manifests = sent.synthesize_sentences(tmp_path, n_train=6, n_val=2, n_test=2, n_test_synth=3)
    assert set(manifests) == set(sent.SPLITS)
    for split, path in manifests.items():
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(lines) == {"train": 6, "val": 2, "test": 2, "test_synth": 3}[split]
        for line in lines:
            audio, rate = sf.read(tmp_path / line["audio"])
            assert rate == 16000 and audio.ndim == 1 and len(audio) > 8000
            assert sent.speakable(line["text"]) and line["source"] in (
                "fortunes",
                "gettext",
                "packages",
            )
        if split == "test_synth":
            assert {line["synth"] for line in lines} == {"festival"}
