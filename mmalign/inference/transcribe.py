"""``mmalign transcribe``: many audio files to text, JSONL, SRT and WebVTT, resumable.

Inputs (audio files, folders, lists and manifests) are listed by :mod:`mmalign.inference.inputs`.
Audio is read with soundfile, or torchaudio/torchcodec (ffmpeg) for what libsndfile lacks, then
down-mixed and resampled. Files longer than ``chunk_seconds`` are cut into overlapping chunks
(:mod:`mmalign.inference.chunking`), whose texts are joined without repeating the overlap;
``chunk_seconds`` defaults to the encoder's window (at most 30 s). A chunk of at least a second
that is not silent but comes back empty is counted: the file's ledger line has ``empty_chunks``
(and a ``warning``), and the final summary names it. A file shorter than the audio of one LLM
token (:func:`mmalign.inference.decode.min_seconds`) is not decoded: its line has ``skipped``
with the reason and an empty text.

Work goes in rounds: files are read until about ``4 x batch_size`` chunks are waiting, all those
chunks are decoded in length-sorted batches, then each finished file is written out, in input
order (:mod:`mmalign.inference.outputs`): first its ``.txt``/``.srt``/``.vtt`` (each
atomically), then its line in ``transcripts.jsonl``, flushed and synced. That JSONL is the
ledger: a rerun into the same ``--out`` skips every path it already lists, so an interrupted run
loses at most the round in flight and never writes a file twice (``--overwrite`` starts afresh;
``--retry-errors`` redoes the files that failed). A file that cannot be read gets a ledger line
with ``error`` set and a place in the final summary; the run goes on.

Models that read video (VSR/AVSR) take a mouth-region clip per input: a manifest's ``video``
column (``.npy`` uint8 ``T x H x W`` or a video file; ``video_fps`` optional), or the input file
itself when it is a video container (its audio track is the audio). The audio is cut or padded to
whole video frames and the clip is decoded in one piece (clips are not chunked, so a clip
longer than the encoder's window fails with that reason).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mmalign.atomic import atomic_write_text
from mmalign.data.media import audio_duration, read_audio, with_video
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
from mmalign.inference.inputs import InputItem, collect_inputs, read_clip
from mmalign.inference.outputs import (
    FORMATS,
    LEDGER,
    Ledger,
    TranscribeSummary,
    output_name,
    read_ledger,
    write_file_outputs,
)
from mmalign.model import SpeechLLM

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SECONDS = 30.0
EMPTY_CHUNK_SECONDS = 1.0
"""A chunk at least this long that is not silent should say something: empty is a warning."""
SILENCE_RMS = 1e-3
"""RMS below which a chunk counts as silence (-60 dBFS): an empty transcript is then right."""


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
        atomic_write_text(
            ledger_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
        )
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
            pending = _Pending(item, output_name(item, taken))
            if item.error is None:
                try:
                    wave = read_audio(item.path, features.sample_rate)
                    one_piece = False
                    if reads_video:
                        pending.video, pending.video_fps = read_clip(item)
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
