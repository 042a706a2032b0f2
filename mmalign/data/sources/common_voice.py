"""Common Voice: a release folder of ``train.tsv``/``dev.tsv``/``test.tsv`` (and others) beside
``clips/*.mp3``; ``split`` picks the TSV (``train``, ``dev``, ``test``, ``validated`` ...).

Each entry is ``{"audio", "text" (sentence), "key" (clip stem), "speaker" (client_id),
"up_votes", "down_votes", "locale", and the demographic columns present}``. Rows with missing
columns, an empty path or sentence, or invalid UTF-8 are skipped with their file and line.
"""

from __future__ import annotations

import csv
from pathlib import Path

from mmalign.data.sources import Entry, Imported

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
    with open(tsv, encoding="utf-8", errors="replace", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None) or []
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise ValueError(f"common_voice: {tsv}:1: header lacks {missing}; found {header}")
        column = {name: i for i, name in enumerate(header)}
        for row in reader:
            line = reader.line_num
            if not row or row == [""]:
                continue
            if len(row) != len(header):
                result.skip(tsv, line, f"expected {len(header)} columns, got {len(row)}")
                continue
            if any("\ufffd" in value for value in row):
                result.skip(tsv, line, "invalid UTF-8")
                continue
            path, sentence = row[column["path"]].strip(), row[column["sentence"]].strip()
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
                "speaker": row[column["client_id"]],
            }
            for name in KEPT:
                if name in column and row[column[name]] != "":
                    value = row[column[name]]
                    votes = name.endswith("votes") and value.isdigit()
                    record[name] = int(value) if votes else value
            result.entries.append(Entry(record, str(tsv), line))
    return result
