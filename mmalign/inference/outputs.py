"""What ``mmalign transcribe`` writes: per-file ``.txt``/``.srt``/``.vtt``, the ledger, the summary.

Each finished file gets its ``.txt``/``.srt``/``.vtt`` (each written atomically; subtitles from
:mod:`mmalign.inference.subtitles`) under a name from :func:`output_name`, then its line in
``transcripts.jsonl`` (:class:`Ledger`), flushed and synced: the ledger is what a rerun reads
(:func:`read_ledger`) to skip the files already done. :class:`TranscribeSummary` counts what the
run did for its final report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmalign.atomic import atomic_write_text
from mmalign.inference.inputs import InputItem
from mmalign.inference.subtitles import to_srt, to_vtt

log = logging.getLogger(__name__)

LEDGER = "transcripts.jsonl"
FORMATS = ("txt", "srt", "vtt")


def read_ledger(path: Path) -> dict[str, dict[str, Any]]:
    """Records of a previous run by absolute path. A last line cut short by an interruption is
    dropped from the file, so appending goes on from a clean line boundary."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    records: dict[str, dict[str, Any]] = {}
    good = 0
    for raw in data.splitlines(keepends=True):
        if not raw.strip():
            good += len(raw)
            continue
        try:
            rec = json.loads(raw)
            records[os.path.abspath(rec["path"])] = rec
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exn:
            if good + len(raw) < len(data):
                raise ValueError(
                    f"{path}: corrupt line at byte {good}; fix it or use --overwrite"
                ) from exn
            log.warning("%s: dropping a last line cut short by an interruption", path)
            break
        if not raw.endswith(b"\n"):  # complete JSON but no newline yet
            raw += b"\n"
            with open(path, "r+b") as fh:
                fh.seek(good)
                fh.write(raw)
        good += len(raw)
    if good < len(data):
        with open(path, "r+b") as fh:
            fh.truncate(good)
    return records


def output_name(item: InputItem, taken: set[str]) -> str:
    """Output base name: path relative to its input folder (else the file stem); a clash gets a
    short hash of the absolute path, so names never depend on processing order."""
    rel = item.path.relative_to(item.root) if item.root else Path(item.path.name)
    name = rel.with_suffix("").as_posix()
    if name in taken:
        name = f"{name}-{hashlib.sha1(item.key.encode()).hexdigest()[:8]}"
    taken.add(name)
    return name


def write_file_outputs(
    out_dir: Path, name: str, record: dict[str, Any], formats: Sequence[str]
) -> dict[str, str]:
    """Write ``name.txt/.srt/.vtt`` for a transcribed file; returns {format: relative path}."""
    writers = {
        "txt": lambda r: r["text"] + "\n",
        "srt": lambda r: to_srt(r["chunks"]),
        "vtt": lambda r: to_vtt(r["chunks"]),
    }
    written = {}
    for fmt in formats:
        rel = f"{name}.{fmt}"
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, writers[fmt](record))
        written[fmt] = rel
    return written


class Ledger:
    """Append-only ``transcripts.jsonl``; every line is flushed and synced before going on."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fh = open(path, "a", encoding="utf-8")

    def append(self, record: dict[str, Any]) -> None:
        self.fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        self.fh.close()


@dataclass
class TranscribeSummary:
    """Counts for the final report; ``failed`` and ``skipped`` list (path, reason),
    ``empty`` (path, empty chunks, chunks) the files with chunks that came back empty."""

    out_dir: Path
    transcribed: int = 0
    already_done: int = 0
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    empty: list[tuple[str, int, int]] = field(default_factory=list)

    @property
    def empty_chunks(self) -> int:
        return sum(n for _, n, _ in self.empty)

    def text(self) -> str:
        speed = self.audio_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0
        first = (
            f"transcribed {self.transcribed} file(s), {self.audio_seconds:.1f} s of audio in "
            f"{self.wall_seconds:.1f} s ({speed:.1f} audio-s/s); {self.already_done} already "
            f"done; {len(self.failed)} failed"
        )
        if self.skipped:
            first += f"; {len(self.skipped)} skipped"
        if self.empty:
            first += (
                f"; warning: {self.empty_chunks} chunk(s) with sound came back empty in "
                f"{len(self.empty)} file(s)"
            )
        lines = [f"{first}; outputs in {self.out_dir}"]
        lines += [f"  failed: {path}: {error}" for path, error in self.failed]
        lines += [f"  skipped: {path}: {why}" for path, why in self.skipped]
        lines += [
            f"  warning: {path}: {n} of {total} chunk(s) came back empty"
            for path, n, total in self.empty
        ]
        return "\n".join(lines)
