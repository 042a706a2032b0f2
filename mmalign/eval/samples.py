"""The utterances ``mmalign evaluate`` scores: decoded samples from a JSONL manifest or shards.

The whole set is held in memory as 16 kHz float32 (about 230 MB per hour of audio), so every
condition of a sweep decodes the same samples.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from mmalign.data.collate import DEFAULT_TASK
from mmalign.data.media import (
    AudioReadError,
    PathOutsideRootError,
    read_audio,
    read_video,
    resolve_path,
    with_video,
)
from mmalign.data.reading import read_shard_samples

log = logging.getLogger(__name__)


def read_manifest_samples(
    manifest: str | Path,
    sample_rate: int = 16000,
    limit: int | None = None,
    root: str | Path | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Samples of a JSONL manifest (``audio`` path relative to the manifest, ``text``, optional
    ``task``, ``key``/``id`` and prompt fields); bad lines are skipped with a reason, but a path
    resolving outside ``root`` (default: the manifest's folder) raises
    :class:`PathOutsideRootError`."""
    manifest = Path(manifest)
    samples: list[dict[str, Any]] = []
    skipped: list[str] = []
    with open(manifest, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{manifest}:{lineno}"
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("line is not a JSON object")
                audio, text = obj.get("audio"), obj.get("text")
                if not isinstance(audio, str) or not audio:
                    raise ValueError("missing 'audio' path")
                if not isinstance(text, str) or not text.strip():
                    raise ValueError("missing 'text'")
                at = {"source": manifest, "line": lineno}
                path = resolve_path(manifest.parent, audio, root, field="audio", **at)
                video = obj.get("video")
                video_path = None
                if video:
                    if not isinstance(video, str):
                        raise ValueError(f"bad 'video' path: {video!r}")
                    video_path = resolve_path(manifest.parent, video, root, field="video", **at)
                wave = read_audio(path, sample_rate)
                sample = {
                    "__key__": str(obj.get("key", obj.get("id", Path(audio).with_suffix("")))),
                    "audio": wave,
                    "text": text,
                    "task": str(obj.get("task") or DEFAULT_TASK),
                    "duration": wave.numel() / sample_rate,
                    "meta": obj,
                }
                if video_path is not None:
                    frames, fps = read_video(video_path, obj.get("video_fps"))
                    sample = with_video(sample, frames, fps, sample_rate)
            except PathOutsideRootError:
                raise
            except (ValueError, AudioReadError) as exn:
                log.warning("skipping %s: %s", where, exn)
                skipped.append(f"{where}: {exn}")
                continue
            samples.append(sample)
            if limit is not None and len(samples) >= limit:
                break
    return samples, skipped


def read_samples(
    spec: str | Path,
    sample_rate: int = 16000,
    limit: int | None = None,
    root: str | Path | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Samples from a ``.jsonl`` manifest (paths inside ``root``, see
    :func:`read_manifest_samples`) or shards (folder, ``index.json``, ``.tar``, glob)."""
    if str(spec).endswith(".jsonl"):
        if not Path(spec).is_file():
            raise FileNotFoundError(f"manifest {spec} not found")
        return read_manifest_samples(spec, sample_rate, limit, root)
    return read_shard_samples(spec, sample_rate, limit)
