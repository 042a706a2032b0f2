"""Read a raw speech corpus into items (:class:`Item`) for ``prepare`` (:mod:`mmalign.data.shards`).

The source is either

* a JSONL manifest, one object per line: ``audio`` (a path; relative paths resolve against the
  manifest's folder), ``text``, optional ``key``/``id``, optional ``video`` (a path to a ``.npy``
  uint8 ``T x H x W`` array or a video file: mp4, mkv, webm ...) with optional ``video_fps``, and
  any other fields, which are kept as-is in the sample's JSON (``task``, ``speaker``,
  ``translation`` ...); or
* a folder searched recursively for audio files, each with a same-named ``.txt`` transcript;
* a CoVoST 2 TSV or a MuST-C language-pair folder, read by the importers in
  :mod:`mmalign.data.sources` (``format`` picks one, ``auto`` tells them apart).

A manifest line may give ``offset`` and/or ``duration`` (seconds) to take one segment of a long
recording (MuST-C's talks): only that segment is read, and an item whose segment lies outside
the file is skipped. Translation corpora keep ``text`` the transcript and add ``translation``
(language -> text), ``source_lang`` and ``target_lang``: one sample serves ASR and ST.

Bad entries (empty or missing text, invalid JSON lines, bad fields) are skipped with their file,
line and reason (:func:`skip`); :func:`read_item` and :func:`read_item_video` then read and check
an item's audio and video, raising :class:`SkipItem` for one that must be left out.

A path that resolves outside ``root`` (default: the manifest's folder; ``..``, absolute paths
and symlinks all count) is not a bad item but a refused manifest: :class:`PathOutsideRootError`
stops the run before anything is written, naming the file, line and field, since a manifest
from elsewhere must not make ``prepare`` copy arbitrary files into shards.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmalign.data.index import SkippedItem
from mmalign.data.media import SegmentError, load_audio, manifest_path, not_a_file, to_mono_rate
from mmalign.data.video import Box, decode_video

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".opus", ".aiff", ".aif", ".au")
FORMATS = (
    "auto",
    "manifest",
    "folder",
    "covost",
    "mustc",
    "librispeech",
    "common_voice",
    "hf",
    "lhotse",
    "lrs3",
)
FOLDER_FORMATS = ("folder", "mustc", "librispeech", "common_voice", "lrs3")

AudioReader = Callable[[], tuple[Any, int]]
"""Picklable callable giving ``(samples [channels, n] or [n], rate)`` for audio that is no
file of its own (a row of a Hugging Face dataset); it raises to have the item skipped."""
VideoReader = Callable[[], tuple[np.ndarray, float, dict[str, Any]]]
"""Picklable callable giving ``(uint8 T x H x W frames, fps, fields for the sample JSON)`` for
video that needs more than decoding (mouth crops cut by a landmark detector)."""


@dataclass
class Item:
    """A corpus entry before its audio is read."""

    audio: Path | None
    text: Any
    key: str
    extra: dict[str, Any]
    source: str
    line: int | None
    video: Path | None = None
    video_fps: float | None = None
    offset: float | None = None
    duration: float | None = None
    audio_reader: AudioReader | None = None
    video_reader: VideoReader | None = None


class SkipItem(Exception):
    """Raised while reading an item that must be left out."""


def manifest_items(
    manifest: Path, skipped: list[SkippedItem], root: str | Path | None = None
) -> list[Item]:
    items: list[Item] = []
    base = manifest.parent
    with open(manifest, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exn:
                bad = raw[exn.start : exn.start + 1].hex()
                skip(skipped, str(manifest), lineno, f"not UTF-8 (byte 0x{bad} at {exn.start})")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exn:
                skip(skipped, str(manifest), lineno, f"invalid JSON: {exn.msg}")
                continue
            if not isinstance(obj, dict):
                skip(skipped, str(manifest), lineno, "line is not a JSON object")
                continue
            item = object_item(obj, base, str(manifest), lineno, skipped, root)
            if item is not None:
                items.append(item)
    return items


def object_item(
    obj: dict[str, Any],
    base: Path,
    source: str,
    lineno: int | None,
    skipped: list[SkippedItem],
    root: str | Path | None = None,
) -> Item | None:
    """The item of one manifest object (relative paths against ``base``, refused outside
    ``root``, default ``base``); None if skipped."""
    obj = dict(obj)
    audio = obj.pop("audio", None)
    if not isinstance(audio, str) or not audio:
        skip(skipped, source, lineno, "missing 'audio' path")
        return None
    where = {"root": root, "source": source, "line": lineno}
    path = manifest_path(base, audio, field="audio", **where)
    text = obj.pop("text", None)
    video, fps = obj.pop("video", None), obj.pop("video_fps", None)
    video_path = None
    if video is not None:
        if not isinstance(video, str) or not video:
            skip(skipped, source, lineno, f"bad 'video' path: {video!r}")
            return None
        video_path = manifest_path(base, video, field="video", **where)
    if fps is not None and not positive_number(fps):
        skip(skipped, source, lineno, f"bad 'video_fps': {fps!r}")
        return None
    offset, duration = obj.pop("offset", None), obj.pop("duration", None)
    if offset is not None and not (positive_number(offset) or is_zero(offset)):
        skip(skipped, source, lineno, f"bad 'offset' (seconds >= 0): {offset!r}")
        return None
    if duration is not None and not positive_number(duration):
        skip(skipped, source, lineno, f"bad 'duration' (seconds > 0): {duration!r}")
        return None
    key = obj.get("key", obj.get("id"))
    key = str(key) if key is not None else Path(audio).with_suffix("").as_posix()
    return Item(
        path,
        text,
        key,
        obj,
        source,
        lineno,
        video=video_path,
        video_fps=None if fps is None else float(fps),
        offset=None if offset is None else float(offset),
        duration=None if duration is None else float(duration),
    )


def positive_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def is_zero(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def folder_items(folder: Path, skipped: list[SkippedItem]) -> list[Item]:
    items: list[Item] = []
    audio_files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES
    )
    for path in audio_files:
        transcript = path.with_suffix(".txt")
        if not transcript.is_file():
            skip(skipped, str(path), None, f"no transcript {transcript.name}")
            continue
        try:
            text = transcript.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exn:
            skip(skipped, str(transcript), None, f"unreadable transcript: {exn}")
            continue
        key = path.relative_to(folder).with_suffix("").as_posix()
        items.append(Item(path, text, key, {}, str(path), None))
    return items


def skip(skipped: list[SkippedItem], source: str, line: int | None, reason: str) -> None:
    skipped.append(skip_item(source, line, reason))


def skip_item(source: str, line: int | None, reason: str) -> SkippedItem:
    item = SkippedItem(source, line, reason)
    log.warning("skipping %s", item)
    return item


def read_item(item: Item, sample_rate: int) -> tuple[torch.Tensor, str]:
    if not isinstance(item.text, str) or not item.text.strip():
        raise SkipItem("empty or missing text")
    problem = not_a_file(item.audio)
    if problem:
        raise SkipItem(f"audio {problem}: {item.audio}")
    try:
        if item.audio_reader is not None:
            samples, rate = item.audio_reader()
            wave = to_mono_rate(torch.as_tensor(samples), rate, sample_rate)
        else:
            wave = load_audio(item.audio, sample_rate, offset=item.offset, duration=item.duration)
    except SegmentError as exn:
        raise SkipItem(str(exn)) from exn
    except Exception as exn:  # soundfile raises several types for bad files
        raise SkipItem(f"unreadable audio {item.audio}: {exn}") from exn
    if wave.numel() == 0:
        raise SkipItem(f"empty audio {item.audio}")
    if not torch.isfinite(wave).all():
        raise SkipItem(f"non-finite samples in {item.audio}")
    return wave, " ".join(item.text.split())


def read_item_video(
    item: Item, crop: Box | None, default_fps: float
) -> tuple[np.ndarray, float, dict[str, Any]]:
    """uint8 ``T x H x W`` frames of the item's video (gray, cropped), its frame rate and the
    fields its reader adds to the sample JSON (a detector's crop boxes)."""
    path = item.video
    assert path is not None
    problem = not_a_file(path)
    if problem:
        raise SkipItem(f"video {problem}: {path}")
    if item.video_reader is not None:
        try:
            return item.video_reader()
        except (OSError, ValueError) as exn:
            raise SkipItem(f"video {path}: {exn}") from exn
    try:
        frames, found_fps = decode_video(path.read_bytes(), path.suffix, box=crop)
    except (OSError, ValueError) as exn:
        raise SkipItem(f"unreadable video {path}: {exn}") from exn
    fps = item.video_fps or found_fps or default_fps
    return frames.numpy(), float(fps), {}


def resolve_format(source: Path, fmt: str) -> str:
    """The concrete format of ``source`` (``auto`` guessed from its suffix or layout; a glob
    such as ``data/train-*.parquet`` is a Hugging Face dataset)."""
    if fmt not in FORMATS:
        raise ValueError(f"prepare: format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "auto":
        from mmalign.data.sources.hf import is_hf
        from mmalign.data.sources.lhotse import is_lhotse

        if is_hf(source):
            return "hf"
        if is_lhotse(source):
            return "lhotse"
        if source.is_dir():
            from mmalign.data.sources.common_voice import is_common_voice
            from mmalign.data.sources.librispeech import is_librispeech
            from mmalign.data.sources.lrs3 import is_lrs3
            from mmalign.data.sources.mustc import is_mustc

            if is_mustc(source):
                return "mustc"
            if is_common_voice(source):
                return "common_voice"
            if is_lrs3(source):
                return "lrs3"
            return "librispeech" if is_librispeech(source) else "folder"
        return "covost" if source.suffix.lower() == ".tsv" else "manifest"
    if fmt in FOLDER_FORMATS and not source.is_dir():
        raise ValueError(f"prepare: format {fmt!r} needs a folder, {source} is a file")
    if fmt in ("manifest", "covost") and source.is_dir():
        raise ValueError(f"prepare: format {fmt!r} needs a file, {source} is a folder")
    return fmt


_LANGS = ("split", "source_lang", "target_lang")
TAKES = {
    "covost": _LANGS,
    "mustc": _LANGS,
    "librispeech": ("split",),
    "common_voice": ("split",),
    "hf": ("split", "text_column"),
    "lhotse": ("split",),
    "lrs3": ("split", "crops"),
}
"""The corpus options (``prepare``'s keywords) that each format reads."""


def check_corpus_options(fmt: str, options: dict[str, Any]) -> None:
    """Refuse options the format would ignore, naming the formats they apply to."""
    given = sorted(name for name, value in options.items() if value is not None)
    if set(given) - set(TAKES.get(fmt, ())):
        fits = " and ".join(f for f, t in TAKES.items() if set(given) <= set(t)) or "no format"
        raise ValueError(f"prepare: {given} only apply to {fits}, not format {fmt!r}")


def source_exists(source: Path) -> bool:
    """Whether ``source`` is a file or folder, or a glob matching some."""
    return source.exists() or (glob.has_magic(str(source)) and bool(glob.glob(str(source))))


def corpus_items(
    source: Path,
    fmt: str,
    skipped: list[SkippedItem],
    *,
    split: str | None,
    source_lang: str | None,
    target_lang: str | None,
    clips: str | Path | None,
    root: str | Path | None = None,
    text_column: str | None = None,
    crops: str | None = None,
    max_seconds: float | None = None,
) -> list[Item]:
    """Items of a corpus layout, through :mod:`mmalign.data.sources`; skip reasons keep pointing
    at the corpus files (TSV or YAML line, dataset row). Audio must lie inside ``root``
    (default: the CoVoST clips folder, the corpus folder, a manifest file's folder).
    ``max_seconds`` is where LRS3 ``pretrain`` utterances are split at word boundaries."""
    langs = {"source_lang": source_lang, "target_lang": target_lang}
    if fmt == "covost":
        from mmalign.data.sources.covost import read_covost

        imported = read_covost(source, clips=clips, split=split, **langs)
    elif fmt == "librispeech":
        from mmalign.data.sources.librispeech import read_librispeech

        imported = read_librispeech(source, split=split)
    elif fmt == "common_voice":
        from mmalign.data.sources.common_voice import read_common_voice

        imported = read_common_voice(source, split=split)
    elif fmt == "hf":
        from mmalign.data.sources.hf import read_hf

        imported = read_hf(source, split=split, text_column=text_column)
    elif fmt == "lhotse":
        from mmalign.data.sources.lhotse import read_lhotse

        imported = read_lhotse(source, split=split)
    elif fmt == "lrs3":
        from mmalign.data.sources.lrs3 import read_lrs3

        imported = read_lrs3(source, split=split, crops=crops, max_seconds=max_seconds)
    else:
        from mmalign.data.sources.mustc import read_mustc

        imported = read_mustc(source, split=split, **langs)
    skipped.extend(imported.skipped)
    folder = source if source.is_dir() else source.parent
    while glob.has_magic(str(folder)):  # a glob's folder: its first part without wildcards
        folder = folder.parent
    if root is None:
        root = covost_clips(source, clips) if fmt == "covost" else folder
        if fmt == "lrs3" and crops not in (None, "detect", "none"):  # a crops folder named
            root = os.path.commonpath([folder.absolute(), Path(crops).expanduser().absolute()])
    items = []
    for entry in imported.entries:
        item = object_item(entry.record, folder, entry.source, entry.line, skipped, root)
        if item is not None:
            item.audio_reader, item.video_reader = entry.audio_reader, entry.video_reader
            items.append(item)
    return items


def covost_clips(tsv: Path, clips: str | Path | None) -> Path:
    return Path(clips).expanduser() if clips is not None else tsv.parent / "clips"
