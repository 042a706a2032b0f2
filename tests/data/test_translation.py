"""Speech-translation demo corpus: gettext sentence pairs, split by sentence, espeak-ng run."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import soundfile as sf

from mmalign.data.shards import prepare
from mmalign.data.synthetic import translation as st

HAVE_TOOLS = shutil.which("espeak-ng") is not None and shutil.which("sox") is not None
HEADER = "Content-Type: text/plain; charset=UTF-8\n"


def write_mo(path: Path, messages: dict[str, str]) -> Path:
    """Write a GNU .mo catalog (little-endian, no hash table): what msgfmt would produce."""
    entries = sorted({"": HEADER, **messages}.items())
    ids = [k.encode("utf-8") for k, _ in entries]
    strs = [v.encode("utf-8") for _, v in entries]
    n = len(entries)
    ids_table, strs_table = 28, 28 + 8 * n
    data_start = 28 + 16 * n
    data, ids_index, strs_index = b"", [], []
    for source, index in ((ids, ids_index), (strs, strs_index)):
        for s in source:
            index.append((len(s), data_start + len(data)))
            data += s + b"\0"
    head = struct.pack("<7I", 0x950412DE, 0, n, ids_table, strs_table, 0, data_start)
    tables = b"".join(struct.pack("<2I", *e) for e in ids_index + strs_index)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(head + tables + data)
    return path


GOOD = {  # English -> (German, French)
    "The file could not be opened.": (
        "Die Datei konnte nicht geöffnet werden.",
        "Le fichier n'a pas pu être ouvert.",
    ),
    "Do you want to save the changes?": (
        "Möchten Sie die Änderungen speichern?",
        "Voulez-vous enregistrer les modifications ?",
    ),
    "Please wait while the files are copied.": (
        "Bitte warten Sie, während die Dateien kopiert werden.",
        "Veuillez patienter pendant la copie des fichiers.",
    ),
    "The network connection was lost.": (
        "Die Netzwerkverbindung wurde unterbrochen.",
        "La connexion réseau a été perdue.",
    ),
    "Your password has expired.": (
        "Ihr Passwort ist abgelaufen.",
        "Votre mot de passe a expiré.",
    ),
    "A new version is available.": (
        "Eine neue Version ist verfügbar.",
        "Une nouvelle version est disponible.",
    ),
    "The disk is almost full.": (
        "Die Festplatte ist fast voll.",
        "Le disque est presque plein.",
    ),
    "Select a folder to continue.": (
        "Wählen Sie einen Ordner, um fortzufahren.",
        "Sélectionnez un dossier pour continuer.",
    ),
}
BAD_ENGLISH = [
    "Could not open %s for reading.",  # format specifier
    "Value {name} is not valid.",
    "This costs $5 per month.",
    "First line here.\nSecond line here.",  # newline
    "Click <b>here</b> to go on.",  # markup
    "_Open the recent file now.",  # mnemonic
    "Save & close the window now.",
    "See /usr/share/doc for more details.",  # path
    "Use --force to overwrite it.",  # option
    "THIS IS A VERY LOUD MESSAGE.",  # all caps
    "Too short.",  # 2 words
    " ".join(["word"] * 21) + ".",  # 21 words
]


@pytest.fixture
def locale_dir(tmp_path: Path) -> Path:
    """Fake catalogs: German in two files (one with a competing translation), French in one,
    one corrupt .mo, and a mix of good messages and each kind of bad one."""
    root = tmp_path / "locale"
    de = {en: pair[0] for en, pair in GOOD.items()}
    fr = {en: pair[1] for en, pair in GOOD.items()}
    for en in BAD_ENGLISH:
        de[en], fr[en] = "Ein deutscher Satz hier.", "Une phrase française ici."
    # an ellipsis or colon at the end is dropped; context and plural entries
    de["Copying the files, please wait..."] = "Dateien werden kopiert, bitte warten …"
    fr["Copying the files, please wait..."] = "Copie des fichiers, veuillez patienter…"
    de["menu\x04Open the selected file now."] = "Die gewählte Datei jetzt öffnen."
    fr["menu\x04Open the selected file now."] = "Ouvrir le fichier sélectionné maintenant."
    de["One file was deleted.\x00Many files were deleted."] = "Eine Datei.\x00Viele Dateien."
    fr["One file was deleted.\x00Many files were deleted."] = "Un fichier.\x00Des fichiers."
    # bad translations: untranslated, mnemonic, markup; no French at all
    de["The printer is out of paper."] = "The printer is out of paper."
    fr["The printer is out of paper."] = "L'imprimante n'a plus de papier."
    de["Open the file in a new window."] = "Datei in neuem _Fenster öffnen."
    fr["Open the file in a new window."] = "Ouvrir le fichier dans une nouvelle fenêtre."
    de["Only German knows this sentence."] = "Nur Deutsch kennt diesen Satz."
    write_mo(root / "de/LC_MESSAGES/app.mo", de)
    # a second German catalog disagrees once; a third agrees with the first: majority wins
    write_mo(root / "de/LC_MESSAGES/other.mo", {"Your password has expired.": "Passwort alt."})
    write_mo(
        root / "de/LC_MESSAGES/third.mo",
        {"Your password has expired.": de["Your password has expired."]},
    )
    (root / "de/LC_MESSAGES/broken.mo").write_bytes(b"not a catalog at all")
    write_mo(root / "fr/LC_MESSAGES/app.mo", fr)
    return root


def test_gettext_pairs_keeps_sentences_and_drops_bad_kinds(locale_dir: Path, caplog) -> None:
    with caplog.at_level("WARNING"):
        pairs = st.gettext_pairs(("de", "fr"), locale_dir)
    assert "broken.mo" in caplog.text  # reported, and the other catalogs still read
    english = [p["en"] for p in pairs]
    assert english == sorted(english)
    expected = set(GOOD) | {"Open the selected file now."}
    assert set(english) == expected
    by_en = {p["en"]: p for p in pairs}
    for en, (de, fr) in GOOD.items():
        assert by_en[en] == {"en": en, "de": de, "fr": fr}
    assert by_en["Open the selected file now."]["de"] == "Die gewählte Datei jetzt öffnen."
    # labels and fragments only when asked; the trailing ellipsis is gone
    more = {p["en"]: p for p in st.gettext_pairs(["de", "fr"], locale_dir, sentences_only=False)}
    assert "Copying the files, please wait" in more
    assert more["Copying the files, please wait"]["fr"] == "Copie des fichiers, veuillez patienter"
    assert set(more) - {"Copying the files, please wait"} == expected
    # one language only: German-only sentences appear, the untranslated one never does
    german = {p["en"] for p in st.gettext_pairs(("de",), locale_dir)}
    assert "Only German knows this sentence." in german
    assert "The printer is out of paper." not in german
    assert st.gettext_pairs(("de", "fr"), locale_dir) == pairs  # deterministic


def test_gettext_pairs_errors(locale_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="es/LC_MESSAGES"):
        st.gettext_pairs(("de", "es"), locale_dir)
    with pytest.raises(ValueError, match="non-English"):
        st.gettext_pairs(("en", "de"), locale_dir)


def test_sentence_filters() -> None:
    assert st.is_sentence("The file could not be opened.")
    assert not st.is_sentence("delete the reference")
    assert st.is_sentence("delete the reference", sentences_only=False)
    assert st.clean_message("  Save  the\u00a0file as:  ") == "Save the file as"
    assert not st.is_clean_translation("Fichier &Ouvrir", "Open file")
    assert not st.is_clean_translation("Open File", "open file")


def fake_pairs(n: int) -> list[dict[str, str]]:
    return [{"en": f"Sentence number {i} is here.", "de": f"Satz {i}.", "fr": f"Phrase {i}."}
            for i in range(n)]  # fmt: skip


def test_split_is_by_sentence_and_reuses_with_other_voices() -> None:
    voices = [f"en+v{i}" for i in range(20)]
    counts = {"train": 40, "val": 3, "test": 4}
    utts, chosen, train_voices, held_out = st._plan_st(fake_pairs(15), counts, 5, 4, voices)
    assert [sum(u.split == s for u in utts) for s in counts] == [40, 3, 4]
    texts = {s: {u.text for u in utts if u.split == s} for s in counts}
    assert len(texts["val"]) == 3 and len(texts["test"]) == 4  # distinct sentences
    assert not texts["train"] & texts["val"] and not texts["train"] & texts["test"]
    assert not texts["val"] & texts["test"]
    assert len(texts["train"]) == 8  # all the rest, each spoken 5 times
    assert {u.voice for u in utts if u.split == "test"} <= set(held_out)
    assert not {u.voice for u in utts if u.split != "test"} & set(held_out)
    for text in texts["train"]:  # reuse speaks a sentence with a different voice each time
        spoken = [u.voice for u in utts if u.text == text]
        assert len(spoken) == len(set(spoken)) == 5
    assert all(chosen[u.key]["en"] == u.text for u in utts)
    again = st._plan_st(fake_pairs(15), counts, 5, 4, voices)
    assert again[0] == utts and again[1] == chosen
    assert st._plan_st(fake_pairs(15), counts, 6, 4, voices)[0] != utts


def test_sentence_pools_keep_half_for_training() -> None:
    assert st._sentence_pools(1714, {"train": 2000, "val": 64, "test": 200}) == {
        "val": 64,
        "test": 200,
    }
    sizes = st._sentence_pools(10, {"train": 4, "val": 30, "test": 30})
    assert sizes["val"] >= 1 and sizes["test"] >= 1 and sizes["val"] + sizes["test"] <= 5
    assert st._sentence_pools(3, {"train": 1, "val": 1, "test": 1}) == {"val": 1, "test": 1}
    with pytest.raises(ValueError, match="at least 3 sentence pairs"):
        st._sentence_pools(2, {"train": 1, "val": 1, "test": 1})


def test_cli_routes_translation(monkeypatch, tmp_path: Path) -> None:
    from mmalign import cli

    seen = {}

    def fake(out_dir, **kwargs):
        seen.update(kwargs, out_dir=out_dir)
        return {"train": Path(out_dir) / "train.jsonl"}

    monkeypatch.setattr(st, "synthesize_st", fake)
    cli.main(["synth", str(tmp_path), "--kind", "translation", "--n_train", "3", "--langs", "[de]"])
    assert seen["langs"] == ("de",) and seen["n_train"] == 3
    with pytest.raises(SystemExit, match="video"):
        cli.synth(str(tmp_path), kind="translation", video=True)


def read(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]


@pytest.mark.skipif(not HAVE_TOOLS, reason="espeak-ng and sox are not installed")
def test_synthesize_st_small(locale_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "st"
    manifests = st.synthesize_st(
        out, n_train=4, n_val=2, n_test=2, seed=1, locale_dir=locale_dir, jobs=2
    )
    rows = {split: read(path) for split, path in manifests.items()}
    assert [len(rows[s]) for s in ("train", "val", "test")] == [4, 2, 2]
    targets = {p["en"]: (p["de"], p["fr"]) for p in st.gettext_pairs(("de", "fr"), locale_dir)}
    keys = {"audio", "text", "translation", "source_lang", "key", "voice", "speed", "pitch", "task"}
    for items in rows.values():
        for item in items:
            assert set(item) == keys and item["task"] == "asr" and item["source_lang"] == "en"
            assert item["translation"] == dict(
                zip(("de", "fr"), targets[item["text"]], strict=True)
            )
            info = sf.info(out / item["audio"])
            assert info.samplerate == 16000 and info.channels == 1 and info.duration > 0.3
    train = {r["text"] for r in rows["train"]}
    assert not train & {r["text"] for r in rows["val"] + rows["test"]}
    raw = "".join(path.read_text(encoding="utf-8") for path in manifests.values())
    assert "\\u00" not in raw and not raw.isascii()  # readable UTF-8, not \\u escapes
    again = st.synthesize_st(
        tmp_path / "again", n_train=4, n_val=2, n_test=2, seed=1, locale_dir=locale_dir, jobs=1
    )
    assert all(again[s].read_text() == manifests[s].read_text() for s in manifests)
    report = prepare(manifests["train"], tmp_path / "shards", progress=False)
    assert report.ok and report.written == 4


@pytest.mark.skipif(
    not HAVE_TOOLS or not list(Path(st.LOCALE_DIR).glob("fr/LC_MESSAGES/*.mo")),
    reason="needs espeak-ng, sox and the system's German and French gettext catalogs",
)
def test_synthesize_st_real_catalogs(tmp_path: Path) -> None:
    manifests = st.synthesize_st(tmp_path, n_train=4, n_val=2, n_test=2)
    rows = [row for path in manifests.values() for row in read(path)]
    assert len(rows) == 8
    assert all(row["translation"]["de"] and row["translation"]["fr"] for row in rows)
