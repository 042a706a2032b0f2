"""Turn a raw speech corpus into webdataset tar shards plus an ``index.json``.

Training reads shards sequentially (fast on any file system, splittable across nodes and
workers), so ``mmalign prepare`` converts a corpus once: every sample becomes a 16 kHz mono FLAC
plus a JSON record. The source is either

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

Shard layout (one tar member per field, grouped by ``__key__``)::

    <key>.flac   16-bit FLAC, mono, ``sample_rate`` Hz
    <key>.npy    uint8 T x H x W grayscale lip frames (only for items with ``video``)
    <key>.json   {"text", "duration" (s), "sample_rate", "source" (original path), ...kept fields,
                  "offset" (s, for a segment), and with video: "video_fps", "video_frames",
                  "video_source"}

Video is stored as a numpy array rather than re-encoded: mouth crops are small (88-96 px), a
lossless array decodes in microseconds in the data workers, and no codec is needed at training
time. Containers are decoded once here with torchcodec, converted to grayscale and, when
``crop`` gives a fixed box ``(x, y, w, h)``, cut to it; otherwise clips are taken to be
pre-cropped mouth regions. The frame rate is the manifest's ``video_fps``, else the container's,
else the ``video_fps`` argument (25). Audio is stored whole: it is aligned to the video's frames
when read (:func:`mmalign.data.video.align_audio`), so ``duration`` is the audio's.

Bad items (unreadable or missing audio or video, a crop box outside the frame, empty or missing
text, invalid JSON lines) never stop a run: each is logged as a warning with its file and line,
listed in ``index.json`` and counted in the :class:`PrepareReport`. ``index.json`` also lists
every shard with its sample count, duration, size and checksum (:mod:`mmalign.data.index`); the
data module checks the shards against it and sizes epochs from it. Output is written beside the
old and swapped in when complete, and a killed run resumes (:mod:`mmalign.data.writer`).

A path that resolves outside ``root`` (default: the manifest's folder; ``..``, absolute paths
and symlinks all count) is not a bad item but a refused manifest: :class:`PathOutsideRootError`
stops the run before anything is written, naming the file, line and field, since a manifest
from elsewhere must not make ``prepare`` copy arbitrary files into shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from tqdm.auto import tqdm

from mmalign.data.index import INDEX_NAME, ShardInfo, SkippedItem
from mmalign.data.media import (
    SegmentError,
    load_audio,
    manifest_path,
    not_a_file,
)
from mmalign.data.video import Box, decode_video
from mmalign.data.writer import ShardWriter

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".opus", ".aiff", ".aif", ".au")
FORMATS = ("auto", "manifest", "folder", "covost", "mustc")


@dataclass
class PrepareReport:
    """What :func:`prepare` wrote and what it skipped. ``ok`` is false when nothing was written."""

    written: int = 0
    skipped: list[SkippedItem] = field(default_factory=list)
    shards: list[ShardInfo] = field(default_factory=list)
    total_seconds: float = 0.0
    out_dir: Path | None = None
    index_path: Path | None = None
    out_of_range: list[SkippedItem] = field(default_factory=list)
    resumed_shards: int = 0

    @property
    def ok(self) -> bool:
        """True when at least one sample was written (the CLI exits non-zero otherwise)."""
        return self.written > 0

    def summary(self) -> str:
        """One line for a terminal."""
        line = (
            f"wrote {self.written} samples ({self.total_seconds / 3600:.2f} h) in "
            f"{len(self.shards)} shard(s) to {self.out_dir}; skipped {len(self.skipped)}"
        )
        if self.resumed_shards:
            line += f"; resumed after {self.resumed_shards} finished shard(s)"
        if self.out_of_range:
            line += (
                f"; kept {len(self.out_of_range)} outside the length limits (listed in "
                f"{INDEX_NAME} 'out_of_range'; --out_of_range drop leaves them out)"
            )
        return line


@dataclass
class _Item:
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


class _SkipItem(Exception):
    """Raised while reading an item that must be left out."""


def sanitize_key(key: str) -> str:
    """Make ``key`` safe as a webdataset key: webdataset splits member names at the first dot, so
    dots, slashes and anything unusual become ``_``."""
    clean = re.sub(r"[^A-Za-z0-9_-]+", "_", key).strip("_")
    return clean or "sample"


def encode_flac(wave: torch.Tensor, sample_rate: int) -> bytes:
    """16-bit FLAC bytes of a mono waveform (values beyond ±1, e.g. resampling overshoot, clip)."""
    buf = io.BytesIO()
    data = np.clip(wave.numpy(), -1.0, 1.0)
    sf.write(buf, data, sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def _manifest_items(
    manifest: Path, skipped: list[SkippedItem], root: str | Path | None = None
) -> list[_Item]:
    items: list[_Item] = []
    base = manifest.parent
    with open(manifest, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exn:
                bad = raw[exn.start : exn.start + 1].hex()
                _skip(skipped, str(manifest), lineno, f"not UTF-8 (byte 0x{bad} at {exn.start})")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exn:
                _skip(skipped, str(manifest), lineno, f"invalid JSON: {exn.msg}")
                continue
            if not isinstance(obj, dict):
                _skip(skipped, str(manifest), lineno, "line is not a JSON object")
                continue
            item = _object_item(obj, base, str(manifest), lineno, skipped, root)
            if item is not None:
                items.append(item)
    return items


def _object_item(
    obj: dict[str, Any],
    base: Path,
    source: str,
    lineno: int | None,
    skipped: list[SkippedItem],
    root: str | Path | None = None,
) -> _Item | None:
    """The item of one manifest object (relative paths against ``base``, refused outside
    ``root``, default ``base``); None if skipped."""
    obj = dict(obj)
    audio = obj.pop("audio", None)
    if not isinstance(audio, str) or not audio:
        _skip(skipped, source, lineno, "missing 'audio' path")
        return None
    where = {"root": root, "source": source, "line": lineno}
    path = manifest_path(base, audio, field="audio", **where)
    text = obj.pop("text", None)
    video, fps = obj.pop("video", None), obj.pop("video_fps", None)
    video_path = None
    if video is not None:
        if not isinstance(video, str) or not video:
            _skip(skipped, source, lineno, f"bad 'video' path: {video!r}")
            return None
        video_path = manifest_path(base, video, field="video", **where)
    if fps is not None and not _positive_number(fps):
        _skip(skipped, source, lineno, f"bad 'video_fps': {fps!r}")
        return None
    offset, duration = obj.pop("offset", None), obj.pop("duration", None)
    if offset is not None and not (_positive_number(offset) or _is_zero(offset)):
        _skip(skipped, source, lineno, f"bad 'offset' (seconds >= 0): {offset!r}")
        return None
    if duration is not None and not _positive_number(duration):
        _skip(skipped, source, lineno, f"bad 'duration' (seconds > 0): {duration!r}")
        return None
    key = obj.get("key", obj.get("id"))
    key = str(key) if key is not None else Path(audio).with_suffix("").as_posix()
    return _Item(
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


def _positive_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _is_zero(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def _folder_items(folder: Path, skipped: list[SkippedItem]) -> list[_Item]:
    items: list[_Item] = []
    audio_files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES
    )
    for path in audio_files:
        transcript = path.with_suffix(".txt")
        if not transcript.is_file():
            _skip(skipped, str(path), None, f"no transcript {transcript.name}")
            continue
        try:
            text = transcript.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exn:
            _skip(skipped, str(transcript), None, f"unreadable transcript: {exn}")
            continue
        key = path.relative_to(folder).with_suffix("").as_posix()
        items.append(_Item(path, text, key, {}, str(path), None))
    return items


def _skip(skipped: list[SkippedItem], source: str, line: int | None, reason: str) -> None:
    skipped.append(_skip_item(source, line, reason))


def _skip_item(source: str, line: int | None, reason: str) -> SkippedItem:
    item = SkippedItem(source, line, reason)
    log.warning("skipping %s", item)
    return item


def _read_item(item: _Item, sample_rate: int) -> tuple[torch.Tensor, str]:
    if not isinstance(item.text, str) or not item.text.strip():
        raise _SkipItem("empty or missing text")
    problem = not_a_file(item.audio)
    if problem:
        raise _SkipItem(f"audio {problem}: {item.audio}")
    try:
        wave = load_audio(item.audio, sample_rate, offset=item.offset, duration=item.duration)
    except SegmentError as exn:
        raise _SkipItem(str(exn)) from exn
    except Exception as exn:  # soundfile raises several types for bad files
        raise _SkipItem(f"unreadable audio {item.audio}: {exn}") from exn
    if wave.numel() == 0:
        raise _SkipItem(f"empty audio {item.audio}")
    if not torch.isfinite(wave).all():
        raise _SkipItem(f"non-finite samples in {item.audio}")
    return wave, " ".join(item.text.split())


def _read_video(item: _Item, crop: Box | None, default_fps: float) -> tuple[np.ndarray, float]:
    """uint8 ``T x H x W`` frames of the item's video (gray, cropped) and its frame rate."""
    path = item.video
    assert path is not None
    problem = not_a_file(path)
    if problem:
        raise _SkipItem(f"video {problem}: {path}")
    try:
        frames, found_fps = decode_video(path.read_bytes(), path.suffix, box=crop)
    except (OSError, ValueError) as exn:
        raise _SkipItem(f"unreadable video {path}: {exn}") from exn
    fps = item.video_fps or found_fps or default_fps
    return frames.numpy(), float(fps)


def encode_npy(frames: np.ndarray) -> bytes:
    """``.npy`` bytes of an array (read back with ``np.load(..., allow_pickle=False)``)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(frames), allow_pickle=False)
    return buf.getvalue()


def _check_crop(crop: Any) -> Box | None:
    if crop is None:
        return None
    try:
        box = tuple(int(v) for v in crop)
    except (TypeError, ValueError) as exn:
        raise ValueError(f"prepare: crop must be (x, y, w, h) integers, got {crop!r}") from exn
    if len(box) != 4 or any(int(v) != v for v in crop):
        raise ValueError(f"prepare: crop must be (x, y, w, h) integers, got {crop!r}")
    x, y, w, h = box
    if x < 0 or y < 0 or w < 1 or h < 1:
        raise ValueError(f"prepare: crop (x, y, w, h)={crop!r} needs x, y >= 0 and w, h >= 1")
    return (x, y, w, h)


def _resolve_format(source: Path, fmt: str) -> str:
    """The concrete format of ``source`` (``auto`` guessed from its suffix or layout)."""
    if fmt not in FORMATS:
        raise ValueError(f"prepare: format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "auto":
        if source.is_dir():
            from mmalign.data.sources.mustc import is_mustc

            return "mustc" if is_mustc(source) else "folder"
        return "covost" if source.suffix.lower() == ".tsv" else "manifest"
    if fmt in ("folder", "mustc") and not source.is_dir():
        raise ValueError(f"prepare: format {fmt!r} needs a folder, {source} is a file")
    if fmt in ("manifest", "covost") and source.is_dir():
        raise ValueError(f"prepare: format {fmt!r} needs a file, {source} is a folder")
    return fmt


def _corpus_items(
    source: Path,
    fmt: str,
    skipped: list[SkippedItem],
    *,
    split: str | None,
    source_lang: str | None,
    target_lang: str | None,
    clips: str | Path | None,
    root: str | Path | None = None,
) -> list[_Item]:
    """Items of a CoVoST TSV or MuST-C folder, through :mod:`mmalign.data.sources`; skip reasons
    keep pointing at the corpus files (TSV or YAML line). Audio must lie inside ``root``
    (default: the CoVoST clips folder, the MuST-C folder)."""
    langs = {"source_lang": source_lang, "target_lang": target_lang}
    if fmt == "covost":
        from mmalign.data.sources.covost import read_covost

        imported = read_covost(source, clips=clips, split=split, **langs)
    else:
        from mmalign.data.sources.mustc import read_mustc

        imported = read_mustc(source, split=split, **langs)
    skipped.extend(imported.skipped)
    if root is None:
        root = source if fmt == "mustc" else _covost_clips(source, clips)
    items = []
    for entry in imported.entries:
        item = _object_item(entry.record, source.parent, entry.source, entry.line, skipped, root)
        if item is not None:
            items.append(item)
    return items


def _covost_clips(tsv: Path, clips: str | Path | None) -> Path:
    return Path(clips).expanduser() if clips is not None else tsv.parent / "clips"


def _unique_keys(items: list[_Item]) -> Iterator[tuple[_Item, str]]:
    seen: set[str] = set()
    for item in items:
        base = sanitize_key(item.key)
        key, n = base, 1
        while key in seen:
            key = f"{base}_{n}"
            n += 1
        seen.add(key)
        yield item, key


def prepare(
    source: str | Path,
    out_dir: str | Path,
    *,
    shard_max_bytes: int = 256 * 2**20,
    shard_max_count: int | None = None,
    sample_rate: int = 16000,
    prefix: str = "shard",
    progress: bool = True,
    video_fps: float = 25.0,
    crop: tuple[int, int, int, int] | None = None,
    format: str = "auto",
    split: str | None = None,
    source_lang: str | None = None,
    target_lang: str | None = None,
    clips: str | Path | None = None,
    root: str | Path | None = None,
    min_seconds: float = 0.1,
    max_seconds: float | None = 30.0,
    out_of_range: str = "keep",
) -> PrepareReport:
    """Write ``source`` (JSONL manifest, audio+``.txt`` folder, CoVoST 2 TSV or MuST-C folder)
    as webdataset shards.

    Shards are named ``{prefix}-000000.tar`` ... in ``out_dir`` and hold at most
    ``shard_max_bytes`` bytes (the shard is closed once it reaches the cap, so one sample may go
    over it) and at most ``shard_max_count`` samples. They are written beside the old output and
    swapped in when complete, ``index.json`` last; a killed run leaves the old output whole and
    the same command resumes it (:mod:`mmalign.data.writer`). Returns a report; its ``ok`` is
    false when nothing could be written.

    Manifest items with a ``video`` path also get ``<key>.npy`` (uint8 T x H x W grayscale).
    ``video_fps`` is their frame rate when neither the manifest line (``video_fps``) nor the
    container says; ``crop`` is a fixed box ``(x, y, w, h)`` cut from every frame of every clip
    (None: clips are already mouth regions). A clip the box does not fit is skipped.

    ``format`` is ``manifest``, ``folder``, ``covost`` (a CoVoST 2 TSV; ``clips`` is the folder
    of its Common Voice clips, default ``<tsv folder>/clips``) or ``mustc`` (a MuST-C pair folder
    such as ``en-de``); ``auto`` picks ``covost`` for ``.tsv`` files, ``mustc`` for folders with
    ``data/*/txt/*.yaml``, ``folder`` for other folders and ``manifest`` for other files.
    ``split`` chooses the MuST-C split (or the rows of a combined CoVoST TSV), ``source_lang``
    and ``target_lang`` the languages when the file or folder name does not tell them.

    Clips shorter than ``min_seconds`` or longer than ``max_seconds`` (Whisper's 30 s window;
    None: no upper limit) are kept and listed (``out_of_range="keep"``: training skips and counts
    what its encoder cannot read, evaluate and transcribe chunk long audio) or skipped
    (``"drop"``). They are not split: cutting a transcribed utterance at a silence needs to know
    which words fall on which side, which a transcript without timings does not tell.

    Every ``audio``/``video`` path a manifest lists must resolve (``..`` and symlinks followed)
    inside ``root``, default the manifest's folder (a CoVoST TSV's clips folder, the MuST-C
    folder); otherwise :class:`PathOutsideRootError` names the file, line and field before
    anything is written. ``root="/"`` allows any path.
    """
    source = Path(source).expanduser()
    out = Path(out_dir).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"prepare: source {source} does not exist")
    if not _positive_number(video_fps):
        raise ValueError(f"prepare: video_fps must be a positive number, got {video_fps!r}")
    if out_of_range not in ("keep", "drop"):
        raise ValueError(f"prepare: out_of_range must be 'keep' or 'drop', got {out_of_range!r}")
    if not (_positive_number(min_seconds) or _is_zero(min_seconds)) or not (
        max_seconds is None or (_positive_number(max_seconds) and max_seconds > min_seconds)
    ):
        raise ValueError(
            f"prepare: need 0 <= min_seconds < max_seconds, got min_seconds={min_seconds!r}, "
            f"max_seconds={max_seconds!r}"
        )
    box = _check_crop(crop)
    fmt = _resolve_format(source, format)
    corpus_options = {"split": split, "source_lang": source_lang, "target_lang": target_lang}
    if fmt != "covost" and clips is not None:
        raise ValueError(f"prepare: clips only applies to CoVoST TSVs, not format {fmt!r}")
    given = sorted(name for name, value in corpus_options.items() if value is not None)
    if fmt not in ("covost", "mustc") and given:
        raise ValueError(f"prepare: {given} only apply to covost and mustc, not format {fmt!r}")
    if prefix != sanitize_key(prefix):
        raise ValueError(f"prepare: prefix {prefix!r} must be letters, digits, '-' or '_'")
    report = PrepareReport(out_dir=out, index_path=out / INDEX_NAME)
    # read first: a corpus that cannot be read at all raises before anything is written
    if fmt == "folder":
        items = _folder_items(source, report.skipped)
    elif fmt == "manifest":
        items = _manifest_items(source, report.skipped, root)
    else:
        items = _corpus_items(source, fmt, report.skipped, clips=clips, root=root, **corpus_options)
    keyed = list(_unique_keys(items))
    options = {
        "sample_rate": sample_rate,
        "shard_max_bytes": shard_max_bytes,
        "shard_max_count": shard_max_count,
        "video_fps": video_fps,
        "crop": box,
        "limits": [min_seconds, max_seconds, out_of_range],
    }
    writer = ShardWriter(
        out,
        prefix,
        shard_max_bytes,
        shard_max_count,
        _fingerprint(keyed, options),
        notes={"skipped": [], "out_of_range": [], "videos": 0},
    )
    report.resumed_shards = writer.resumed
    limits = (min_seconds, max_seconds, out_of_range)
    if not writer.complete:
        _write_items(keyed, writer, sample_rate, box, video_fps, limits, progress)
        writer.finish(len(keyed))
    report.skipped += [SkippedItem(**d) for d in writer.notes["skipped"]]
    report.out_of_range = [SkippedItem(**d) for d in writer.notes["out_of_range"]]
    report.shards = list(writer.shards)
    report.written = sum(s.samples for s in report.shards)
    report.total_seconds = round(sum(s.seconds for s in report.shards), 6)
    writer.publish(
        {
            "source": str(source),
            "source_format": fmt,
            "sample_rate": sample_rate,
            "prefix": prefix,
            "video_samples": writer.notes["videos"],
            "video_crop": list(box) if box is not None else None,
            "total_samples": report.written,
            "total_seconds": report.total_seconds,
            "skipped": [asdict(s) for s in report.skipped],
            "length_limits": {"min_seconds": min_seconds, "max_seconds": max_seconds},
            "out_of_range": [asdict(s) for s in report.out_of_range],
        }
    )
    if report.ok:
        log.info(report.summary())
    else:
        log.error(
            "prepare: nothing written from %s (%d items skipped)", source, len(report.skipped)
        )
    return report


def _fingerprint(keyed: list[tuple[_Item, str]], options: dict[str, Any]) -> str:
    """What a resumed run must share with the interrupted one: options, items and the size and
    time of every file they read."""

    def stat(path: Path | None) -> list[int] | None:
        try:
            st = path.stat() if path is not None else None
        except OSError:
            return None
        return None if st is None else [st.st_size, st.st_mtime_ns]

    h = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    for item, key in keyed:
        row = [key, str(item.audio), stat(item.audio), str(item.video), stat(item.video)]
        row += [item.text, item.extra, item.offset, item.duration, item.video_fps]
        h.update(json.dumps(row, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _write_items(
    keyed: list[tuple[_Item, str]],
    writer: ShardWriter,
    sample_rate: int,
    box: Box | None,
    video_fps: float,
    limits: tuple[float, float | None, str],
    progress: bool,
) -> None:
    """Read, check and write every item from ``writer.next_item`` on."""
    min_seconds, max_seconds, policy = limits
    notes = writer.notes
    start = writer.next_item
    bar = tqdm(total=len(keyed), initial=start, disable=not progress, desc="prepare")
    for pos in range(start, len(keyed)):
        item, key = keyed[pos]
        bar.update(1)
        try:
            wave, text = _read_item(item, sample_rate)
            video = None if item.video is None else _read_video(item, box, video_fps)
        except _SkipItem as why:
            notes["skipped"].append(asdict(_skip_item(item.source, item.line, str(why))))
            continue
        duration = wave.numel() / sample_rate
        if duration < min_seconds or (max_seconds is not None and duration > max_seconds):
            limit = (
                f"min_seconds={min_seconds}"
                if duration < min_seconds
                else (f"max_seconds={max_seconds}")
            )
            why = f"{item.audio} ({key}) lasts {duration:.2f} s, outside {limit}"
            if policy == "drop":
                notes["skipped"].append(asdict(_skip_item(item.source, item.line, why)))
                continue
            log.warning("prepare: keeping %s:%s: %s", item.source, item.line, why)
            notes["out_of_range"].append(asdict(SkippedItem(item.source, item.line, why)))
        meta = {
            **item.extra,
            "text": text,
            "duration": round(duration, 6),
            "sample_rate": sample_rate,
            "source": str(item.audio),
        }
        if item.offset is not None:
            meta["offset"] = item.offset
        members: dict[str, bytes] = {"flac": encode_flac(wave, sample_rate)}
        if video is not None:
            frames, fps = video
            meta.update(
                video_fps=fps, video_frames=int(frames.shape[0]), video_source=str(item.video)
            )
            members["npy"] = encode_npy(frames)
            notes["videos"] += 1
        sample = {"__key__": key, **members, "json": json.dumps(meta, ensure_ascii=False).encode()}
        writer.write(sample, duration, pos + 1)
    bar.close()
