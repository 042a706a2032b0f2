"""Importers: public corpus layouts (CoVoST 2, MuST-C) as manifest entries for ``prepare``.

Each importer returns an :class:`Imported`: one :class:`Entry` per usable row (a manifest line as
:func:`mmalign.data.shards.prepare` reads it, plus the corpus file and line it came from, so that
later problems such as a missing clip still point at the corpus) and the rows it had to skip,
each with its file, line and reason. A bad row never stops an import; a layout that cannot be
read at all (a missing header column, parallel files of different lengths) raises
``ValueError`` naming the files. :meth:`Imported.write_jsonl` writes the entries as a manifest.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmalign.data.index import SkippedItem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    """One manifest line (``audio`` as an absolute path, ``text``, other fields) and its origin."""

    record: dict[str, Any]
    source: str
    line: int | None


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
