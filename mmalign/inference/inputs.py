"""What ``mmalign transcribe`` reads: :func:`collect_inputs` turns the command's inputs into files.

Inputs are audio files, folders (searched recursively by extension), text lists (``.txt`` or
``.lst``, one path a line, relative to the list) and JSONL manifests (``audio`` path, optional
``task``/``id`` and prompt fields); paths in lists and manifests must resolve inside ``--root``
(default: the list's own folder). A model that reads video takes its clip from a manifest's
``video`` column or from the input itself when it is a video container (:func:`read_clip`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmalign.data.media import (
    AUDIO_EXTENSIONS,
    VIDEO_EXTENSIONS,
    find_audio,
    read_video,
    resolve_path,
)

LIST_SUFFIXES = (".txt", ".lst")


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


def read_clip(item: InputItem) -> tuple[Any, float]:
    """The mouth clip of an input: its manifest's ``video``, else the file itself if a video."""
    fps = item.meta.get("video_fps")
    name = item.meta.get("video")
    if name:
        return read_video(Path(item.meta["_video_path"]), fps)
    if item.path.suffix.lower() in VIDEO_EXTENSIONS:
        return read_video(item.path, fps)
    raise ValueError(f"{item.path}: the model reads video but this input has none")
