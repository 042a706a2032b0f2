"""Long-audio chunking and seam merging, on constructed transcripts (pure functions)."""

from __future__ import annotations

import pytest

from mmalign.inference.chunking import (
    chunk_bounds,
    join_chunks,
    max_overlap_words,
    merge_overlap,
    overlap_length,
)

SR = 100  # samples per second, to keep numbers readable


def test_short_audio_is_one_chunk():
    (chunk,) = chunk_bounds(25 * SR, SR, 30, 2)
    assert (chunk.first, chunk.last, chunk.start, chunk.end) == (0, 2500, 0.0, 25.0)


def test_long_audio_overlapping_windows_cover_everything():
    chunks = chunk_bounds(70 * SR, SR, 30, 2)
    assert [(c.start, c.end) for c in chunks] == [(0, 30), (28, 58), (56, 70)]
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert a.end - b.start == pytest.approx(2)
    assert chunk_bounds(30 * SR, SR, 30, 2)[-1].end == 30  # exactly one window: one chunk
    assert len(chunk_bounds(30 * SR + 1, SR, 30, 2)) == 2


@pytest.mark.parametrize("chunk,overlap", [(0, 0), (10, 10), (10, -1)])
def test_bad_chunk_settings(chunk, overlap):
    with pytest.raises(ValueError):
        chunk_bounds(1000, SR, chunk, overlap)


def test_merge_drops_the_repeated_words():
    joined, added = merge_overlap("one two three four", "three four five six", 10)
    assert joined == "one two three four five six" and added == "five six"


def test_merge_ignores_case_and_punctuation():
    joined, added = merge_overlap("We met on Tuesday, at noon.", "at Noon we ate lunch", 10)
    assert joined == "We met on Tuesday, at noon. we ate lunch" and added == "we ate lunch"


def test_merge_takes_the_longest_overlap():
    assert overlap_length("a b a b", "a b a b c", 10) == 4
    assert overlap_length("x a b", "a b c", 10) == 2


def test_merge_is_bounded_by_the_overlap_duration():
    prev, nxt = "one two three four five", "one two three four five six"
    assert overlap_length(prev, nxt, 5) == 5
    assert overlap_length(prev, nxt, 4) == 0  # the repeat is longer than the overlap can hold
    assert max_overlap_words(2.0) == 10 and max_overlap_words(0) == 0


def test_no_overlap_concatenates():
    assert merge_overlap("hello there", "general kenobi", 10) == (
        "hello there general kenobi",
        "general kenobi",
    )
    assert merge_overlap("", "start", 10) == ("start", "start")
    assert merge_overlap("end", "", 10) == ("end", "")


def test_join_chunks_keeps_spans_whose_texts_rebuild_the_whole():
    chunks = chunk_bounds(70 * SR, SR, 30, 2)
    texts = [
        "the quick brown fox jumps",
        "Fox jumps over the lazy",
        "the lazy dog.",
    ]
    full, spans = join_chunks(texts, chunks, 2.0)
    assert full == "the quick brown fox jumps over the lazy dog."
    assert [(s["start"], s["end"]) for s in spans] == [(0, 30), (28, 58), (56, 70)]
    assert " ".join(s["text"] for s in spans if s["text"]) == full
    with pytest.raises(ValueError):
        join_chunks(texts[:2], chunks, 2.0)
