"""Which utterances ``mmalign evaluate`` decodes whole, cuts into chunks, or skips.

An utterance longer than the encoder's window (Whisper: 30 s) is cut into chunks and decoded as
``mmalign transcribe`` decodes a long file (:func:`mmalign.inference.decode.decode_chunked`), its
hypothesis being the joined chunk transcripts; one that carries video is skipped instead (clips
are not chunked), and so is one shorter than the audio of one LLM token
(:func:`mmalign.inference.decode.min_seconds`). Each is named with its key, duration and reason
in ``metrics.json`` (``data.lengths``) and the report.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from mmalign.inference.chunking import Chunk, chunk_bounds
from mmalign.inference.decode import too_short, window_seconds
from mmalign.model import SpeechLLM

log = logging.getLogger(__name__)


def chunk_settings(
    window: float | None, chunk_seconds: float | None, overlap_seconds: float | None
) -> tuple[float | None, float]:
    """Chunk length and overlap for long utterances: by default the encoder's window (at most
    30 s, like ``transcribe``) and a tenth of it (at most 2 s); None chunk when nothing bounds
    the length. Values the window cannot take are refused."""
    if chunk_seconds is None:
        chunk_seconds = None if window is None else min(30.0, window)
    elif window is not None and chunk_seconds > window:
        raise ValueError(
            f"chunk_seconds={chunk_seconds} exceeds the encoder window of {window:g} s"
        )
    if chunk_seconds is None:
        return None, 0.0
    if overlap_seconds is None:
        overlap_seconds = min(2.0, chunk_seconds / 10)
    chunk_bounds(1, 16000, chunk_seconds, overlap_seconds)  # bad values fail here
    return chunk_seconds, overlap_seconds


def apply_length_policy(
    model: SpeechLLM, samples: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The samples to decode, and one ``{key, duration, reason}`` for each left out: shorter
    than one LLM token's audio, or longer than the encoder's window with video that the model
    reads (a clip is decoded whole). Other long samples stay: they are chunked."""
    window = window_seconds(model)
    video = "video" in model.modalities
    kept, dropped = [], []
    for s in samples:
        duration = float(s["duration"])
        reason = too_short(model, duration)
        if reason is None and window is not None and duration > window and video and "video" in s:
            reason = (
                f"too long: {duration:.1f} s > the encoder's {window:g} s window, and clips "
                "with video are not chunked"
            )
        if reason is None:
            kept.append(s)
        else:
            log.warning("skipping %s (%.3f s): %s", s["__key__"], duration, reason)
            dropped.append(
                {"key": str(s["__key__"]), "duration": round(duration, 3), "reason": reason}
            )
    return kept, dropped


def sample_chunks(
    samples: Sequence[dict[str, Any]],
    sample_rate: int,
    chunk_seconds: float | None,
    overlap_seconds: float,
    whole_clips: bool = False,
) -> list[list[Chunk]]:
    """Chunks of each sample: one covering it all unless it is longer than ``chunk_seconds``
    (or, with ``whole_clips``, a model that reads video, carries a clip: decoded whole)."""
    out = []
    for s in samples:
        n = int(s["audio"].numel())
        long = chunk_seconds is not None and n > round(chunk_seconds * sample_rate)
        if not long or (whole_clips and "video" in s):
            out.append([Chunk(0, n, 0.0, n / sample_rate)])
        else:
            assert chunk_seconds is not None
            out.append(chunk_bounds(n, sample_rate, chunk_seconds, overlap_seconds))
    return out
