"""Start-up checks of :class:`mmalign.data.datamodule.ShardDataModule`'s settings: a bad value
fails at once, naming the argument, rather than in a DataLoader worker mid-epoch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmalign.data.augment import parse_snr
from mmalign.data.noise import BABBLE


def check_settings(
    *,
    video_crop: Any,
    video_flip: Any,
    video_time_masks: Any,
    video_time_mask_frames: Any,
    noise_snrs: Any,
    noise_source: Any,
    noise_prob: Any,
    babble_speakers: Any,
    task: Any,
    max_audio_seconds: Any = None,
    max_text_chars: Any = None,
    sampling: Any = "resampled",
    max_skip_rate: Any = None,
    skip_rate_min_samples: Any = 200,
) -> None:
    """Fail at start-up, naming the argument, rather than in a DataLoader worker mid-epoch."""

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_prob(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0

    problems = []
    if video_crop is not None and not (is_int(video_crop) and video_crop >= 1):
        problems.append(f"video_crop={video_crop!r} must be a positive int or None")
    if not is_prob(video_flip):
        problems.append(f"video_flip={video_flip!r} must be a probability in [0, 1]")
    if not (is_int(video_time_masks) and video_time_masks >= 0):
        problems.append(f"video_time_masks={video_time_masks!r} must be an int >= 0")
    if not (is_int(video_time_mask_frames) and video_time_mask_frames >= 1):
        problems.append(f"video_time_mask_frames={video_time_mask_frames!r} must be an int >= 1")
    if noise_snrs is not None:
        if isinstance(noise_snrs, (str, bytes)) or not isinstance(noise_snrs, (list, tuple)):
            problems.append(f"noise_snrs={noise_snrs!r} must be a list of dB values or null")
        elif not noise_snrs:
            problems.append("noise_snrs=[] is empty; use null to turn noise off")
        else:
            for value in noise_snrs:
                try:
                    parse_snr(value)
                except ValueError as exn:
                    problems.append(f"noise_snrs={list(noise_snrs)!r}: {exn}")
                    break
        if noise_source != BABBLE and not (
            isinstance(noise_source, str) and Path(noise_source).expanduser().exists()
        ):
            problems.append(
                f"noise_source={noise_source!r} must be 'babble' or an existing file or folder"
            )
    if not is_prob(noise_prob):
        problems.append(f"noise_prob={noise_prob!r} must be a probability in [0, 1]")
    if not (is_int(babble_speakers) and babble_speakers >= 1):
        problems.append(f"babble_speakers={babble_speakers!r} must be an int >= 1")
    if task is not None and (not isinstance(task, str) or not task.strip() or " " in task):
        problems.append(f"task={task!r} must be a task name such as 'asr', 'vsr' or 'avsr'")
    if max_audio_seconds is not None and not (
        isinstance(max_audio_seconds, (int, float))
        and not isinstance(max_audio_seconds, bool)
        and max_audio_seconds > 0
    ):
        problems.append(f"max_audio_seconds={max_audio_seconds!r} must be > 0 or None")
    if max_text_chars is not None and not (is_int(max_text_chars) and max_text_chars >= 1):
        problems.append(f"max_text_chars={max_text_chars!r} must be an int >= 1 or None")
    if sampling not in ("resampled", "exact"):
        problems.append(f"sampling={sampling!r} must be 'resampled' or 'exact'")
    if max_skip_rate is not None and not is_prob(max_skip_rate):
        problems.append(f"max_skip_rate={max_skip_rate!r} must be in [0, 1] or None")
    if not (is_int(skip_rate_min_samples) and skip_rate_min_samples >= 1):
        problems.append(f"skip_rate_min_samples={skip_rate_min_samples!r} must be an int >= 1")
    if problems:
        raise ValueError("ShardDataModule: " + "; ".join(problems))
