"""``mmalign transcribe``: many audio files to text, JSONL, SRT and WebVTT, resumable.

Inputs are audio files, folders (searched recursively by extension), text lists (``.txt`` or
``.lst``, one path a line, relative to the list) and JSONL manifests (``audio`` path, optional
``task``/``id`` and prompt fields); paths in lists and manifests must resolve inside ``--root``
(default: the list's own folder). Audio is read with soundfile, or torchaudio/torchcodec (ffmpeg)
for what libsndfile lacks, then down-mixed and resampled. Files longer than ``chunk_seconds``
are cut into overlapping chunks (:mod:`mmalign.inference.chunking`), whose texts are joined
without repeating the overlap; ``chunk_seconds`` defaults to the encoder's window (at most 30 s).
A chunk of at least a second that is not silent but comes back empty is counted: the file's
ledger line has ``empty_chunks`` (and a ``warning``), and the final summary names it. A file
shorter than the audio of one LLM token (:func:`mmalign.inference.decode.min_seconds`) is not
decoded: its line has ``skipped`` with the reason and an empty text.

Work goes in rounds: files are read until about ``4 x batch_size`` chunks are waiting, all those
chunks are decoded in length-sorted batches, then each finished file is written out, in input
order: first its ``.txt``/``.srt``/``.vtt`` (each atomically), then its line in
``transcripts.jsonl``, flushed and synced. That JSONL is the ledger: a rerun into the same
``--out`` skips every path it already lists, so an interrupted run loses at most the round in
flight and never writes a file twice (``--overwrite`` starts afresh; ``--retry-errors`` redoes
the files that failed). A file that cannot be read gets a ledger line with ``error`` set and a
place in the final summary; the run goes on.

Models that read video (VSR/AVSR) take a mouth-region clip per input: a manifest's ``video``
column (``.npy`` uint8 ``T x H x W`` or a video file; ``video_fps`` optional), or the input file
itself when it is a video container (its audio track is the audio). The audio is cut or padded to
whole video frames and the clip is decoded in one piece (clips are not chunked, so a clip
longer than the encoder's window fails with that reason).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mmalign.data.media import (
    AUDIO_EXTENSIONS,
    VIDEO_EXTENSIONS,
    audio_duration,
    find_audio,
    read_audio,
    read_video,
    resolve_path,
    with_video,
)
from mmalign.inference.chunking import Chunk, chunk_bounds
from mmalign.inference.decode import (
    DecodeOptions,
    add_decoding_arguments,
    decode_chunked,
    decode_options,
    default_task,
    features_for,
    load_model,
    select_rates,
    too_short,
    use_rate,
    window_seconds,
)
from mmalign.inference.subtitles import to_srt, to_vtt
from mmalign.model import SpeechLLM

log = logging.getLogger(__name__)

LEDGER = "transcripts.jsonl"
FORMATS = ("txt", "srt", "vtt")
LIST_SUFFIXES = (".txt", ".lst")
DEFAULT_CHUNK_SECONDS = 30.0
EMPTY_CHUNK_SECONDS = 1.0
"""A chunk at least this long that is not silent should say something: empty is a warning."""
SILENCE_RMS = 1e-3
"""RMS below which a chunk counts as silence (-60 dBFS): an empty transcript is then right."""


@dataclass
class InputItem:
    """One file to transcribe, with what its manifest line said (``task``, prompt fields)."""

    path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    root: Path | None = None  # the folder it was found in, for output names
    error: str | None = None  # known unusable before reading (bad manifest line)

    @property
    def key(self) -> str:
        return os.path.abspath(self.path)


def collect_inputs(inputs: Sequence[str | Path], root: str | Path | None = None) -> list[InputItem]:
    """Expand files, folders, lists and manifests into files, in order, without duplicates.

    A top-level path that does not exist, or a bad manifest line, becomes an item carrying an
    error (reported like an unreadable file); a folder without audio is an error at once. A
    path in a list or manifest that resolves outside ``root`` (default: that list's folder)
    raises :class:`PathOutsideRootError`; paths given directly are the user's own choice.
    """
    items: list[InputItem] = []
    for spec in inputs:
        path = Path(spec).expanduser()
        if path.is_dir():
            files = find_audio(path)
            if not files:
                raise FileNotFoundError(
                    f"{path}: no audio files (looked for {' '.join(AUDIO_EXTENSIONS)})"
                )
            items += [InputItem(f, root=path) for f in files]
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            items += _list_items(path, root)
        elif path.is_file() and path.suffix.lower() == ".jsonl":
            items += _manifest_items(path, root)
        elif path.exists():
            items.append(InputItem(path))
        else:
            items.append(InputItem(path, error=f"{path}: no such file or folder"))
    unique: dict[str, InputItem] = {}
    for item in items:
        unique.setdefault(item.key, item)
    return list(unique.values())


def _list_items(listing: Path, root: str | Path | None) -> list[InputItem]:
    lines = enumerate(listing.read_text(encoding="utf-8").splitlines(), start=1)
    names = [(i, ln.strip()) for i, ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    return [
        InputItem(resolve_path(listing.parent, n, root, source=listing, line=i, field="path"))
        for i, n in names
    ]


def _manifest_items(manifest: Path, root: str | Path | None) -> list[InputItem]:
    items = []
    for lineno, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exn:
            obj = exn
        audio = obj.get("audio") if isinstance(obj, dict) else None
        if not isinstance(audio, str) or not audio:
            why = f"invalid JSON ({obj.msg})" if isinstance(obj, Exception) else "no 'audio' path"
            where = f"{manifest}:{lineno}"
            items.append(InputItem(Path(where), error=f"{where}: {why}"))
            continue
        assert isinstance(obj, dict)
        at = {"source": manifest, "line": lineno}
        path = resolve_path(manifest.parent, audio, root, field="audio", **at)
        if isinstance(obj.get("video"), str) and obj["video"]:
            video = resolve_path(manifest.parent, obj["video"], root, field="video", **at)
            obj["_video_path"] = str(video)
        items.append(InputItem(path, meta=obj))
    return items


# -- the ledger and per-file outputs ---------------------------------------------------------


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


def _read_clip(item: InputItem) -> tuple[Any, float]:
    """The mouth clip of an input: its manifest's ``video``, else the file itself if a video."""
    fps = item.meta.get("video_fps")
    name = item.meta.get("video")
    if name:
        return read_video(Path(item.meta["_video_path"]), fps)
    if item.path.suffix.lower() in VIDEO_EXTENSIONS:
        return read_video(item.path, fps)
    raise ValueError(f"{item.path}: the model reads video but this input has none")


def _output_name(item: InputItem, taken: set[str]) -> str:
    """Output base name: path relative to its input folder (else the file stem); a clash gets a
    short hash of the absolute path, so names never depend on processing order."""
    rel = item.path.relative_to(item.root) if item.root else Path(item.path.name)
    name = rel.with_suffix("").as_posix()
    if name in taken:
        name = f"{name}-{hashlib.sha1(item.key.encode()).hexdigest()[:8]}"
    taken.add(name)
    return name


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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
        _write_atomic(out_dir / rel, writers[fmt](record))
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


# -- transcription ---------------------------------------------------------------------------


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


@dataclass
class _Pending:
    item: InputItem
    name: str
    chunks: list[Chunk] = field(default_factory=list)
    duration: float = 0.0
    error: str | None = None
    skipped: str | None = None  # why it is not decoded (too short)
    empty_chunks: int = 0  # chunks with sound whose transcript came back empty
    wave: Any = None  # the decoded waveform while the file waits for its round
    video: Any = None  # its frames, for models that read video
    video_fps: float = 25.0
    text: str = ""
    spans: list[dict[str, Any]] = field(default_factory=list)


def transcribe(
    model: str | Path | SpeechLLM,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    options: DecodeOptions | None = None,
    chunk_seconds: float | None = None,
    overlap_seconds: float = 2.0,
    formats: Sequence[str] = FORMATS,
    rate: int | None = None,
    task: str | None = None,
    overwrite: bool = False,
    retry_errors: bool = False,
    progress: bool = True,
    root: str | Path | None = None,
) -> TranscribeSummary:
    """Transcribe ``inputs`` into ``out_dir`` (ledger ``transcripts.jsonl`` plus one
    ``.txt``/``.srt``/``.vtt`` per file); see the module docstring for resuming. ``root``: the
    folder list and manifest paths must stay inside (default: each list's own folder).
    ``chunk_seconds`` None: the encoder's window, at most 30 s."""
    options = options or DecodeOptions()
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ValueError(f"unknown output format(s) {bad}; choose from {FORMATS}")
    out = Path(out_dir)
    items = collect_inputs(inputs, root)
    speech_llm = load_model(model, options.device, options.dtype, options.llm).model
    if rate is not None:
        select_rates(speech_llm, [rate])  # raises for a rate the model lacks
        use_rate(speech_llm, rate)
    features = features_for(speech_llm)
    task = task or default_task(speech_llm)
    speech_llm.modalities_of(task)  # a task the model cannot serve fails before any work
    reads_video = "video" in speech_llm.modalities
    window = window_seconds(speech_llm)
    if chunk_seconds is None:
        chunk_seconds = min(DEFAULT_CHUNK_SECONDS, window or DEFAULT_CHUNK_SECONDS)
    if window is not None and chunk_seconds > window:
        raise ValueError(
            f"chunk_seconds={chunk_seconds} exceeds the encoder window of {window:g} s"
        )
    chunk_bounds(1, features.sample_rate, chunk_seconds, overlap_seconds)  # bad values fail here

    out.mkdir(parents=True, exist_ok=True)
    ledger_path = out / LEDGER
    if overwrite and ledger_path.exists():
        ledger_path.unlink()
    done = read_ledger(ledger_path)
    if retry_errors and any(r.get("error") for r in done.values()):
        kept = [r for r in done.values() if not r.get("error")]
        _write_atomic(ledger_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
        done = {os.path.abspath(r["path"]): r for r in kept}
    taken = {n for r in done.values() for n in [r.get("name")] if n}
    todo = [it for it in items if it.key not in done]
    summary = TranscribeSummary(out, already_done=len(items) - len(todo))
    known = [audio_duration(it.path) if it.error is None else 0.0 for it in todo]
    bar = tqdm(
        total=round(sum(known), 1) if None not in known else None,
        unit=" audio-s",
        unit_scale=False,
        disable=not progress,
        desc="transcribe",
    )
    ledger = Ledger(ledger_path)
    start = time.perf_counter()
    buffer: list[_Pending] = []
    buffered_chunks = 0
    limit = 4 * (options.batch_size or 16)

    def flush() -> None:
        nonlocal buffered_chunks
        _decode_round(speech_llm, buffer, options, features, task, bar, overlap_seconds)
        for pending in buffer:
            _finish(pending, out, formats, ledger, summary)
        buffer.clear()
        buffered_chunks = 0

    try:
        for item in todo:
            pending = _Pending(item, _output_name(item, taken))
            if item.error is None:
                try:
                    wave = read_audio(item.path, features.sample_rate)
                    one_piece = False
                    if reads_video:
                        pending.video, pending.video_fps = _read_clip(item)
                        wave = with_video(
                            {"audio": wave}, pending.video, pending.video_fps, features.sample_rate
                        )["audio"]
                        one_piece = True
                    pending.duration = wave.numel() / features.sample_rate
                    pending.skipped = too_short(speech_llm, pending.duration)
                    if pending.skipped is not None:
                        buffer.append(pending)
                        continue
                    if one_piece and window is not None and pending.duration > window:
                        raise ValueError(
                            f"the clip is {pending.duration:.1f} s, longer than the encoder's "
                            f"{window:g} s window, and clips with video are not chunked"
                        )
                    pending.chunks = chunk_bounds(
                        wave.numel(),
                        features.sample_rate,
                        # a clip is decoded whole: one chunk covering all of it
                        pending.duration + overlap_seconds + 1.0 if one_piece else chunk_seconds,
                        overlap_seconds,
                    )
                    pending.wave = wave
                    buffered_chunks += len(pending.chunks)
                except Exception as exn:  # any decoder failure: record it and go on
                    pending.error = str(exn)
            else:
                pending.error = item.error
            buffer.append(pending)
            if buffered_chunks >= limit:
                flush()
        if buffer:
            flush()
    finally:
        ledger.close()
        bar.close()
        summary.wall_seconds = time.perf_counter() - start
    return summary


def _decode_round(
    model: SpeechLLM,
    buffer: list[_Pending],
    options: DecodeOptions,
    features: Any,
    task: str,
    bar: Any,
    overlap_seconds: float,
) -> None:
    """Decode every chunk of the buffered files together (length-sorted), then join per file
    and count the chunks with sound that came back empty."""
    files = [p for p in buffer if p.error is None and p.skipped is None]
    samples = []
    for pending in files:
        meta = {k: v for k, v in pending.item.meta.items() if k not in ("audio", "_video_path")}
        sample = {
            "__key__": pending.name,
            "audio": pending.wave,
            "text": "",
            "task": str(meta.get("task") or task),
            "duration": pending.duration,
            "meta": meta,
        }
        if pending.video is not None:
            sample["video"] = pending.video
            sample["video_fps"] = pending.video_fps
        samples.append(sample)

    def advance(pieces: list[dict[str, Any]], _texts: list[str]) -> None:
        bar.update(round(sum(p["new_seconds"] for p in pieces), 2))

    if samples:
        decoded = decode_chunked(
            model,
            samples,
            [p.chunks for p in files],
            options,
            features,
            overlap_seconds,
            on_batch=advance,
        )
        for pending, result in zip(files, decoded, strict=True):
            pending.text, pending.spans = result.text, result.spans
            pending.empty_chunks = sum(
                not text.strip() and _has_sound(pending.wave, chunk)
                for text, chunk in zip(result.chunk_texts, pending.chunks, strict=True)
            )
    for pending in buffer:
        pending.wave = pending.video = None


def _has_sound(wave: Any, chunk: Chunk) -> bool:
    """Whether a chunk is long enough to hold speech and not silent (see SILENCE_RMS)."""
    if chunk.end - chunk.start < EMPTY_CHUNK_SECONDS:
        return False
    piece = wave[chunk.first : chunk.last].float()
    return bool(piece.numel()) and float(piece.square().mean().sqrt()) >= SILENCE_RMS


def _finish(
    pending: _Pending,
    out: Path,
    formats: Sequence[str],
    ledger: Ledger,
    summary: TranscribeSummary,
) -> None:
    record: dict[str, Any] = {
        "path": pending.item.key,
        "name": pending.name,
        "text": None,
        "duration": None,
        "chunks": [],
        "error": pending.error,
    }
    for key in ("id", "key"):
        if key in pending.item.meta:
            record[key] = pending.item.meta[key]
    if pending.error is None and pending.skipped is not None:
        record.update(text="", duration=round(pending.duration, 3), skipped=pending.skipped)
        record["outputs"] = write_file_outputs(out, pending.name, record, formats)
        log.warning("not transcribing %s: %s", pending.item.path, pending.skipped)
        summary.skipped.append((str(pending.item.path), pending.skipped))
    elif pending.error is None:
        record.update(
            text=pending.text,
            duration=round(pending.duration, 3),
            chunks=pending.spans,
            empty_chunks=pending.empty_chunks,
        )
        if pending.empty_chunks:
            record["warning"] = (
                f"{pending.empty_chunks} of {len(pending.chunks)} chunk(s) came back empty "
                f"although they hold sound (at least {EMPTY_CHUNK_SECONDS:g} s, not silent)"
            )
            log.warning("%s: %s", pending.item.path, record["warning"])
            summary.empty.append(
                (str(pending.item.path), pending.empty_chunks, len(pending.chunks))
            )
        record["outputs"] = write_file_outputs(out, pending.name, record, formats)
        summary.transcribed += 1
        summary.audio_seconds += pending.duration
    else:
        log.warning("cannot transcribe %s: %s", pending.item.path, pending.error)
        summary.failed.append((str(pending.item.path), pending.error))
    ledger.append(record)


# -- command line ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmalign transcribe",
        description=(
            "Transcribe audio files, folders (recursive), lists (.txt/.lst) or JSONL manifests "
            "with a checkpoint or export. Long files are cut into overlapping chunks. Writes "
            f"{LEDGER} (path, text, duration, chunk spans, error) and per-file .txt/.srt/.vtt "
            "to --out; a rerun skips files already done."
        ),
    )
    parser.add_argument("model", help="a .ckpt from `mmalign fit` or an `mmalign export` folder")
    parser.add_argument("inputs", nargs="+", help="audio files, folders, .txt/.lst lists, .jsonl")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--formats", nargs="*", default=list(FORMATS), choices=FORMATS, help="per-file outputs"
    )
    parser.add_argument(
        "--chunk-seconds",
        type=float,
        help="window per chunk (default: the encoder's window, at most 30 s)",
    )
    parser.add_argument("--overlap-seconds", type=float, default=2.0, help="overlap between chunks")
    parser.add_argument("--rate", type=int, help="compression rate (multi-rate models)")
    parser.add_argument(
        "--task",
        help="task unless a manifest says (default: asr, vsr or avsr by what the model reads)",
    )
    parser.add_argument("--overwrite", action="store_true", help="redo everything")
    parser.add_argument("--retry-errors", action="store_true", help="redo files that failed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--root",
        help="folder that paths in lists and manifests must resolve inside (after .. and "
        "symlinks); default: each list's own folder; / allows any",
    )
    add_decoding_arguments(parser, batch_size=8)
    return parser


def main(argv: list[str] | None = None) -> TranscribeSummary:
    """``mmalign transcribe`` entry point; exits non-zero only when nothing could be done."""
    args = build_parser().parse_args(argv)
    try:
        summary = transcribe(
            args.model,
            args.inputs,
            args.out,
            options=decode_options(args),
            chunk_seconds=args.chunk_seconds,
            overlap_seconds=args.overlap_seconds,
            formats=args.formats,
            rate=args.rate,
            task=args.task,
            overwrite=args.overwrite,
            retry_errors=args.retry_errors,
            progress=not args.no_progress,
            root=args.root,
        )
    except (FileNotFoundError, ValueError, KeyError) as exn:
        raise SystemExit(f"mmalign transcribe: {exn}") from exn
    print(summary.text())
    if summary.failed and summary.transcribed == 0 and summary.already_done == 0:
        raise SystemExit(1)
    return summary
