"""MuST-C: TED talks with segment lists and parallel text -> manifest entries.

Layout of one language pair (``<root>`` is e.g. ``MUSTC_v1.0/en-de``)::

    <root>/data/<split>/wav/<talk>.wav         whole talks
    <root>/data/<split>/txt/<split>.yaml       one {duration, offset, speaker_id, wav} per segment
    <root>/data/<split>/txt/<split>.<src>      one transcript line per segment, same order
    <root>/data/<split>/txt/<split>.<tgt>      one translation line per segment, same order

Each entry is ``{"audio" (the talk), "offset", "duration" (seconds: ``prepare`` cuts only that
segment), "text", "translation": {tgt: ...}, "source_lang", "target_lang", "key"
(``<talk>_<n>``, the n-th segment of the talk, as MuST-C names them), "speaker"}``. Languages
come from the folder name (``en-de``) unless given. The three files must have as many segments
as lines (otherwise nothing lines up, and the error names the files); a segment with a bad field
is skipped with the YAML file and line, empty text with the text file and line.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from mmalign.data.sources import Entry, Imported

_PAIR = re.compile(r"(?P<src>[a-z]{2,3})-(?P<tgt>[a-z]{2,3})")
_FIELDS = ("duration", "offset", "speaker_id", "wav")


def is_mustc(root: str | Path) -> bool:
    """Whether ``root`` looks like a MuST-C language-pair folder (``data/*/txt/*.yaml``)."""
    root = Path(root)
    return root.is_dir() and any(root.glob("data/*/txt/*.yaml"))


def mustc_splits(root: str | Path) -> list[str]:
    """The splits under ``<root>/data`` that have a segment list (``train``, ``dev``, ...)."""
    return sorted(p.parent.parent.name for p in Path(root).glob("data/*/txt/*.yaml"))


def _languages(
    root: Path, txt: Path, split: str, source_lang: str | None, target_lang: str | None
) -> tuple[str, str]:
    match = _PAIR.fullmatch(root.name)
    src = source_lang or (match["src"] if match else None)
    tgt = target_lang or (match["tgt"] if match else None)
    if src is None or tgt is None:  # no en-de folder name: the two text files tell
        langs = sorted(p.suffix[1:] for p in txt.glob(f"{split}.*") if p.suffix != ".yaml")
        if len(langs) == 2 and "en" in langs:
            src = src or "en"
            tgt = tgt or next(lang for lang in langs if lang != src)
    if not src or not tgt:
        raise ValueError(
            f"mustc: cannot tell the languages of {root} (expected a folder named like en-de); "
            "pass source_lang and target_lang"
        )
    return src, tgt


def _text_lines(path: Path) -> list[str]:
    """Lines split at ``\\n`` only (``str.splitlines`` also splits at U+2028 and friends, which
    would break the line-by-line alignment)."""
    if not path.is_file():
        raise FileNotFoundError(f"mustc: text file {path} not found")
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def _segments(path: Path) -> list[tuple[int, Any]]:
    """``(line, mapping or node)`` per list item of the YAML file, with 1-based line numbers."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        with open(path, encoding="utf-8") as fh:
            root = yaml.compose(fh, Loader=loader)
    except (yaml.YAMLError, UnicodeDecodeError) as exn:
        raise ValueError(f"mustc: {path} is not valid YAML: {exn}") from exn
    if root is None:
        return []
    if not isinstance(root, yaml.SequenceNode):
        raise ValueError(f"mustc: {path} must hold a YAML list of segments")
    segments = []
    for node in root.value:
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            fields = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and isinstance(value, yaml.ScalarNode):
                    fields[key.value] = value.value
            segments.append((line, fields))
        else:
            segments.append((line, None))
    return segments


def _seconds(value: Any) -> float | None:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if math.isfinite(seconds) else None


def read_mustc(
    root: str | Path,
    *,
    split: str | None = None,
    source_lang: str | None = None,
    target_lang: str | None = None,
) -> Imported:
    """Read one split of a MuST-C language pair into manifest entries (one per segment).

    ``split`` may be left out when the folder has a single split. Raises ``ValueError`` when
    the segment list and the two text files differ in length.
    """
    root = Path(root).expanduser()
    splits = mustc_splits(root)
    if not splits:
        raise ValueError(f"mustc: {root} has no data/<split>/txt/<split>.yaml")
    if split is None:
        if len(splits) > 1:
            raise ValueError(f"mustc: {root} has splits {splits}; choose one with split")
        split = splits[0]
    if split not in splits:
        raise ValueError(f"mustc: {root} has no split {split!r} (found {splits})")
    txt = root / "data" / split / "txt"
    wav_dir = root / "data" / split / "wav"
    src, tgt = _languages(root, txt, split, source_lang, target_lang)
    yaml_path = txt / f"{split}.yaml"
    src_path, tgt_path = txt / f"{split}.{src}", txt / f"{split}.{tgt}"
    segments = _segments(yaml_path)
    sources, targets = _text_lines(src_path), _text_lines(tgt_path)
    if not len(segments) == len(sources) == len(targets):
        raise ValueError(
            f"mustc: {yaml_path} has {len(segments)} segments but {src_path} has {len(sources)} "
            f"lines and {tgt_path} has {len(targets)}: the files do not line up"
        )
    result = Imported()
    per_talk: Counter[str] = Counter()
    rows = zip(segments, sources, targets, strict=True)
    for number, ((line, seg), text, translation) in enumerate(rows, start=1):
        if seg is None:
            result.skip(yaml_path, line, "segment is not a mapping")
            continue
        missing = [f for f in _FIELDS if not seg.get(f)]
        if missing:
            result.skip(yaml_path, line, f"segment lacks {missing}")
            continue
        offset, duration = _seconds(seg["offset"]), _seconds(seg["duration"])
        if offset is None or offset < 0:
            result.skip(yaml_path, line, f"bad offset {seg['offset']!r}")
            continue
        if duration is None or duration <= 0:
            result.skip(yaml_path, line, f"bad duration {seg['duration']!r}")
            continue
        talk = Path(seg["wav"]).stem
        index = per_talk[talk]  # counted before skipping text, so keys match MuST-C's numbering
        per_talk[talk] += 1
        text, translation = text.strip(), translation.strip()
        if not text or "\ufffd" in text:
            result.skip(src_path, number, "empty or invalid UTF-8 transcript")
            continue
        if not translation or "\ufffd" in translation:
            result.skip(tgt_path, number, "empty or invalid UTF-8 translation")
            continue
        record = {
            "audio": str(wav_dir / seg["wav"]),
            "offset": offset,
            "duration": duration,
            "text": text,
            "translation": {tgt: translation},
            "source_lang": src,
            "target_lang": tgt,
            "key": f"{talk}_{index}",
            "speaker": seg["speaker_id"],
        }
        result.entries.append(Entry(record, str(yaml_path), line))
    return result
