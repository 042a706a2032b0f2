"""Importers: corpus layouts (LibriSpeech, Common Voice, CoVoST 2, MuST-C, LRS3, Hugging Face
datasets, lhotse) as manifest entries for ``prepare``.

Each importer returns an :class:`Imported`: one :class:`Entry` per usable row (a manifest line as
:func:`mmalign.data.shards.prepare` reads it, plus the corpus file and line it came from, so that
later problems such as a missing clip still point at the corpus) and the rows it had to skip,
each with its file, line and reason. A bad row never stops an import; a layout that cannot be
read at all (a missing header column, parallel files of different lengths) raises
``ValueError`` naming the files. :meth:`Imported.write_jsonl` writes the entries as a manifest.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmalign.data.index import SkippedItem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    """One manifest line (``audio`` as an absolute path, ``text``, other fields) and its origin;
    ``audio_reader``/``video_reader`` read media that is no plain file or needs a detector
    (:data:`mmalign.data.corpus.AudioReader`, :data:`~mmalign.data.corpus.VideoReader`)."""

    record: dict[str, Any]
    source: str
    line: int | None
    audio_reader: Any = None
    video_reader: Any = None


@dataclass
class Imported:
    """What an importer read: usable entries and skipped rows."""

    entries: list[Entry] = field(default_factory=list)
    skipped: list[SkippedItem] = field(default_factory=list)

    def skip(self, source: str | Path, line: int | None, reason: str) -> None:
        """Record (and log) a row left out."""
        item = SkippedItem(str(source), line, reason)
        log.warning("skipping %s", item)
        self.skipped.append(item)

    def write_jsonl(self, path: str | Path) -> Path:
        """Write the entries as a JSONL manifest (UTF-8, one object per line); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            for entry in self.entries:
                fh.write(json.dumps(entry.record, ensure_ascii=False) + "\n")
        return path


def read_tsv(
    tsv: Path, required: Sequence[str], result: Imported, name: str
) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The header and the usable rows ``(line, column -> value)`` of a tab-separated corpus file
    (no quoting: sentences hold quotes). A missing or incomplete header raises naming the file;
    rows with the wrong number of columns or invalid UTF-8 are skipped into ``result``."""
    rows = []
    with open(tsv, encoding="utf-8", errors="replace", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{name}: {tsv} is empty (expected a header {' '.join(required)})")
        missing = [c for c in required if c not in header]
        if missing:
            raise ValueError(f"{name}: {tsv}:1: header lacks {missing}; found {header}")
        for row in reader:
            line = reader.line_num
            if not row or row == [""]:
                continue
            if len(row) != len(header):
                result.skip(tsv, line, f"expected {len(header)} columns, got {len(row)}")
            elif any("\ufffd" in value for value in row):
                result.skip(tsv, line, "invalid UTF-8")
            else:
                rows.append((line, dict(zip(header, row, strict=True))))
    return header, rows
