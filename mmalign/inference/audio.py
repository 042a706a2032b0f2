"""Reading user audio for ``evaluate`` and ``transcribe``: any format, any rate, any channels.

soundfile (libsndfile) reads WAV, FLAC, OGG/Vorbis, Opus and MP3 quickly from the file header on;
container formats it does not know (M4A/AAC, WebM, MP4 video, WMA ...) go through
``torchaudio.load``, which decodes with torchcodec and so with ffmpeg. Either way the result is a
float32 mono waveform at the model's rate (``to_mono_rate``: channel mean, then
``torchaudio.functional.resample``).
"""

from __future__ import annotations

from pathlib import Path

import soundfile as sf
import torch

from mmalign.data.shards import PathOutsideRootError, manifest_path, to_mono_rate

__all__ = [
    "AUDIO_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "AudioReadError",
    "PathOutsideRootError",
    "audio_duration",
    "find_audio",
    "read_audio",
    "read_video",
    "resolve_path",
    "with_video",
]

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
    from mmalign.data.video import decode_video

    path = Path(path)
    try:
        frames, found = decode_video(path.read_bytes(), path.suffix.lstrip(".").lower())
    except Exception as exn:
        raise AudioReadError(f"{path}: cannot decode video ({exn})") from exn
    return frames, float(fps or found or 25.0)


def with_video(sample: dict, frames: torch.Tensor, fps: float, sample_rate: int = 16000) -> dict:
    """``sample`` with its video, and its audio cut or padded to whole video frames."""
    from mmalign.data.video import align_audio

    audio = align_audio(sample["audio"], int(frames.shape[0]), fps, sample_rate)
    return {
        **sample,
        "audio": audio,
        "video": frames,
        "video_fps": fps,
        "duration": audio.numel() / sample_rate,
    }
