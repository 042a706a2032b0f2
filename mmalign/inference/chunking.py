"""Long audio: cut into overlapping windows the encoder can take, then join their texts.

Whisper encodes at most 30 s, so ``transcribe`` cuts longer files into ``chunk_seconds`` windows
that overlap by ``overlap_seconds``. Words spoken in an overlap are transcribed twice, once at
the end of a chunk and once at the start of the next; :func:`merge_overlap` removes the second
copy by finding the longest run of words that ends the previous text and starts the next one
(compared case- and punctuation-insensitively), searching no further than the number of words
that fit in the overlap. When nothing matches (a word cut in half at a chunk edge, say) the texts
are simply concatenated: a repeated word is a smaller error than a lost one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

WORDS_PER_SECOND = 5.0
"""Upper bound on speech rate (fast read speech is about 3 words/s), bounding the overlap search."""


@dataclass(frozen=True)
class Chunk:
    """One window of a file: sample range and its time span in seconds."""

    first: int
    last: int  # exclusive
    start: float
    end: float


def chunk_bounds(
    num_samples: int, sample_rate: int, chunk_seconds: float = 30.0, overlap_seconds: float = 2.0
) -> list[Chunk]:
    """Windows of ``chunk_seconds`` stepping by ``chunk_seconds - overlap_seconds`` that cover
    ``num_samples``; audio no longer than one window is a single chunk. The last chunk ends at
    the end of the audio (it may be shorter, but always extends past the previous one)."""
    if chunk_seconds <= 0:
        raise ValueError(f"chunk_seconds must be positive, got {chunk_seconds}")
    if not 0 <= overlap_seconds < chunk_seconds:
        raise ValueError(
            f"overlap_seconds must be in [0, chunk_seconds={chunk_seconds}), got {overlap_seconds}"
        )
    size = max(1, int(round(chunk_seconds * sample_rate)))
    step = max(1, size - int(round(overlap_seconds * sample_rate)))
    chunks: list[Chunk] = []
    first = 0
    while True:
        last = min(first + size, num_samples)
        chunks.append(Chunk(first, last, first / sample_rate, last / sample_rate))
        if last >= num_samples:
            return chunks
        first += step


def max_overlap_words(overlap_seconds: float, words_per_second: float = WORDS_PER_SECOND) -> int:
    """How many words an overlap of ``overlap_seconds`` can hold at most."""
    return max(0, math.ceil(overlap_seconds * words_per_second))


def _key(word: str) -> str:
    return "".join(ch for ch in word.casefold() if ch.isalnum())


def overlap_length(previous: str, following: str, max_words: int) -> int:
    """Number of leading words of ``following`` that repeat the last words of ``previous``:
    the longest such run of at most ``max_words`` words (0 when none), compared case- and
    punctuation-insensitively."""
    tail = [_key(w) for w in previous.split()[-max_words:]] if max_words > 0 else []
    head = [_key(w) for w in following.split()[:max_words]] if max_words > 0 else []
    for k in range(min(len(tail), len(head)), 0, -1):
        if tail[-k:] == head[:k] and any(tail[-k:]):
            return k
    return 0


def merge_overlap(previous: str, following: str, max_words: int) -> tuple[str, str]:
    """Join two chunk texts without repeating the words of their overlap.

    Returns the joined text and what ``following`` contributed to it (its words after the
    repeated run), which is the text kept for the second chunk's span.
    """
    k = overlap_length(previous, following, max_words)
    added = " ".join(following.split()[k:])
    joined = " ".join(part for part in (previous.strip(), added) if part)
    return joined, added


def join_chunks(
    texts: list[str], chunks: list[Chunk], overlap_seconds: float
) -> tuple[str, list[dict[str, float | str]]]:
    """Full text of a file from its chunk texts, and one ``{start, end, text}`` span per chunk
    (``text`` being what that chunk added, so the span texts joined give the full text)."""
    if len(texts) != len(chunks):
        raise ValueError(f"{len(texts)} texts for {len(chunks)} chunks")
    bound = max_overlap_words(overlap_seconds)
    full = ""
    spans: list[dict[str, float | str]] = []
    for i, (text, chunk) in enumerate(zip(texts, chunks, strict=True)):
        if i == 0:
            full, added = " ".join(text.split()), " ".join(text.split())
        else:
            full, added = merge_overlap(full, text, bound)
        spans.append({"start": round(chunk.start, 3), "end": round(chunk.end, 3), "text": added})
    return full, spans
