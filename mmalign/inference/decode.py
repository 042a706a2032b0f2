"""Shared by ``evaluate`` and ``transcribe``: load a model, pick its compression rate, and decode
waveforms in length-sorted batches.

Batching sorts utterances by duration (longest first, so memory trouble shows up at once) and cuts
the sorted run with :func:`mmalign.data.batching.pack_sorted`, the same duration rule training
uses: a batch's padded audio (longest x count) stays within ``batch_seconds`` and its size within
``batch_size``. Sorting keeps padding, and so wasted encoder and LLM work, small; it is where
batched greedy decoding gets most of its speed over one-at-a-time decoding.

Multi-rate projectors (Matryoshka) expose ``rates`` (list[int]) and ``set_rate(rate)``; a plain
projector has one ``rate``. :func:`select_rates` checks a requested list against either.
"""

from __future__ import annotations

import argparse
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mmalign.assets import sha256_file
from mmalign.data.batching import pack_sorted
from mmalign.data.collate import collate
from mmalign.data.features import WhisperFeatures
from mmalign.dtypes import DTYPES, torch_dtype
from mmalign.inference.chunking import Chunk, join_chunks
from mmalign.model import SpeechLLM


@dataclass
class LoadedModel:
    """A model ready to decode, with where it came from (for reports)."""

    model: SpeechLLM
    path: Path | None  # None for a model passed in memory
    kind: str  # "checkpoint", "export" or "in-memory"
    sha256: str | None


def model_sha256(path: str | Path) -> str:
    """sha256 of a checkpoint file; for an export directory, of its file list and contents
    (each ``relative/path`` and its own sha256, in path order), so any change shows."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path, use_cache=False)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        digest.update(f"{rel}\0{sha256_file(file, use_cache=False)}\n".encode())
    return digest.hexdigest()


def load_model(
    path: str | Path | SpeechLLM,
    device: str = "cpu",
    dtype: str = "float32",
    llm: str | None = None,
) -> LoadedModel:
    """Load a ``.ckpt`` from ``mmalign fit`` or a directory from ``mmalign export`` (or take a
    SpeechLLM already in memory), in eval mode on ``device`` with weights cast to ``dtype``."""
    from mmalign.inference.export import CONFIG_NAME, load_checkpoint, load_exported

    if isinstance(path, SpeechLLM):
        if llm is not None:
            raise ValueError("another LLM (llm=...) can only be put under a loaded checkpoint")
        model = path.to(device=device, dtype=torch_dtype(dtype)).eval()
        return LoadedModel(model, None, "in-memory", None)
    path = Path(path).expanduser()
    torch_dtype(dtype)  # a bad name fails before the slow load
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{path} is a folder without {CONFIG_NAME}: not an export")
        model, kind = load_exported(path, llm=llm), "export"
    elif path.is_file():
        model, kind = load_checkpoint(path, llm=llm), "checkpoint"
    else:
        raise FileNotFoundError(f"model {path} not found (expected a .ckpt or an export folder)")
    model = model.to(device=device, dtype=torch_dtype(dtype)).eval()
    return LoadedModel(model, path, kind, model_sha256(path))


def available_rates(model: SpeechLLM) -> list[int] | None:
    """Rates a multi-rate projector can switch between (``rates`` + ``set_rate``), else None."""
    projector = model.projector
    rates = getattr(projector, "rates", None)
    if rates is None or not callable(getattr(projector, "set_rate", None)):
        return None
    return [int(r) for r in rates]


def select_rates(model: SpeechLLM, requested: Sequence[int] | None = None) -> list[int | None]:
    """The compression rates to decode at: ``requested`` (checked) or all the model has.

    A single-rate projector decodes at its own ``rate`` (None when it has no such attribute);
    asking it for another rate is an error rather than a silent no-op.
    """
    multi = available_rates(model)
    wanted = list(dict.fromkeys(int(r) for r in requested)) if requested else []
    if multi is not None:
        bad = [r for r in wanted if r not in multi]
        if bad:
            raise ValueError(f"rate(s) {bad} not available: the projector's rates are {multi}")
        return list(wanted or multi)
    single = getattr(model.projector, "rate", None)
    bad = [r for r in wanted if r != single]
    if bad:
        raise ValueError(
            f"{type(model.projector).__name__} has a single compression rate ({single}) and "
            f"cannot decode at rate(s) {bad}; only multi-rate projectors (with `rates` and "
            "`set_rate`) can switch"
        )
    return [single]


def use_rate(model: SpeechLLM, rate: int | None) -> None:
    """Switch a multi-rate projector to ``rate``; a no-op for single-rate projectors."""
    if rate is not None and available_rates(model) is not None:
        model.projector.set_rate(int(rate))


def needs_waveform(model: SpeechLLM) -> bool:
    """True when an encoder reads raw waveforms (batch key ``audio``), e.g. WavLM."""
    encoder = model.encoder
    keys = {getattr(encoder, "input_key", None), *getattr(encoder, "input_keys", ())}
    return "audio" in keys


def default_task(model: SpeechLLM) -> str:
    """The task a model serves with every input it reads: ``asr``, ``vsr`` or ``avsr``."""
    return model.default_task


def features_for(model: SpeechLLM, sample_rate: int = 16000) -> WhisperFeatures:
    """Log-mel extractor matching the encoder's mel bins (80 unless it says otherwise)."""
    n_mels = int(getattr(model.encoder, "n_mels", 80))
    return WhisperFeatures(n_mels=n_mels, sample_rate=sample_rate)


def window_seconds(model: SpeechLLM) -> float | None:
    """Longest audio the model's encoder takes in one piece (Whisper: 30 s); None: no window.
    Longer audio must be chunked (or, for clips with video, skipped)."""
    return getattr(model.encoder, "max_seconds", None)


def frames_per_token(projector: Any) -> int:
    """Encoder frames behind one LLM token: the compression rate (the largest of a multi-rate
    projector's, so one length rule holds at every rate), a Q-Former's window, else 1."""
    rates = getattr(projector, "rates", None)
    if rates:
        return max(int(r) for r in rates)
    for name in ("window", "rate"):
        value = getattr(projector, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1


def min_seconds(model: SpeechLLM) -> float:
    """Shortest audio worth decoding: what one LLM token carries (:func:`frames_per_token` at
    the encoder's frame rate), and at least a waveform encoder's receptive field. A shorter
    clip still becomes one token, but one made mostly of padding: its transcript is noise."""
    encoder = model.encoder
    seconds = frames_per_token(model.projector) / float(encoder.frame_rate)
    for part in (encoder, getattr(encoder, "first", None), getattr(encoder, "second", None)):
        field = getattr(part, "min_samples", None)  # WavLM's receptive field, in samples
        if isinstance(field, int) and field > 0:
            seconds = max(seconds, field / float(getattr(part, "sample_rate", 16000)))
    return seconds


def too_short(model: SpeechLLM, duration: float) -> str | None:
    """Why a clip of ``duration`` seconds is not decoded, or None when it is long enough."""
    least = min_seconds(model)
    if duration >= least:
        return None
    frames = frames_per_token(model.projector)
    return (
        f"too short: {duration:.3f} s < {least:.3f} s, the audio of one LLM token ({frames} "
        f"encoder frames at {float(model.encoder.frame_rate):g}/s)"
    )


@dataclass
class DecodeOptions:
    """Decoding settings shared by ``evaluate`` and ``transcribe`` (recorded in reports).

    ``max_new_tokens`` None lets :meth:`SpeechLLM.generate` derive it from each batch's longest
    duration. ``num_beams`` 1 is greedy, which is deterministic.
    """

    num_beams: int = 1
    max_new_tokens: int | None = None
    batch_seconds: float = 240.0
    batch_size: int | None = 16
    device: str = "cpu"
    dtype: str = "float32"
    video_crop: int | None = 88
    llm: str | None = None  # another LLM of the same architecture under the trained parts

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be at least 1, got {self.num_beams}")
        if self.batch_seconds <= 0:
            raise ValueError(f"batch_seconds must be positive, got {self.batch_seconds}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        torch_dtype(self.dtype)  # names the accepted values on error

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "greedy": self.num_beams == 1}


def to_device(batch: dict[str, Any], device: str | torch.device) -> dict[str, Any]:
    """Move the batch's tensors (features, waveforms, lengths) to ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def length_sorted_batches(
    samples: Sequence[dict[str, Any]], batch_seconds: float, batch_size: int | None
) -> list[list[int]]:
    """Indices of ``samples`` in batches, longest first, cut by padded duration and count."""
    order = sorted(range(len(samples)), key=lambda i: -float(samples[i]["duration"]))
    items = [{"i": i, "duration": float(samples[i]["duration"])} for i in order]
    seconds = batch_seconds if math.isfinite(batch_seconds) else float("inf")
    return [[it["i"] for it in b] for b in pack_sorted(items, seconds, batch_size)]


@torch.no_grad()
def decode_samples(
    model: SpeechLLM,
    samples: Sequence[dict[str, Any]],
    options: DecodeOptions,
    features: WhisperFeatures | None = None,
    on_batch: Callable[[list[int], list[str]], None] | None = None,
) -> list[str]:
    """Hypotheses for ``samples`` (dicts as :func:`mmalign.data.decoding.decode_sample` returns:
    ``audio`` 1-D waveform, ``text``, ``task``, ``duration``, ``meta``), in input order.

    ``on_batch(indices, texts)`` is called after each batch (progress bars, streaming output).
    """
    if not samples:
        return []
    features = features or features_for(model)
    keep_waveform = needs_waveform(model)
    out: list[str | None] = [None] * len(samples)
    for indices in length_sorted_batches(samples, options.batch_seconds, options.batch_size):
        batch = collate(
            [samples[i] for i in indices],
            features,
            keep_waveform=keep_waveform,
            video_crop=options.video_crop,
        )
        texts = model.generate(
            to_device(batch, options.device),
            max_new_tokens=options.max_new_tokens,
            num_beams=options.num_beams,
        )
        for i, text in zip(indices, texts, strict=True):
            out[i] = text
        if on_batch is not None:
            on_batch(indices, texts)
    return [t or "" for t in out]


@dataclass
class ChunkedText:
    """A sample decoded in chunks: the joined ``text``, one ``{start, end, text}`` span per
    chunk (what it added), and each chunk's own transcript as decoded (``chunk_texts``)."""

    text: str
    spans: list[dict[str, Any]]
    chunk_texts: list[str]


def decode_chunked(
    model: SpeechLLM,
    samples: Sequence[dict[str, Any]],
    chunks: Sequence[Sequence[Chunk]],
    options: DecodeOptions,
    features: WhisperFeatures | None = None,
    overlap_seconds: float = 0.0,
    on_batch: Callable[[list[dict[str, Any]], list[str]], None] | None = None,
) -> list[ChunkedText]:
    """Decode each sample cut into its ``chunks`` (from :func:`chunking.chunk_bounds`): the
    chunks of all samples go through :func:`decode_samples` together (length-sorted batches),
    then each sample's chunk texts are joined without repeating the overlap. ``transcribe`` and
    ``evaluate`` both decode this way, so a long utterance is handled alike in each.

    A chunk shorter than :func:`min_seconds` (a last sliver past the previous chunk) is not
    decoded and counts as empty. A sample cut into several chunks loses its ``video``: a clip is
    decoded whole or not at all (callers skip long clips of models that read video).

    ``on_batch(pieces, texts)`` gets the finished chunks, each a sample dict with ``owner``
    (index into ``samples``), ``chunk``, ``chunks`` (how many its owner has) and
    ``new_seconds`` (audio not in the previous chunk).
    """
    if len(samples) != len(chunks):
        raise ValueError(f"{len(samples)} samples but {len(chunks)} chunk lists")
    least = min_seconds(model)
    pieces: list[dict[str, Any]] = []
    for owner, (sample, bounds) in enumerate(zip(samples, chunks, strict=True)):
        for i, chunk in enumerate(bounds):
            if chunk.end - chunk.start < least and len(bounds) > 1:
                continue
            key = sample.get("__key__")
            whole = (
                sample
                if len(bounds) == 1
                else {k: v for k, v in sample.items() if k not in ("video", "video_fps")}
            )
            pieces.append(
                {
                    **whole,
                    "__key__": key if len(bounds) == 1 else f"{key}#{i}",
                    "audio": sample["audio"][chunk.first : chunk.last],
                    "duration": (
                        float(sample.get("duration", chunk.end - chunk.start))
                        if len(bounds) == 1
                        else chunk.end - chunk.start
                    ),
                    "owner": owner,
                    "chunk": i,
                    "chunks": len(bounds),
                    "new_seconds": chunk.end - (bounds[i - 1].end if i else chunk.start),
                }
            )

    def report(indices: list[int], texts: list[str]) -> None:
        if on_batch is not None:
            on_batch([pieces[i] for i in indices], texts)

    texts = decode_samples(model, pieces, options, features, on_batch=report)
    per: list[list[str]] = [[""] * len(bounds) for bounds in chunks]
    for piece, text in zip(pieces, texts, strict=True):
        per[piece["owner"]][piece["chunk"]] = text
    out = []
    for mine, bounds in zip(per, chunks, strict=True):
        text, spans = join_chunks(mine, list(bounds), overlap_seconds)
        out.append(ChunkedText(text, spans, mine))
    return out


def add_decoding_arguments(parser: argparse.ArgumentParser, batch_size: int) -> None:
    """Decoding flags shared with ``mmalign transcribe``."""
    parser.add_argument("--num-beams", type=int, default=1, help="1 = greedy (deterministic)")
    parser.add_argument(
        "--max-new-tokens", type=int, help="decoding cap (default: from each batch's duration)"
    )
    parser.add_argument(
        "--batch-seconds", type=float, default=240.0, help="padded audio seconds per batch"
    )
    parser.add_argument("--batch-size", type=int, default=batch_size, help="utterances per batch")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device"
    )
    parser.add_argument(
        "--dtype", default="float32", choices=sorted(DTYPES), help="weights' floating-point type"
    )
    parser.add_argument(
        "--video-crop", type=int, default=88, help="centre crop of video frames (as in training)"
    )
    parser.add_argument(
        "--llm",
        help="decode with this LLM instead of the trained one (same architecture and width, "
        "e.g. the base model of an instruct model): adapter transfer",
    )


def decode_options(args: argparse.Namespace) -> DecodeOptions:
    return DecodeOptions(
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
        batch_seconds=args.batch_seconds,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        video_crop=args.video_crop,
        llm=args.llm,
    )
