"""Decode one raw tar sample (bytes per member) into a sample: audio, text, task, video.

*Video.* A sample may carry lip video as a ``.npy`` member (uint8 ``T x H x W``, what ``prepare``
writes) or a container (``mp4`` ...; decoded with torchcodec). Its rate is the JSON's
``video_fps``, else the container's, else 25. With ``require_video`` samples without video are
dropped ("missing video"), so an audio-visual model never sees a batch it cannot use; a batch
mixing samples with and without video fails in collate and is dropped as a whole.

*Feature caches* (``mmalign cache-features``, :mod:`mmalign.data.cache`) are read with
``cached=True``: decode takes each sample's stored encoder output (``feats.npy``) and the JSON's
``duration`` instead of audio, and batches carry ``encoder_features``/``encoder_lengths``.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import soundfile as sf
import torch

from mmalign.data.collate import DEFAULT_TASK
from mmalign.data.media import to_mono_rate
from mmalign.data.skips import SampleError
from mmalign.data.tasks import TaskError, apply_task
from mmalign.data.video import DEFAULT_VIDEO_FPS, align_audio, decode_video

AUDIO_KEYS = ("flac", "wav", "ogg", "mp3", "opus")
VIDEO_KEYS = (
    "npy",
    "video.npy",
    "mp4",
    "video.mp4",
    "mkv",
    "webm",
    "mov",
    "avi",
)
"""Tar member extensions read as video, first match wins (``prepare`` writes ``npy``)."""

FEATURES_KEY = "feats.npy"
"""Member of a feature cache sample (``mmalign cache-features``): encoder output ``[T', D]``."""


def _decode_video_member(
    raw: dict[str, Any], meta: dict[str, Any]
) -> tuple[torch.Tensor, float] | None:
    """(frames uint8 [T, H, W], fps) of the sample's video member, None when it has none."""
    video_key = next((k for k in VIDEO_KEYS if raw.get(k) is not None), None)
    if video_key is None:
        return None
    try:
        frames, found_fps = decode_video(raw[video_key], video_key)
    except Exception as exn:  # decode_video says what is wrong; torchcodec may raise anything
        raise SampleError(f"undecodable video: .{video_key} member: {exn}") from exn
    fps = meta.get("video_fps")
    if fps is None:
        fps = found_fps or DEFAULT_VIDEO_FPS
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps < float("inf"):
        raise SampleError(f"undecodable video: bad video_fps {fps!r} in json")
    return frames, float(fps)


def _flac_without_frames(data: bytes) -> bool:
    """True for a FLAC stream that declares no samples and holds only metadata blocks (what
    ffmpeg or libFLAC write for empty input)."""
    if data[:4] != b"fLaC" or len(data) < 42:
        return False
    if int.from_bytes(data[18:26], "big") & ((1 << 36) - 1):  # STREAMINFO: total samples
        return False
    pos = 4
    while pos + 4 <= len(data):
        last = data[pos] & 0x80
        pos += 4 + int.from_bytes(data[pos + 1 : pos + 4], "big")
        if last:
            return pos == len(data)
    return False


def _read_meta(raw: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The sample's JSON object and its non-empty ``text``; raises :class:`SampleError`."""
    if raw.get("json") is None:
        raise SampleError("missing json")
    try:
        meta = json.loads(raw["json"])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exn:
        raise SampleError(f"bad json: {exn}") from exn
    if not isinstance(meta, dict):
        raise SampleError("bad json: not an object")
    text = meta.get("text")
    if not isinstance(text, str) or not text.strip():
        raise SampleError("missing text")
    return meta, text


def decode_sample(
    raw: dict[str, Any],
    sample_rate: int = 16000,
    *,
    require_video: bool = False,
    task: str | None = None,
    target_lang: str | None = None,
    max_audio_seconds: float | None = None,
    max_text_chars: int | None = None,
    min_audio_seconds: float | None = None,
) -> dict[str, Any]:
    """Raw tar sample (bytes per extension) to a decoded sample; raises :class:`SampleError`.

    ``max_audio_seconds`` and ``max_text_chars`` reject over-long samples (after the task has
    picked the target text), which would otherwise blow a batch's memory or the encoder's
    window; ``min_audio_seconds`` rejects clips too short to carry one LLM token.

    ``text`` is the target of the sample's task (``task`` overrides the JSON's): the transcript,
    or for translation the ``translation`` into ``target_lang`` (see :mod:`mmalign.data.tasks`);
    the transcript is kept in ``transcript``.

    A video member adds ``video`` (uint8 ``[T, H, W]``) and ``video_fps``, and the audio is cut
    or zero-padded to the video's whole frames; ``require_video`` rejects samples without one.
    """
    meta, text = _read_meta(raw)
    audio_key = next((k for k in AUDIO_KEYS if raw.get(k) is not None), None)
    if audio_key is None:
        raise SampleError("missing audio")
    try:
        data, rate = sf.read(io.BytesIO(raw[audio_key]), dtype="float32", always_2d=True)
    except Exception as exn:  # libsndfile reports many kinds of damage
        if _flac_without_frames(raw[audio_key]):  # libsndfile cannot open an empty FLAC
            raise SampleError("empty audio: FLAC stream without frames") from exn
        raise SampleError(f"undecodable audio: {exn}") from exn
    wave = to_mono_rate(torch.from_numpy(data.T.copy()), rate, sample_rate)
    if wave.numel() == 0:
        raise SampleError("empty audio")
    video = _decode_video_member(raw, meta)
    if video is None and require_video:
        raise SampleError("missing video")
    sample: dict[str, Any] = {
        "__key__": raw.get("__key__"),
        "__url__": raw.get("__url__"),
        "text": text,
        "task": str(meta.get("task") or DEFAULT_TASK),
        "meta": meta,
    }
    if video is not None:
        frames, fps = video
        wave = align_audio(wave, int(frames.shape[0]), fps, sample_rate)
        sample["video"], sample["video_fps"] = frames, fps
    sample["audio"] = wave
    sample["duration"] = wave.numel() / sample_rate
    _check_duration(sample["duration"], max_audio_seconds, min_audio_seconds)
    return _with_task(sample, task, target_lang, max_text_chars)


def _with_task(
    sample: dict[str, Any], task: str | None, target_lang: str | None, max_text_chars: int | None
) -> dict[str, Any]:
    """The sample's target text for its task, refused when longer than ``max_text_chars``."""
    try:
        sample = apply_task(sample, task, target_lang)
    except TaskError as exn:
        raise SampleError(str(exn).replace(" into ", ": into ", 1)) from exn
    if max_text_chars is not None and len(sample["text"]) > max_text_chars:
        raise SampleError(
            f"text too long: {len(sample['text'])} characters > max_text_chars={max_text_chars}"
        )
    return sample


def _check_duration(seconds: float, longest: float | None, shortest: float | None) -> None:
    if longest is not None and seconds > longest:
        raise SampleError(f"audio too long: {seconds:.1f} s > max_audio_seconds={longest}")
    if shortest is not None and seconds < shortest:
        raise SampleError(f"audio too short: {seconds:.3f} s < min_audio_seconds={shortest}")


def decode_cached_sample(
    raw: dict[str, Any],
    *,
    task: str | None = None,
    target_lang: str | None = None,
    max_audio_seconds: float | None = None,
    max_text_chars: int | None = None,
    min_audio_seconds: float | None = None,
) -> dict[str, Any]:
    """A feature cache's raw sample (see :mod:`mmalign.data.cache`) to a decoded sample with
    ``encoder_features`` (``[T', D]`` as stored) and the JSON's ``duration`` in place of audio;
    otherwise as :func:`decode_sample` (task, limits). Raises :class:`SampleError`."""
    meta, text = _read_meta(raw)
    duration = meta.get("duration")
    if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not duration > 0:
        raise SampleError(f"bad json: duration {duration!r}")
    if raw.get(FEATURES_KEY) is None:
        raise SampleError("missing features")
    try:
        feats = np.load(io.BytesIO(raw[FEATURES_KEY]), allow_pickle=False)
    except Exception as exn:
        raise SampleError(f"undecodable features: {exn}") from exn
    if feats.ndim != 2 or feats.dtype.kind != "f" or feats.shape[0] == 0:
        raise SampleError(f"undecodable features: {feats.dtype} {feats.shape}, not [T, D] float")
    _check_duration(duration, max_audio_seconds, min_audio_seconds)
    sample: dict[str, Any] = {
        "__key__": raw.get("__key__"),
        "__url__": raw.get("__url__"),
        "text": text,
        "task": str(meta.get("task") or DEFAULT_TASK),
        "meta": meta,
        "encoder_features": torch.from_numpy(feats),
        "duration": float(duration),
    }
    return _with_task(sample, task, target_lang, max_text_chars)
