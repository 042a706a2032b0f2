"""SRT and WebVTT from chunk spans parse back with the srt and webvtt-py libraries."""

from __future__ import annotations

import srt
import webvtt

from mmalign.inference.subtitles import cues, to_srt, to_vtt

SPANS = [
    {
        "start": 0.0,
        "end": 30.0,
        "text": "the quick brown fox jumps over the lazy dog again and again",
    },
    {"start": 28.0, "end": 58.0, "text": "and then it slept"},
    {"start": 56.0, "end": 61.5, "text": ""},
]


def test_cues_do_not_overlap_and_skip_empty_chunks():
    out = cues(SPANS)
    assert [(s, e) for s, e, _ in out] == [(0.0, 29.0), (29.0, 57.0)]
    assert "\n" in out[0][2] and all(len(line) <= 42 for line in out[0][2].splitlines())


def test_srt_parses_back():
    subs = list(srt.parse(to_srt(SPANS)))
    assert [s.index for s in subs] == [1, 2]
    assert [(s.start.total_seconds(), s.end.total_seconds()) for s in subs] == [
        (0.0, 29.0),
        (29.0, 57.0),
    ]
    assert " ".join(subs[0].content.split()) == SPANS[0]["text"]


def test_vtt_parses_back():
    captions = list(webvtt.from_string(to_vtt(SPANS)))
    assert [(c.start, c.end) for c in captions] == [
        ("00:00:00.000", "00:00:29.000"),
        ("00:00:29.000", "00:00:57.000"),
    ]
    assert captions[1].text == "and then it slept"


def test_one_short_file_is_one_cue():
    spans = [{"start": 0.0, "end": 3.25, "text": "hello"}]
    (sub,) = srt.parse(to_srt(spans))
    assert sub.end.total_seconds() == 3.25 and sub.content == "hello"
    assert to_vtt([]).startswith("WEBVTT")
