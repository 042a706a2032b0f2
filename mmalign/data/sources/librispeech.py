"""LibriSpeech: ``speaker/chapter/<id>.flac`` beside ``<speaker>-<chapter>.trans.txt``.

A split folder (``train-clean-100``, ``dev-clean`` ...) or a folder holding several of them (the
``LibriSpeech`` root: ``split`` then names which, comma-separated, e.g. ``train-clean-100,
train-clean-360,train-other-500`` for train-960 in one call). Each transcript line is
``<utterance id> <TEXT>``; the text is kept as the corpus writes it (upper case, no punctuation),
so score with a normaliser (``english``, recorded in the index). Lines without a text or whose
FLAC is missing are skipped with their file and line.
"""

from __future__ import annotations

from pathlib import Path

from mmalign.data.sources import Entry, Imported

NORMALIZER = "english"


def transcripts(folder: Path) -> list[Path]:
    """The ``*.trans.txt`` files of a LibriSpeech split folder (``speaker/chapter/``) or root."""
    return sorted(folder.glob("*/*/*.trans.txt")) or sorted(folder.glob("*/*/*/*.trans.txt"))


def is_librispeech(folder: Path) -> bool:
    return bool(transcripts(folder))


def read_librispeech(folder: str | Path, *, split: str | None = None) -> Imported:
    """Manifest entries of every utterance under ``folder`` (``split``: which subfolders)."""
    folder = Path(folder).expanduser()
    found = transcripts(folder)
    if not found:
        raise ValueError(f"librispeech: no speaker/chapter/*.trans.txt under {folder}")
    if split is not None:
        wanted = [s.strip() for s in split.split(",") if s.strip()]
        roots = {p.relative_to(folder).parts[0] for p in found}
        missing = [s for s in wanted if s not in roots]
        if missing or len(found[0].relative_to(folder).parts) != 4:
            raise ValueError(
                f"librispeech: split {split!r}: {folder} holds split folders {sorted(roots)}"
            )
        found = [p for p in found if p.relative_to(folder).parts[0] in wanted]
    result = Imported()
    for trans in found:
        with open(trans, encoding="utf-8", errors="replace") as fh:
            for line, row in enumerate(fh, start=1):
                key, _, text = row.strip().partition(" ")
                if not key:
                    continue
                if "\ufffd" in row:
                    result.skip(trans, line, "invalid UTF-8")
                    continue
                if not text.strip():
                    result.skip(trans, line, f"{key}: empty text")
                    continue
                speaker, chapter = key.split("-")[:2] if key.count("-") >= 2 else ("", "")
                record = {
                    "audio": str(trans.parent / f"{key}.flac"),
                    "text": text.strip(),
                    "key": key,
                    "speaker": speaker,
                    "chapter": chapter,
                }
                result.entries.append(Entry(record, str(trans), line))
    return result
