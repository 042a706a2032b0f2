"""SRT and WebVTT from transcribed chunk spans, written with the ``srt`` and ``webvtt-py`` packages.

Chunks overlap in time, cues must not, so each cue runs from the middle of the overlap with the
previous chunk to the middle of the overlap with the next. Chunks that added no words get no cue.
Cue text is wrapped at 42 characters a line, the usual subtitle width.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import srt
import webvtt
from webvtt.models import Timestamp

LINE_WIDTH = 42


def cues(spans: Sequence[dict[str, Any]]) -> list[tuple[float, float, str]]:
    """``(start, end, text)`` per non-empty span, with overlaps split at their midpoints."""
    out: list[tuple[float, float, str]] = []
    for i, span in enumerate(spans):
        start, end = float(span["start"]), float(span["end"])
        if i > 0:
            start = max(start, (start + float(spans[i - 1]["end"])) / 2)
        if i + 1 < len(spans):
            end = min(end, (end + float(spans[i + 1]["start"])) / 2)
        text = " ".join(str(span.get("text") or "").split())
        if text and end > start:
            out.append((start, end, "\n".join(textwrap.wrap(text, LINE_WIDTH))))
    return out


def to_srt(spans: Sequence[dict[str, Any]]) -> str:
    """SubRip text for ``spans`` (``[{start, end, text}]``, seconds)."""
    subs = [
        srt.Subtitle(index=i, start=timedelta(seconds=s), end=timedelta(seconds=e), content=t)
        for i, (s, e, t) in enumerate(cues(spans), start=1)
    ]
    return srt.compose(subs)


def to_vtt(spans: Sequence[dict[str, Any]]) -> str:
    """WebVTT text for ``spans`` (``[{start, end, text}]``, seconds)."""
    captions = [
        webvtt.Caption(str(Timestamp.from_seconds(s)), str(Timestamp.from_seconds(e)), t)
        for s, e, t in cues(spans)
    ]
    return webvtt.WebVTT(captions=captions).content
