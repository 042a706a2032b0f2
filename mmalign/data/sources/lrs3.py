"""LRS3 (and LRS2): ``pretrain``/``trainval``/``test`` (LRS2: ``main``) of ``<speaker>/<id>.mp4``
with ``<id>.txt`` beside each: a ``Text:  ...`` header, then ``WORD START END ASDSCORE`` and one
timed word per line.

``split`` names the folders to read (comma-separated: ``pretrain,trainval`` is LRS3's training
set); a root holding several needs it, a split folder itself does not. The audio is the video's
own track; the text is the header's, kept as the corpus writes it (upper case: the index names
the ``english`` normaliser). ``pretrain`` utterances are cut at word boundaries into segments
that each end less than ``max_seconds`` after they start, as auto-avsr's preparation does (a
segment starts at its first word, the first at 0; frame indices ``int(t * 25)``); one that fits
stays whole, with the header's text.

``crops`` says where the mouth video comes from:

* a folder of mouth-ROI mp4s laid out like the corpus, as auto-avsr's preprocessing writes
  them (``<crops>/<split>/<speaker>/<id>.mp4``, ``pretrain`` segments ``<id>_<NN>.mp4``, already
  trimmed; run it with ``--seg-duration`` equal to ``max_seconds``): used as they are;
* ``detect``: cut here by a face-landmark detector (:mod:`mmalign.data.mouth`): 96 x 96
  grayscale, the boxes per frame and the faceless frames counted in the sample JSON;
* ``none``: audio only.

Entries: ``{"audio", "video", "text", "key" (``<split>/<speaker>/<id>[_<NN>]``), "speaker",
"split", and for a segment "offset"/"duration" (seconds, whole frames)}``. A transcript
without its mp4 or mouth crop, without a ``Text:`` header, or with a bad word line is skipped
with its file and line.
"""

from __future__ import annotations

from pathlib import Path

from mmalign.data.mouth import MouthCrops, detector_class
from mmalign.data.sources import Entry, Imported
from mmalign.data.video import DEFAULT_VIDEO_FPS

SPLITS = ("pretrain", "trainval", "test", "main")
FPS = DEFAULT_VIDEO_FPS  # LRS2/LRS3 are 25 fps; segment bounds are counted in its frames
WORDS = "WORD START END ASDSCORE"


def _split_folders(folder: Path) -> dict[str, Path]:
    if folder.name in SPLITS and any(folder.glob("*/*.txt")):
        return {folder.name: folder}
    return {s: folder / s for s in SPLITS if any((folder / s).glob("*/*.txt"))}


def is_lrs3(folder: Path) -> bool:
    """Split folders of ``speaker/id.txt`` transcripts with a ``Text:`` header."""
    for split in _split_folders(folder).values():
        first = next(split.glob("*/*.txt"))
        with open(first, encoding="utf-8", errors="replace") as fh:
            return fh.readline().startswith("Text:")
    return False


def _transcript(path: Path, result: Imported) -> tuple[str, list[tuple[str, float, float]]] | None:
    """The header text and the timed words of one transcript, or None (skipped)."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    if not lines or not lines[0].startswith("Text:"):
        result.skip(path, 1, "no 'Text:' header")
        return None
    text = lines[0].removeprefix("Text:").strip()
    if not text or "\ufffd" in text:
        result.skip(path, 1, "empty or invalid UTF-8 text")
        return None
    words, timed = [], False
    for number, line in enumerate(lines[1:], start=2):
        if line.strip() == WORDS:
            timed = True
        elif timed and line.strip():
            parts = line.split()
            try:
                word, start, end = parts[0], float(parts[1]), float(parts[2])
            except (IndexError, ValueError):
                result.skip(path, number, f"bad word line {line.strip()!r} (expected {WORDS})")
                return None
            words.append((word, start, end))
    return text, words


def segments(words: list[tuple[str, float, float]], cap: float) -> list[tuple[str, float, float]]:
    """``(text, start, end)`` runs of words, each ending less than ``cap`` seconds after its
    start (the first starting at 0, the others at their first word)."""
    runs: list[tuple[str, float, float]] = []
    stack: list[str] = []
    begin = last = 0.0
    for word, start, end in words:
        if stack and end >= begin + cap:
            runs.append((" ".join(stack), begin, last))
            stack, begin = [], start
        stack.append(word)
        last = end
    if stack:
        runs.append((" ".join(stack), begin, last))
    return runs


def read_lrs3(
    folder: str | Path,
    *,
    split: str | None = None,
    crops: str | None = None,
    max_seconds: float | None = 24.0,
) -> Imported:
    """Manifest entries of every utterance (``pretrain``: every segment) of the chosen splits."""
    folder = Path(folder).expanduser()
    found = _split_folders(folder)
    if not found:
        raise ValueError(f"lrs3: no {'/'.join(SPLITS)} folders of speaker/id.txt in {folder}")
    wanted = list(found) if split is None else [s.strip() for s in split.split(",") if s.strip()]
    if split is None and len(found) > 1:
        raise ValueError(f"lrs3: {folder} holds {sorted(found)}; pick with --split")
    if missing := [s for s in wanted if s not in found]:
        raise ValueError(f"lrs3: no split {missing} in {folder} (found {sorted(found)})")
    if crops is None:
        raise ValueError(
            "lrs3: pass --crops: a folder of mouth-ROI mp4s (as auto-avsr writes them), "
            "'detect' (face landmarks) or 'none' (audio only)"
        )
    if crops == "detect":
        detector_class()  # a missing detector fails here, before anything is read
    roi = None if crops in ("detect", "none") else Path(crops).expanduser()
    if roi is not None and not roi.is_dir():
        raise ValueError(f"lrs3: --crops {crops}: no such folder (or pass 'detect' or 'none')")
    result = Imported()
    for name in wanted:
        for txt in sorted(found[name].glob("*/*.txt")):
            video = txt.with_suffix(".mp4")
            if not video.is_file():
                result.skip(txt, None, f"no video {video.name}")
                continue
            parsed = _transcript(txt, result)
            if parsed is None:
                continue
            text, words = parsed
            runs = segments(words, max_seconds) if name == "pretrain" and max_seconds else []
            speaker, stem = txt.parent.name, txt.stem
            base = {"audio": str(video), "speaker": speaker, "split": name}
            if len(runs) <= 1:  # whole utterance
                parts = [(f"{stem}_00" if runs else stem, text, None)]
            else:
                parts = [
                    (f"{stem}_{n:02d}", words_text, (int(start * FPS), int(end * FPS)))
                    for n, (words_text, start, end) in enumerate(runs)
                ]
            for part, part_text, span in parts:
                record = {**base, "text": part_text, "key": f"{name}/{speaker}/{part}"}
                if span is not None:
                    record.update(offset=span[0] / FPS, duration=(span[1] - span[0]) / FPS)
                reader = None
                if roi is not None:
                    mouth = roi / name / speaker / f"{part}.mp4"
                    if not mouth.is_file():
                        result.skip(txt, None, f"no mouth crop {mouth}")
                        continue
                    record["video"] = str(mouth)
                elif crops == "detect":
                    record["video"] = str(video)
                    start, stop = span if span is not None else (0, None)
                    reader = MouthCrops(str(video), start, stop)
                result.entries.append(Entry(record, str(txt), None, video_reader=reader))
    return result
