"""Lip video: decoding to grayscale frames, audio/video alignment, and frame transforms.

Audio-visual speech models (Auto-AVSR, Llama-AVSR) read a mouth region of interest as grayscale
uint8 frames ``[T, H, W]`` (usually 96 x 96, cropped to 88 x 88) at the video's own rate, 25 fps
for LRS2/LRS3. Shards store such clips as ``.npy`` arrays (see :mod:`mmalign.data.shards`);
containers (mp4, mkv, webm ...) are decoded with torchcodec, an optional dependency
(``pip install 'mmalign[decode]'``), imported only when a container is actually read.

Audio and video of one sample must cover the same time span, or the model sees words that the
lips have not spoken yet: :func:`align_audio` cuts or zero-pads the waveform to whole video frames.

Augmentation follows Auto-AVSR: training takes a random ``crop x crop`` window, flips it
horizontally with probability ``flip_prob`` and replaces a few short runs of frames by the clip's
mean (time masking); evaluation takes the centre crop only. Normalisation (``/255``, mean/std)
is left to the video encoder, so batches stay uint8 and cheap to move.
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_VIDEO_FPS = 25.0
"""Frame rate assumed when neither the sample's JSON nor its container says (LRS2/LRS3)."""

CONTAINER_EXTENSIONS = ("mp4", "mkv", "mov", "webm", "avi", "mpg", "mpeg", "m4v", "ogv")
"""Video containers decoded with torchcodec (anything else but ``npy`` is tried with it too)."""

_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale
_DECODE_CHUNK = 64  # frames decoded at once: a long full-HD clip never sits in memory in RGB

Box = tuple[int, int, int, int]
"""A crop box ``(x, y, w, h)`` in pixels: left, top, width, height."""


def to_grayscale(frames: Tensor) -> Tensor:
    """uint8 ``[T, H, W]`` from uint8 ``[T, H, W]``, ``[T, H, W, C]`` or ``[T, C, H, W]``
    (C = 1 or 3; channels last is tried first). RGB is weighted to luma as torchvision does."""
    if frames.dtype != torch.uint8:
        raise ValueError(f"video frames must be uint8, got {frames.dtype}")
    if frames.dim() == 3:
        return frames
    if frames.dim() != 4:
        raise ValueError(
            f"video must be [T, H, W] or [T, H, W, C]/[T, C, H, W], got shape {tuple(frames.shape)}"
        )
    if frames.shape[-1] in (1, 3):
        frames = frames.permute(0, 3, 1, 2)
    elif frames.shape[1] not in (1, 3):
        raise ValueError(f"video needs 1 or 3 channels, got shape {tuple(frames.shape)}")
    if frames.shape[1] == 1:
        return frames[:, 0].contiguous()
    rgb = frames.to(torch.float32)
    gray = sum(w * rgb[:, c] for c, w in enumerate(_GRAY_WEIGHTS))
    return gray.round_().clamp_(0, 255).to(torch.uint8)


def crop_box(frames: Tensor, box: Box | None) -> Tensor:
    """``frames[..., y:y+h, x:x+w]``; a box reaching outside the frame is a ValueError naming
    both sizes (a fixed box from a config must fit every clip, never be silently clipped)."""
    if box is None:
        return frames
    x, y, w, h = box
    height, width = int(frames.shape[-2]), int(frames.shape[-1])
    if x < 0 or y < 0 or w < 1 or h < 1 or x + w > width or y + h > height:
        raise ValueError(
            f"crop box (x={x}, y={y}, w={w}, h={h}) is outside the {width}x{height} frame"
        )
    return frames[..., y : y + h, x : x + w]


def _check_frames(frames: Tensor) -> Tensor:
    if frames.dim() != 3:
        raise ValueError(f"video must be [T, H, W] after conversion, got {tuple(frames.shape)}")
    if frames.shape[0] == 0 or frames.shape[1] == 0 or frames.shape[2] == 0:
        raise ValueError(f"video is empty (shape {tuple(frames.shape)})")
    return frames.contiguous()


def _decode_npy(data: bytes, box: Box | None) -> Tensor:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exn:  # numpy raises ValueError, OSError, EOFError ... for bad bytes
        raise ValueError(f"not a readable .npy array ({exn})") from exn
    if not isinstance(array, np.ndarray):
        raise ValueError(f"expected one .npy array, got {type(array).__name__}")
    if array.dtype != np.uint8:
        raise ValueError(f"video array must be uint8, got {array.dtype}")
    if array.ndim not in (3, 4):
        raise ValueError(f"video array must be T x H x W (or with 3 channels), got {array.shape}")
    frames = to_grayscale(torch.from_numpy(np.ascontiguousarray(array)))
    return crop_box(frames, box)


def _decode_container(data: bytes, ext: str, box: Box | None) -> tuple[Tensor, float | None]:
    try:
        from torchcodec.decoders import VideoDecoder
    except ImportError as exn:
        raise ValueError(
            f"decoding .{ext} video needs torchcodec (pip install 'mmalign[decode]'): {exn}"
        ) from exn
    try:
        decoder = VideoDecoder(data, dimension_order="NCHW")
        meta = decoder.metadata
        fps = meta.average_fps
        n = len(decoder)
        chunks = []
        for start in range(0, n, _DECODE_CHUNK):
            batch = decoder.get_frames_in_range(start, min(n, start + _DECODE_CHUNK)).data
            chunks.append(crop_box(to_grayscale(batch), box))
    except ValueError as exn:
        if "crop box" in str(exn):
            raise
        raise ValueError(f"cannot decode .{ext} video: {exn}") from exn
    except Exception as exn:  # torchcodec/ffmpeg report damage as RuntimeError and others
        raise ValueError(f"cannot decode .{ext} video: {exn}") from exn
    if not chunks:
        raise ValueError(f".{ext} video has no frames")
    fps_value = float(fps) if fps is not None and math.isfinite(fps) and fps > 0 else None
    return torch.cat(chunks), fps_value


def decode_video(data: bytes, ext: str, *, box: Box | None = None) -> tuple[Tensor, float | None]:
    """Grayscale uint8 frames ``[T, H, W]`` and the frame rate when the format records one.

    ``ext`` is the member's or file's extension: ``npy`` (uint8 ``T x H x W``, or RGB with the
    channel axis second or last) is read with numpy; anything else (mp4, mkv ...) with torchcodec.
    ``box`` (x, y, w, h) is cropped from every frame, chunk by chunk while decoding a container.
    Raises ValueError saying what is wrong (dtype, shape, empty, undecodable, box outside).
    """
    ext = ext.lower().lstrip(".").rsplit(".", 1)[-1]
    if not data:
        raise ValueError(f"empty .{ext} video data")
    if ext == "npy":
        frames, fps = _decode_npy(data, box), None
    else:
        frames, fps = _decode_container(data, ext, box)
    return _check_frames(frames), fps


def align_audio(wave: Tensor, n_frames: int, fps: float, sample_rate: int) -> Tensor:
    """``wave`` cut or zero-padded to ``round(n_frames * sample_rate / fps)`` samples, the span of
    ``n_frames`` whole video frames. Rounding the product (not samples per frame) keeps
    non-integer rates such as 29.97 fps from drifting over a long clip."""
    if n_frames < 0:
        raise ValueError(f"n_frames must be >= 0, got {n_frames}")
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"video fps must be a positive number, got {fps}")
    if wave.dim() != 1:
        raise ValueError(f"align_audio expects a 1-D waveform, got shape {tuple(wave.shape)}")
    n = int(round(n_frames * sample_rate / fps))
    if wave.numel() >= n:
        return wave[:n]
    return F.pad(wave, (0, n - wave.numel()))


def center_crop(frames: Tensor, size: int) -> Tensor:
    """The central ``size x size`` window of ``[..., H, W]`` frames (offsets rounded down, as
    torchvision's CenterCrop). A clip smaller than ``size`` is a ValueError naming its size."""
    height, width = int(frames.shape[-2]), int(frames.shape[-1])
    if height < size or width < size:
        raise ValueError(f"video smaller than crop: {width}x{height} clip, crop {size}")
    top, left = (height - size) // 2, (width - size) // 2
    return frames[..., top : top + size, left : left + size]


class VideoTransform:
    """Per-clip lip-video augmentation (train) or centre crop (eval), on uint8 ``[T, H, W]``.

    Args:
        train: Random crop, flip and time masks when true; the centre crop only otherwise.
        crop: Side of the square window (88 for 96 x 96 mouth crops); None keeps the full frame.
            Clips smaller than ``crop`` raise ValueError naming their size (no padding: a data
            set of smaller clips needs a smaller ``crop``, not invented borders); the data
            pipeline skips and counts such samples.
        flip_prob: Probability of a horizontal flip (training).
        time_masks: Runs of frames masked per clip (training); 0 disables time masking.
        time_mask_frames: Longest masked run; each run's length is drawn from 0..this.
    """

    def __init__(
        self,
        train: bool,
        crop: int | None = 88,
        flip_prob: float = 0.5,
        time_masks: int = 0,
        time_mask_frames: int = 10,
    ) -> None:
        if crop is not None and (isinstance(crop, bool) or int(crop) != crop or crop < 1):
            raise ValueError(f"VideoTransform crop must be a positive int or None, got {crop!r}")
        if not 0.0 <= float(flip_prob) <= 1.0:
            raise ValueError(f"VideoTransform flip_prob must be in [0, 1], got {flip_prob}")
        if int(time_masks) != time_masks or time_masks < 0:
            raise ValueError(f"VideoTransform time_masks must be an int >= 0, got {time_masks}")
        if int(time_mask_frames) != time_mask_frames or time_mask_frames < 1:
            raise ValueError(
                f"VideoTransform time_mask_frames must be an int >= 1, got {time_mask_frames}"
            )
        self.train = bool(train)
        self.crop = None if crop is None else int(crop)
        self.flip_prob = float(flip_prob)
        self.time_masks = int(time_masks)
        self.time_mask_frames = int(time_mask_frames)

    def __call__(self, frames: Tensor, rng: random.Random | None = None) -> Tensor:
        """The transformed clip (a new tensor; ``frames`` is never modified). Training draws
        everything from ``rng``, so the same seed gives the same clip."""
        if frames.dim() != 3 or frames.dtype != torch.uint8:
            raise ValueError(
                f"VideoTransform expects uint8 [T, H, W], got {frames.dtype} {tuple(frames.shape)}"
            )
        if not self.train:
            out = frames if self.crop is None else center_crop(frames, self.crop)
            return out.contiguous()
        rng = rng if rng is not None else random.Random()
        if self.crop is not None:
            height, width = int(frames.shape[-2]), int(frames.shape[-1])
            if height < self.crop or width < self.crop:
                raise ValueError(
                    f"video smaller than crop: {width}x{height} clip, crop {self.crop}"
                )
            top = rng.randint(0, height - self.crop)
            left = rng.randint(0, width - self.crop)
            frames = frames[:, top : top + self.crop, left : left + self.crop]
        if rng.random() < self.flip_prob:
            frames = frames.flip(-1)
        frames = frames.clone()
        n = int(frames.shape[0])
        if self.time_masks and n > 0:
            mean = int(round(float(frames.to(torch.float32).mean())))
            for _ in range(self.time_masks):
                length = min(n, rng.randint(0, self.time_mask_frames))
                start = rng.randint(0, n - length)
                frames[start : start + length] = mean
        return frames

    def __repr__(self) -> str:
        return (
            f"VideoTransform(train={self.train}, crop={self.crop}, flip_prob={self.flip_prob}, "
            f"time_masks={self.time_masks}, time_mask_frames={self.time_mask_frames})"
        )
