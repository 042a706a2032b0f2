"""Write numbered tar shards so that a kill loses nothing: the old output stays whole until the
new one is complete, and a rerun resumes.

Shards are written into a hidden work folder inside the output folder (``.shard.partial``: the
same file system, so moving a shard in is a rename). Each shard is written as ``.tar.tmp``,
flushed to disk, renamed to ``.tar`` and only then recorded in the work folder's journal
(``progress.json``) with the position of the next corpus item and the notes (skipped items) so
far. A rerun with the same corpus and options (the same ``fingerprint``) keeps the recorded
shards and continues after the last one; any other rerun starts over. When every item is
written, :meth:`ShardWriter.publish` removes the old ``index.json`` (readers now see an
unfinished folder, not a mix), moves the new shards in, deletes old shards of the prefix that
are not replaced, writes the new ``index.json`` last and removes the work folder. Member times
are fixed, so a resumed run writes byte-identical shards.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import webdataset as wds

from mmalign.atomic import atomic_write_text
from mmalign.data.index import INDEX_NAME, ShardInfo, write_index

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
JOURNAL_NAME = "progress.json"


class ShardWriter:
    """Resumable writer of ``{prefix}-NNNNNN.tar`` into ``out``; see the module doc.

    Shards close once they reach ``max_bytes`` of member data or ``max_count`` samples (so one
    sample may go over the byte cap). ``notes`` is the caller's JSON-able bookkeeping (skipped
    items, counts ...), restored on resume to what it was when the last kept shard closed.
    """

    def __init__(
        self,
        out: Path,
        prefix: str,
        max_bytes: int,
        max_count: int | None,
        fingerprint: str,
        notes: dict[str, Any] | None = None,
    ) -> None:
        self.out, self.prefix = out, prefix
        self.max_bytes, self.max_count = max_bytes, max_count or 10**12
        self.work = out / f".{prefix}{PARTIAL_SUFFIX}"
        self.shards: list[ShardInfo] = []
        self.notes: dict[str, Any] = _copy(notes or {})
        self.next_item = 0
        self.complete = False
        self._journal: dict[str, Any] = {"fingerprint": fingerprint, "shards": []}
        self._tar: wds.TarWriter | None = None
        self._count, self._bytes, self._seconds = 0, 0, 0.0
        out.mkdir(parents=True, exist_ok=True)
        self._resume(fingerprint)

    @property
    def resumed(self) -> int:
        """Shards kept from an earlier, interrupted run."""
        return len(self.shards)

    def _resume(self, fingerprint: str) -> None:
        journal = self.work / JOURNAL_NAME
        try:
            saved = json.loads(journal.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = None
        if not isinstance(saved, dict) or saved.get("fingerprint") != fingerprint:
            if self.work.exists():
                log.warning("prepare: discarding an unfinished run of other input: %s", self.work)
                shutil.rmtree(self.work)
            self.work.mkdir()
            return
        for entry in saved["shards"]:
            info = ShardInfo(**entry["shard"])
            if not any(p.is_file() and p.stat().st_size == info.bytes for p in self._homes(info)):
                break  # lost since: redo from here
            self.shards.append(info)
            self._journal["shards"].append(entry)
            self.next_item = entry["next_item"]
            self.notes = _copy(entry["notes"])
        if saved.get("complete") and len(self.shards) == len(saved["shards"]):
            self.notes = _copy(saved["notes"])
            self.complete = True
        for stale in self.work.glob("*.tar*"):
            if stale.name not in {s.path for s in self.shards}:
                stale.unlink()

    def _homes(self, info: ShardInfo) -> tuple[Path, Path]:
        """Where a recorded shard may be: the work folder, or the output once published."""
        return self.work / info.path, self.out / info.path

    def write(self, sample: dict[str, Any], seconds: float, next_item: int) -> None:
        """Add one sample (webdataset dict with ``__key__``); ``next_item`` is the corpus position
        a resumed run continues from if this sample's shard is the last one kept."""
        if self._tar is None:
            name = f"{self.prefix}-{len(self.shards):06d}.tar.tmp"
            self._tar = wds.TarWriter(str(self.work / name), mtime=0.0)
        self._bytes += self._tar.write(sample)
        self._count += 1
        self._seconds += seconds
        if self._count >= self.max_count or self._bytes >= self.max_bytes:
            self._close(next_item)

    def _close(self, next_item: int) -> None:
        assert self._tar is not None
        self._tar.close()
        self._tar = None
        tmp = self.work / f"{self.prefix}-{len(self.shards):06d}.tar.tmp"
        final = tmp.with_suffix("")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        info = ShardInfo.of(final, self._count, self._seconds)
        self.shards.append(info)
        self._count, self._bytes, self._seconds = 0, 0, 0.0
        self.next_item = next_item
        self._journal["shards"].append(
            {"shard": info.__dict__, "next_item": next_item, "notes": _copy(self.notes)}
        )
        self._save()

    def _save(self, **extra: Any) -> None:
        atomic_write_text(self.work / JOURNAL_NAME, json.dumps({**self._journal, **extra}))

    def finish(self, items: int) -> None:
        """Close the last shard once all ``items`` corpus items are written or skipped."""
        if self._tar is not None:
            self._close(items)
        self.complete = True
        self._save(complete=True, notes=self.notes)

    def publish(self, fields: dict[str, Any]) -> Path:
        """Swap the finished shards into ``out`` and write its index last (module doc)."""
        assert self.complete, "finish() first"
        (self.out / INDEX_NAME).unlink(missing_ok=True)
        new = {s.path for s in self.shards}
        for old in self.out.glob(f"{self.prefix}-*.tar"):
            if re.fullmatch(rf"{re.escape(self.prefix)}-\d{{6}}\.tar", old.name):
                if old.name not in new:
                    log.warning("removing old shard %s", old)
                    old.unlink()
        for info in self.shards:
            if (self.work / info.path).is_file():
                os.replace(self.work / info.path, self.out / info.path)
        index = write_index(self.out, fields, self.shards)
        shutil.rmtree(self.work)
        return index


def _copy(notes: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(notes))
