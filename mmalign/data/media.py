"""Reading media: one module for prepare, the training pipeline, evaluate and transcribe.

Paths first: a path from a manifest or list must resolve (``..`` and symlinks followed) inside an
allowed root (:func:`manifest_path`), so that a manifest from elsewhere cannot make a run read,
and copy into shards or outputs, any file the user can read. Audio: soundfile (libsndfile) reads
WAV, FLAC, OGG/Vorbis, Opus and MP3 quickly from the file header on, and segments without
decoding the rest of a long recording (:func:`load_audio`); :func:`read_audio` falls back to
``torchaudio.load`` (torchcodec, so ffmpeg) for containers libsndfile does not know (M4A/AAC,
WebM, MP4 video, WMA ...). Either way the result is float32 mono at the model's rate
(:func:`to_mono_rate`: channel mean, then ``torchaudio.functional.resample``). Video: grayscale
uint8 frames through :func:`mmalign.data.video.decode_video`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import soundfile as sf
import torch
import torchaudio.functional as AF

from mmalign.data.video import align_audio, decode_video

# A segment may end this far past the end of its file (rounded offsets and durations): it is
# cut at the end of the file. Further out it is skipped.
SEGMENT_SLACK_S = 0.01


class SegmentError(ValueError):
    """The requested ``offset``/``duration`` segment lies outside the audio file."""


class PathOutsideRootError(ValueError):
    """A path listed in a manifest resolves outside the folder the run may read."""


def check_under_root(
    path: str | Path, root: str | Path, source: str | Path, line: int | None, field: str
) -> None:
    """Refuse ``path`` unless its real path (``..`` and symlinks resolved) lies inside ``root``.

    A manifest from elsewhere could otherwise make a run read, and copy into shards or
    outputs, any file the user can read (``../../.ssh/id_rsa``, ``/etc/passwd``).
    """
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        where = str(source) if line is None else f"{source}:{line}"
        raise PathOutsideRootError(
            f"{where}: field {field!r}: {str(path)!r} resolves to {real}, outside the allowed "
            f"root {real_root}; pass --root with a folder that holds it (--root / allows any)"
        )


def manifest_path(
    base: Path,
    name: str,
    *,
    root: str | Path | None,
    source: str | Path,
    line: int | None,
    field: str,
) -> Path:
    """``name`` as written when absolute, else under ``base``; refused
    (:class:`PathOutsideRootError`) when it resolves outside ``root`` (default ``base``)."""
    path = Path(name).expanduser()
    if not path.is_absolute():
        path = base / path
    check_under_root(path, base if root is None else root, source, line, field)
    return path


def not_a_file(path: Path | None) -> str | None:
    """Why ``path`` cannot be read as a media file, or None. A FIFO or device would block or
    never end, so only regular files are read."""
    if path is None or not os.path.lexists(path):
        return "file not found"
    try:
        mode = path.stat().st_mode
    except OSError as exn:
        return f"unreadable ({exn.strerror})"
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(mode):
        kind = "FIFO (named pipe)" if stat.S_ISFIFO(mode) else "special file"
        return f"is a {kind}, not a regular file"
    return None


def load_audio(
    path: str | Path,
    sample_rate: int = 16000,
    *,
    offset: float | None = None,
    duration: float | None = None,
) -> torch.Tensor:
    """Read an audio file (or a video's audio track) as a float32 mono waveform at ``sample_rate``.

    ``offset``/``duration`` (seconds) read only that segment, without decoding the rest of a
    long recording; :class:`SegmentError` when it starts past the end or ends more than
    ``SEGMENT_SLACK_S`` after it (a little overshoot is cut at the end of the file). Formats
    libsndfile does not know (MP4/M4A, WebM ...) are decoded whole with torchcodec and cut by the
    same sample arithmetic, so a segment is exact either way.
    """
    try:
        opened = sf.SoundFile(str(path))  # one open; errors while reading still propagate
    except sf.LibsndfileError:
        data, rate = _decode_torchcodec(path)
        start, frames = _segment_frames(path, rate, data.shape[1], offset, duration)
        return to_mono_rate(data[:, start : start + frames], rate, sample_rate)
    with opened:
        start, frames = _segment_frames(path, opened.samplerate, opened.frames, offset, duration)
        if offset is None and duration is None:
            frames = -1  # to the end as decoded (an MP3 header's frame count is an estimate)
        opened.seek(start)
        data = opened.read(frames, dtype="float32", always_2d=True)
        rate = opened.samplerate
    return to_mono_rate(torch.from_numpy(data.T.copy()), rate, sample_rate)


def _decode_torchcodec(path: str | Path) -> tuple[torch.Tensor, int]:
    """``[channels, samples]`` float32 and the rate of a container's first audio stream."""
    from torchcodec.decoders import AudioDecoder

    samples = AudioDecoder(str(path)).get_all_samples()
    return samples.data, int(samples.sample_rate)


def _segment_frames(
    path: str | Path, rate: int, total: int, offset: float | None, duration: float | None
) -> tuple[int, int]:
    """``(start, frames)`` in the file's own sample rate of a segment given in seconds."""
    if offset is None and duration is None:
        return 0, total
    offset = offset or 0.0
    start = round(offset * rate)
    frames = total - start if duration is None else round(duration * rate)
    end = start + frames
    if start >= total or end > total + SEGMENT_SLACK_S * rate:
        span = f"{offset:.3f}-{'end' if duration is None else f'{offset + duration:.3f}'} s"
        raise SegmentError(f"segment {span} lies outside {path} ({total / rate:.3f} s long)")
    return start, min(frames, total - start)


def to_mono_rate(wave: torch.Tensor, rate: int, sample_rate: int) -> torch.Tensor:
    """Down-mix ``[channels, samples]`` (or 1-D) audio to mono; resample it to ``sample_rate``."""
    if wave.dim() == 2:
        wave = wave.mean(dim=0)
    wave = wave.to(torch.float32)
    if rate != sample_rate:
        wave = AF.resample(wave, orig_freq=int(rate), new_freq=int(sample_rate))
    return wave.contiguous()


AUDIO_EXTENSIONS = (
    ".wav",
    ".flac",
    ".ogg",
    ".oga",
    ".opus",
    ".mp3",
    ".m4a",
    ".aac",
    ".wma",
    ".aiff",
    ".aif",
    ".au",
    ".webm",
    ".mp4",
    ".mkv",
    ".mov",
)
"""File extensions picked up when a folder is searched for audio (case-insensitive)."""


class AudioReadError(OSError):
    """Neither soundfile nor torchaudio/torchcodec could decode a file."""


def read_audio(path: str | Path, sample_rate: int = 16000) -> torch.Tensor:
    """Decode ``path`` to a float32 mono waveform at ``sample_rate``.

    Tries soundfile first (fast, no ffmpeg), then ``torchaudio.load`` (torchcodec + ffmpeg) for
    formats libsndfile lacks. Raises :class:`AudioReadError` naming the file and both causes.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioReadError(f"{path}: no such file")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
        wave = torch.from_numpy(data.T.copy())
    except Exception as sf_error:  # libsndfile raises several types for unknown formats
        try:
            import torchaudio

            wave, rate = torchaudio.load(str(path))
        except Exception as ta_error:
            raise AudioReadError(
                f"{path}: cannot decode audio (soundfile: {sf_error}; "
                f"torchaudio/torchcodec: {ta_error})"
            ) from ta_error
    if wave.numel() == 0:
        raise AudioReadError(f"{path}: no audio samples")
    wave = to_mono_rate(wave, int(rate), sample_rate)
    if not torch.isfinite(wave).all():
        raise AudioReadError(f"{path}: non-finite samples")
    return wave


def audio_duration(path: str | Path) -> float | None:
    """Duration in seconds from the file header when soundfile knows the format, else None."""
    try:
        info = sf.info(str(path))
    except Exception:
        return None
    return float(info.frames) / info.samplerate if info.samplerate else None


def find_audio(folder: str | Path) -> list[Path]:
    """Audio files under ``folder`` (recursively, by extension), sorted by path."""
    root = Path(folder)
    return sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS
    )


def resolve_path(
    base: Path,
    name: str,
    root: str | Path | None = None,
    *,
    source: str | Path | None = None,
    line: int | None = None,
    field: str = "audio",
) -> Path:
    """``name`` from a manifest or list (``source``, at ``line``): absolute as written, else
    relative to ``base``. Raises :class:`PathOutsideRootError` naming source, line and field
    when it resolves (``..``, symlinks) outside ``root`` (default ``base``, the list's folder),
    so that a manifest from elsewhere cannot make a run read any file."""
    return manifest_path(
        base, name, root=root, source=base if source is None else source, line=line, field=field
    )


VIDEO_EXTENSIONS = (".npy", ".mp4", ".mkv", ".mov", ".webm", ".avi")
"""Files read as mouth-region video: ``.npy`` uint8 ``T x H x W`` arrays or containers."""


def read_video(path: str | Path, fps: float | None = None) -> tuple[torch.Tensor, float]:
    """Grayscale uint8 frames ``[T, H, W]`` and their rate (the container's, else ``fps``,
    else 25). Raises :class:`AudioReadError` naming the file."""
    path = Path(path)
    try:
        frames, found = decode_video(path.read_bytes(), path.suffix.lstrip(".").lower())
    except Exception as exn:
        raise AudioReadError(f"{path}: cannot decode video ({exn})") from exn
    return frames, float(fps or found or 25.0)


def with_video(sample: dict, frames: torch.Tensor, fps: float, sample_rate: int = 16000) -> dict:
    """``sample`` with its video, and its audio cut or padded to whole video frames."""
    audio = align_audio(sample["audio"], int(frames.shape[0]), fps, sample_rate)
    return {
        **sample,
        "audio": audio,
        "video": frames,
        "video_fps": fps,
        "duration": audio.numel() / sample_rate,
    }
