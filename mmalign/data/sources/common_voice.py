"""Common Voice: a release folder of ``train.tsv``/``dev.tsv``/``test.tsv`` (and others) beside
``clips/*.mp3``; ``split`` picks the TSV (``train``, ``dev``, ``test``, ``validated`` ...).

Each entry is ``{"audio", "text" (sentence), "key" (clip stem), "speaker" (client_id),
"up_votes", "down_votes", "locale", and the demographic columns present}``. Rows with missing
columns, an empty path or sentence, or invalid UTF-8 are skipped with their file and line.
"""

from __future__ import annotations

from pathlib import Path

from mmalign.data.sources import Entry, Imported, read_tsv

REQUIRED = ("client_id", "path", "sentence")
KEPT = ("up_votes", "down_votes", "age", "gender", "accents", "locale", "variant")


def is_common_voice(folder: Path) -> bool:
    return (folder / "clips").is_dir() and any(folder.glob("*.tsv"))


def read_common_voice(folder: str | Path, *, split: str | None = None) -> Imported:
    """Manifest entries of one Common Voice split (its TSV)."""
    folder = Path(folder).expanduser()
    tsvs = sorted(p.stem for p in folder.glob("*.tsv"))
    if split is None:
        raise ValueError(f"common_voice: pass split, one of {tsvs} ({folder})")
    tsv = folder / f"{split}.tsv"
    if not tsv.is_file():
        raise ValueError(f"common_voice: no {tsv.name} in {folder}; splits here: {tsvs}")
    result = Imported()
    _, rows = read_tsv(tsv, REQUIRED, result, "common_voice")
    for line, row in rows:
        path, sentence = row["path"].strip(), row["sentence"].strip()
        if not path:
            result.skip(tsv, line, "empty 'path'")
            continue
        if not sentence:
            result.skip(tsv, line, "empty 'sentence'")
            continue
        record = {
            "audio": str(folder / "clips" / path),
            "text": sentence,
            "key": Path(path).stem,
            "speaker": row["client_id"],
        }
        for name in KEPT:
            if row.get(name):
                value = row[name]
                votes = name.endswith("votes") and value.isdigit()
                record[name] = int(value) if votes else value
        result.entries.append(Entry(record, str(tsv), line))
    return result
