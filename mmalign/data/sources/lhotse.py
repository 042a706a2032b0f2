"""lhotse manifests: a CutSet, or a RecordingSet with its SupervisionSet (JSONL, plain or gz).

The source is a ``*cuts*.jsonl[.gz]`` file, a ``*supervisions*.jsonl[.gz]`` file beside its
``*recordings*`` twin, or a folder of them as k2/icefall recipes write (``data/manifests``:
``split`` keeps the files whose name holds it, e.g. ``dev-clean``). Each line is turned into a
lhotse object by lhotse itself; a cut (or, without cuts, a supervision) becomes
``{"audio" (the recording's file), "offset", "duration" (the cut's, in seconds: ``prepare`` reads
exactly ``round(x * rate)`` samples, as lhotse does), "text" (its supervisions' texts in time
order), "key" (the cut or supervision id), "speaker", "language", "recording_id"}``.
Relative recording paths resolve against the current folder, as lhotse resolves them.

Cuts that are no plain recording slice (mixed or padding cuts), recordings that are not one
audio file (URLs, commands, in-memory audio, one file per channel) or that carry transforms
(speed perturbation), lines that do not parse and cuts without text are skipped with their file
and line. ``lhotse`` is an optional extra (``pip install 'mmalign[lhotse]'``), imported only here.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any

from mmalign.data.sources import Entry, Imported

_MANIFEST = re.compile(r".*(cuts|recordings|supervisions).*\.jsonl(\.gz)?")


def _lhotse() -> Any:
    try:
        import lhotse
        import lhotse.serialization
    except ImportError as exn:
        raise ImportError(
            "prepare --format lhotse needs lhotse: pip install 'mmalign[lhotse]'"
        ) from exn
    return lhotse


def _kind(path: Path) -> str | None:
    match = _MANIFEST.fullmatch(path.name)
    return match[1] if match else None


def _twin(supervisions: Path) -> Path:
    return supervisions.with_name(supervisions.name.replace("supervisions", "recordings"))


def is_lhotse(source: Path) -> bool:
    """A cuts manifest, a supervisions manifest with its recordings, or a folder of them."""
    if source.is_file():
        kind = _kind(source)
        return kind == "cuts" or (kind == "supervisions" and _twin(source).is_file())
    kinds = {_kind(p) for p in source.glob("*.jsonl*")} if source.is_dir() else set()
    return "cuts" in kinds or {"recordings", "supervisions"} <= kinds


def _pick(source: Path, split: str | None) -> tuple[str, Path]:
    """``("cuts", file)`` or ``("supervisions", file)`` (its recordings beside it)."""
    if source.is_file():
        if split is not None:
            raise ValueError(f"lhotse: {source} is one manifest; --split applies to folders")
        return ("cuts" if _kind(source) == "cuts" else "supervisions"), source
    files = sorted(p for p in source.glob("*.jsonl*") if _kind(p) and (split or "") in p.name)
    for kind in ("cuts", "supervisions"):
        found = [p for p in files if _kind(p) == kind]
        if len(found) > 1:
            names = [p.name for p in found]
            raise ValueError(f"lhotse: {source} holds {kind} manifests {names}; pick with --split")
        if found and (kind == "cuts" or _twin(found[0]).is_file()):
            return kind, found[0]
    raise ValueError(
        f"lhotse: no *cuts*.jsonl[.gz] or *supervisions* + *recordings* manifests"
        f"{f' holding {split!r}' if split else ''} in {source}"
    )


def _lines(path: Path) -> Any:
    """``(line, dict or None)`` per non-empty line; None for a line that is no JSON object."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as fh:
        for line, raw in enumerate(fh, start=1):
            if raw.strip():
                try:
                    data = json.loads(raw)
                except json.JSONDecodeError:
                    data = None
                yield line, data if isinstance(data, dict) else None


def read_lhotse(source: str | Path, *, split: str | None = None) -> Imported:
    """Manifest entries of every cut (or supervision) of one lhotse manifest."""
    lhotse = _lhotse()
    source = Path(source).expanduser()
    kind, path = _pick(source, split)
    recordings = {}
    if kind == "supervisions":
        recordings = {r.id: r for r in lhotse.RecordingSet.from_file(_twin(path))}
    result = Imported()
    for line, data in _lines(path):
        try:
            item = lhotse.serialization.deserialize_item(data) if data is not None else None
        except Exception as exn:  # lhotse raises KeyError, TypeError, ValueError ...
            result.skip(path, line, f"not a lhotse manifest line: {exn!r}")
            continue
        if item is None:
            result.skip(path, line, "not a JSON object")
        elif kind == "cuts":
            _add(result, path, line, item.id, getattr(item, "recording", None), item, True)
        else:
            recording = recordings.get(item.recording_id)
            if recording is None:
                result.skip(path, line, f"{item.id}: no recording {item.recording_id!r}")
                continue
            _add(result, path, line, item.id, recording, item, False)
    return result


def _add(
    result: Imported, path: Path, line: int, key: str, recording: Any, span: Any, is_cut: bool
) -> None:
    """One entry for the ``span`` (a cut, or a supervision: ``start``, ``duration``) of
    ``recording``, or the reason it is skipped."""
    cut_type = type(span).__name__
    if is_cut and cut_type != "MonoCut":
        return result.skip(path, line, f"{key}: a {cut_type}, not a recording slice (MonoCut)")
    if recording is None:
        return result.skip(path, line, f"{key}: no recording")
    sources = recording.sources
    if len(sources) != 1 or sources[0].type != "file":
        types = [s.type for s in sources]
        return result.skip(path, line, f"{key}: recording sources {types}, not one audio file")
    if recording.transforms:
        return result.skip(path, line, f"{key}: recording transforms are not applied here")
    supervisions = sorted(span.supervisions, key=lambda s: s.start) if is_cut else [span]
    text = " ".join(s.text.strip() for s in supervisions if s.text and s.text.strip())
    if not text:
        return result.skip(path, line, f"{key}: no supervision text")
    first = supervisions[0]
    record = {
        "audio": str(Path(sources[0].source).expanduser().absolute()),
        "offset": float(span.start),
        "duration": float(span.duration),
        "text": text,
        "key": key,
        "recording_id": recording.id,
        **({"speaker": first.speaker} if first.speaker else {}),
        **({"language": first.language} if first.language else {}),
    }
    result.entries.append(Entry(record, str(path), line))
