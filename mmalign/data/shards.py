"""Turn a raw speech corpus into webdataset tar shards plus an ``index.json``: :func:`prepare`.

Training reads shards sequentially (fast on any file system, splittable across nodes and
workers), so ``mmalign prepare`` converts a corpus once: every sample becomes a 16 kHz mono FLAC
plus a JSON record. The source (a JSONL manifest, a folder of audio with transcripts, or a
corpus layout of :mod:`mmalign.data.sources`) is read into items by :mod:`mmalign.data.corpus`.

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
A path outside ``root`` refuses the whole manifest instead (:mod:`mmalign.data.corpus`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mmalign.data.corpus import (
    Item,
    SkipItem,
    check_corpus_options,
    corpus_items,
    folder_items,
    is_zero,
    manifest_items,
    positive_number,
    read_item,
    read_item_video,
    resolve_format,
    skip_item,
    source_exists,
)
from mmalign.data.encoding import encode_flac, encode_npy, sanitize_key
from mmalign.data.index import INDEX_NAME, ShardInfo, SkippedItem
from mmalign.data.video import Box
from mmalign.data.writer import ShardWriter

log = logging.getLogger(__name__)


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


def _unique_keys(items: list[Item]) -> Iterator[tuple[Item, str]]:
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
    jobs: int = 1,
    text_column: str | None = None,
    crops: str | None = None,
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
    of its Common Voice clips, default ``<tsv folder>/clips``), ``mustc`` (a MuST-C pair folder
    such as ``en-de``), ``librispeech`` (a split folder or the root; ``split`` picks subfolders,
    comma-separated) or ``common_voice`` (a release folder; ``split`` picks the TSV); ``auto``
    recognises each layout, and picks ``covost`` for ``.tsv`` files, ``mustc`` for folders with
    ``data/*/txt/*.yaml``, ``folder`` for other folders and ``manifest`` for other files.
    ``split`` chooses the MuST-C split (or the rows of a combined CoVoST TSV), ``source_lang``
    and ``target_lang`` the languages when the file or folder name does not tell them. ``hf``
    (a ``save_to_disk`` folder or parquet files, auto-detected; ``text_column`` names the text),
    ``lhotse`` (a CutSet or recordings + supervisions, JSONL or gz) and ``lrs3`` (LRS3/LRS2
    ``pretrain``/``trainval``/``test`` folders; ``crops`` says where the mouth crops come from,
    and ``pretrain`` utterances longer than ``max_seconds`` are split at word boundaries) are
    read by :mod:`mmalign.data.sources.hf`, :mod:`~mmalign.data.sources.lhotse` and
    :mod:`~mmalign.data.sources.lrs3`.

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
    if not source_exists(source):
        raise FileNotFoundError(f"prepare: source {source} does not exist")
    if not positive_number(video_fps):
        raise ValueError(f"prepare: video_fps must be a positive number, got {video_fps!r}")
    if out_of_range not in ("keep", "drop"):
        raise ValueError(f"prepare: out_of_range must be 'keep' or 'drop', got {out_of_range!r}")
    if not (positive_number(min_seconds) or is_zero(min_seconds)) or not (
        max_seconds is None or (positive_number(max_seconds) and max_seconds > min_seconds)
    ):
        raise ValueError(
            f"prepare: need 0 <= min_seconds < max_seconds, got min_seconds={min_seconds!r}, "
            f"max_seconds={max_seconds!r}"
        )
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ValueError(f"prepare: jobs must be an int >= 1, got {jobs!r}")
    box = _check_crop(crop)
    fmt = resolve_format(source, format)
    corpus_options = {"split": split, "source_lang": source_lang, "target_lang": target_lang}
    corpus_options.update(text_column=text_column, crops=crops)
    if fmt != "covost" and clips is not None:
        raise ValueError(f"prepare: clips only applies to CoVoST TSVs, not format {fmt!r}")
    check_corpus_options(fmt, corpus_options)
    if prefix != sanitize_key(prefix):
        raise ValueError(f"prepare: prefix {prefix!r} must be letters, digits, '-' or '_'")
    report = PrepareReport(out_dir=out, index_path=out / INDEX_NAME)
    # read first: a corpus that cannot be read at all raises before anything is written
    if fmt == "folder":
        items = folder_items(source, report.skipped)
    elif fmt == "manifest":
        items = manifest_items(source, report.skipped, root)
    else:
        where = {"clips": clips, "root": root, "max_seconds": max_seconds}
        items = corpus_items(source, fmt, report.skipped, **where, **corpus_options)
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
    cfg = _Settings(sample_rate, box, video_fps, min_seconds, max_seconds, out_of_range)
    if not writer.complete:
        _write_items(keyed, writer, cfg, progress, jobs)
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
            # LibriSpeech's and LRS3's text is upper case without punctuation: score normalised
            **({"normalizer": "english"} if fmt in ("librispeech", "lrs3") else {}),
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


def _fingerprint(keyed: list[tuple[Item, str]], options: dict[str, Any]) -> str:
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
        row += [repr(item.audio_reader), repr(item.video_reader)]
        h.update(json.dumps(row, sort_keys=True, default=str).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class _Settings:
    """What turning one item into a sample needs (picklable, for worker processes)."""

    sample_rate: int
    box: Box | None
    video_fps: float
    min_seconds: float
    max_seconds: float | None
    policy: str


def _make_sample(job: tuple[Item, str, _Settings]) -> tuple[str, Any, float]:
    """``("sample", sample, seconds)``, ``("skip", reason, 0)`` or, for a clip kept outside the
    length limits, ``("kept", (sample, reason), seconds)`` for one item: read, check, encode."""
    item, key, cfg = job
    try:
        wave, text = read_item(item, cfg.sample_rate)
        video = None if item.video is None else read_item_video(item, cfg.box, cfg.video_fps)
    except SkipItem as why:
        return "skip", str(why), 0.0
    duration = wave.numel() / cfg.sample_rate
    outside = None
    if duration < cfg.min_seconds or (cfg.max_seconds is not None and duration > cfg.max_seconds):
        short = duration < cfg.min_seconds
        limit = f"min_seconds={cfg.min_seconds}" if short else f"max_seconds={cfg.max_seconds}"
        outside = f"{item.audio} ({key}) lasts {duration:.2f} s, outside {limit}"
        if cfg.policy == "drop":
            return "skip", outside, 0.0
    meta = {
        **item.extra,
        "text": text,
        "duration": round(duration, 6),
        "sample_rate": cfg.sample_rate,
        "source": str(item.audio),
    }
    if item.offset is not None:
        meta["offset"] = item.offset
    members: dict[str, bytes] = {"flac": encode_flac(wave, cfg.sample_rate)}
    if video is not None:
        frames, fps, fields = video
        meta.update(video_fps=fps, video_frames=int(frames.shape[0]), video_source=str(item.video))
        meta.update(fields)
        members["npy"] = encode_npy(frames)
    sample = {"__key__": key, **members, "json": json.dumps(meta, ensure_ascii=False).encode()}
    return ("kept", (sample, outside), duration) if outside else ("sample", sample, duration)


def _one_thread() -> None:
    """Each worker decodes and resamples on one thread: N workers x torch's default thread
    count would oversubscribe the cores."""
    torch.set_num_threads(1)


def _make_samples(jobs: list[tuple[Item, str, _Settings]]) -> list[tuple[str, Any, float]]:
    return [_make_sample(job) for job in jobs]


def _bounded_map(pool: Any, work: Iterator[Any], workers: int, chunk: int = 32) -> Iterator[Any]:
    """``map(_make_sample, work)`` in order on ``pool``, ``chunk`` items per task (one item is
    too little work to ship to a process) and a few tasks per worker in flight, so encoded
    samples never pile up in memory ahead of the writer."""
    from collections import deque
    from itertools import islice

    pending: deque[Any] = deque()
    while batch := list(islice(work, chunk)):
        pending.append(pool.submit(_make_samples, batch))
        if len(pending) >= 4 * workers:
            yield from pending.popleft().result()
    while pending:
        yield from pending.popleft().result()


def _write_items(
    keyed: list[tuple[Item, str]],
    writer: ShardWriter,
    cfg: _Settings,
    progress: bool,
    jobs: int = 1,
) -> None:
    """Read, check and write every item from ``writer.next_item`` on; with ``jobs`` > 1, worker
    processes read and encode while this one writes, in corpus order (the same shards)."""
    notes = writer.notes
    start = writer.next_item
    work = ((item, key, cfg) for item, key in keyed[start:])
    bar = tqdm(total=len(keyed), initial=start, disable=not progress, desc="prepare", unit="item")
    pool = None
    if jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(
            jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread
        )
        results = _bounded_map(pool, work, jobs)
    else:
        results = map(_make_sample, work)
    try:
        for pos, (kind, value, seconds) in enumerate(results, start=start):
            item = keyed[pos][0]
            bar.update(1)
            if kind == "skip":
                notes["skipped"].append(asdict(skip_item(item.source, item.line, value)))
                continue
            if kind == "kept":
                value, why = value
                log.warning("prepare: keeping %s:%s: %s", item.source, item.line, why)
                notes["out_of_range"].append(asdict(SkippedItem(item.source, item.line, why)))
            notes["videos"] += "npy" in value
            writer.write(value, seconds, pos + 1)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
