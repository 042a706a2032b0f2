"""Mouth crops cut by a face-landmark detector, for corpora of whole-face video (LRS3, LRS2).

The detector is MTCNN from facenet-pytorch, whose three small networks ship inside its wheel:
it runs offline on the CPU and finds five landmarks per face (eye centres, nose tip, mouth
corners). It is installed without its dependencies (its metadata pins torch < 2.3, yet it runs
on this torch; see ``requirements-nodeps.in``) and imported only when crops are cut.

Per frame the crop is a square centred on the midpoint of the mouth corners, its side one and a
half times the mean of the eye distance and the mouth width (nose tip to chin, the mouth about
two thirds of the width, as in auto-avsr's 96 px mouth ROIs), taken from the largest face
(MTCNN's pick). Centres and sides are smoothed over :data:`WINDOW` frames (auto-avsr smooths its
landmarks over 12), so the crop does not jitter with the detector. A frame where no face is
found keeps its place (audio and video stay aligned): its box is interpolated from the nearest
frames with a face, and the sample counts it (``no_face_frames``). A clip with no face in any
frame is skipped. Each crop is resized to :data:`SIZE` x :data:`SIZE` and stored in grayscale;
the boxes, in the source video's pixels, go into the sample JSON (``crop_boxes``: one
``[x, y, w, h]`` per frame).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmalign.data.video import to_grayscale

SIZE = 96
WINDOW = 12
_BATCH = 16  # frames per detector call


def detector_class() -> Any:
    """facenet-pytorch's MTCNN, or an ImportError saying how to install it."""
    try:
        from facenet_pytorch import MTCNN
    except ImportError as exn:
        raise ImportError(
            "mouth crops (--crops detect) need facenet-pytorch: "
            "pip install --no-deps facenet-pytorch==2.6.0 (see requirements-nodeps.in)"
        ) from exn
    return MTCNN


@lru_cache(maxsize=1)
def _detector() -> Any:
    return detector_class()(device="cpu")


def mouth_boxes(frames: torch.Tensor) -> tuple[np.ndarray, int]:
    """Smoothed square boxes ``[T, 4]`` (x, y, w, h; floats) around the mouth in uint8 RGB
    ``[T, H, W, 3]`` frames, and how many frames had no face (their boxes interpolated).
    ValueError when no frame has a face."""
    centres = np.full((len(frames), 3), np.nan)  # x, y, side
    for start in range(0, len(frames), _BATCH):
        chunk = frames[start : start + _BATCH].numpy()
        _, _, points = _detector().detect(chunk, landmarks=True)
        for n, found in enumerate(points):
            if found is None or len(found) == 0:
                continue
            eye_l, eye_r, _, mouth_l, mouth_r = np.asarray(found[0], dtype=np.float64)
            width = np.linalg.norm(mouth_r - mouth_l)
            side = 0.75 * (np.linalg.norm(eye_r - eye_l) + width)  # 1.5 x their mean
            centres[start + n] = [*(mouth_l + mouth_r) / 2, side]
    seen = ~np.isnan(centres[:, 0])
    if not seen.any():
        raise ValueError(f"no face in any of its {len(frames)} frames")
    t = np.arange(len(frames))
    filled = np.stack([np.interp(t, t[seen], centres[seen, k]) for k in range(3)], axis=1)
    window = min(WINDOW, len(frames))
    padded = np.pad(filled, ((window // 2, window - 1 - window // 2), (0, 0)), mode="edge")
    kernel = np.ones(window) / window
    smooth = np.stack([np.convolve(padded[:, k], kernel, "valid") for k in range(3)], axis=1)
    x, y, side = smooth.T
    return np.stack([x - side / 2, y - side / 2, side, side], axis=1), int((~seen).sum())


def crop_mouths(frames: torch.Tensor) -> tuple[np.ndarray, list[list[int]], int]:
    """uint8 grayscale ``[T, SIZE, SIZE]`` mouth crops of RGB ``[T, H, W, 3]`` frames, the
    integer boxes they were cut from, and the count of frames without a face."""
    boxes, missing = mouth_boxes(frames)
    gray = to_grayscale(frames)  # [T, H, W]
    height, width = gray.shape[1:]
    crops, kept = [], []
    for frame, box in zip(gray, boxes, strict=True):
        x, y, side = round(box[0]), round(box[1]), max(1, round(box[2]))
        # zero padding where the box leaves the frame (a face at the border)
        pad = (max(0, -x), max(0, x + side - width), max(0, -y), max(0, y + side - height))
        part = F.pad(frame, pad)[y + pad[2] : y + pad[2] + side, x + pad[0] : x + pad[0] + side]
        resized = F.interpolate(
            part[None, None].float(), size=(SIZE, SIZE), mode="bilinear", antialias=True
        )
        crops.append(resized[0, 0].round().clamp(0, 255).to(torch.uint8))
        kept.append([x, y, side, side])
    return torch.stack(crops).numpy(), kept, missing


@dataclass(frozen=True)
class MouthCrops:
    """Video reader: frames ``start:stop`` of a whole-face video as mouth crops (picklable, for
    ``prepare``'s worker processes; see :data:`mmalign.data.corpus.VideoReader`)."""

    path: str
    start: int = 0
    stop: int | None = None

    def __call__(self) -> tuple[np.ndarray, float, dict[str, Any]]:
        from torchcodec.decoders import VideoDecoder

        try:
            decoder = VideoDecoder(self.path, dimension_order="NHWC")
            stop = len(decoder) if self.stop is None else min(self.stop, len(decoder))
            frames = decoder.get_frames_in_range(self.start, stop).data
            fps = float(decoder.metadata.average_fps or 25.0)
        except Exception as exn:  # torchcodec/ffmpeg report damage as RuntimeError and others
            raise ValueError(f"cannot decode video frames {self.start}:{self.stop}: {exn}") from exn
        if len(frames) == 0:
            raise ValueError(f"no video frames in {self.start}:{self.stop}")
        crops, boxes, missing = crop_mouths(frames)
        fields = {"crop_boxes": boxes, "no_face_frames": missing, "crop_detector": "mtcnn"}
        return crops, fps, fields
