"""CLIP image tower (open_clip) applied frame by frame to video: ``[B, Tv, C, H, W] -> [B, Tv, D]``.

Lip-reading front ends in LLM-based AVSR often embed each video frame on its own with a frozen image
encoder. Frames are folded into the batch (only the valid ones: padding frames are never encoded
and come out as zeros), in chunks of ``chunk_size`` to bound memory on long clips. Grayscale lip
crops (C == 1) are repeated to three channels; every frame is resized the way open_clip's own
preprocessing does (shortest side to the model's image size, centre crop) and normalised with the
model's mean and std (``model.visual.preprocess_cfg``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import open_clip
import torch
from peft import LoraConfig
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from mmalign.dtypes import torch_dtype
from mmalign.encoders.base import (
    Encoder,
    as_lora_config,
    inject_lora,
    lora_to_dict,
)

__all__ = ["CLIPVideoEncoder"]


def _create_visual(
    model: str, pretrained: str | None, config: dict[str, Any] | None
) -> torch.nn.Module:
    """open_clip's image tower: a registry name (+ tag or checkpoint file), ``hf-hub:``,
    ``local-dir:``, or an architecture dict (random weights) written as a local-dir config."""
    if config is not None:
        if pretrained is not None:
            raise ValueError(
                "CLIPVideoEncoder: give config (random weights) or pretrained, not both"
            )
        with tempfile.TemporaryDirectory(prefix="mmalign-open-clip-") as tmp:
            (Path(tmp) / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
            clip = open_clip.create_model(f"local-dir:{tmp}", pretrained_text=False)
    else:
        if pretrained is not None and ":" not in model:  # schemas bring their own weights
            known = open_clip.list_pretrained_tags_by_model(model)
            if pretrained not in known and not Path(pretrained).is_file():
                raise FileNotFoundError(
                    f"CLIPVideoEncoder.pretrained={pretrained!r} is neither a checkpoint file nor "
                    f"one of open_clip's tags for {model!r}: {known}"
                )
        clip = open_clip.create_model(
            model, pretrained=pretrained, pretrained_text=False, weights_only=True
        )
    return clip.visual


class CLIPVideoEncoder(Encoder):
    """Per-frame CLIP image embeddings of a video at its own frame rate.

    Args:
        model: open_clip architecture name (``ViT-B-16``, see ``open_clip.list_models()``), or
            ``hf-hub:<repo>`` / ``local-dir:<dir>`` (config and weights from there).
        pretrained: a local checkpoint file, or one of open_clip's tags for ``model`` (those
            download); ``None`` leaves the weights random. Checkpoints load with
            ``weights_only=True``; open_clip runs no code from a model repo.
        config: an open_clip model config dict (``embed_dim``, ``vision_cfg``, ``text_cfg``) to
            build instead of a registry entry, with random weights (tests, custom towers).
        frame_rate: frames per second of the video (25 for LRS2/LRS3).
        chunk_size: frames encoded at once.
        freeze: lock the pretrained weights (eval mode, no grad, not checkpointed).
        lora: optional ``peft.LoraConfig`` put on the image tower (e.g. ``target_modules: [c_fc,
            c_proj]``, the MLPs; ``nn.MultiheadAttention``'s own projections are refused since it
            reads their weights directly); trained and checkpointed even when frozen.
        dtype: compute dtype of the tower; outputs come back in float32.
    """

    input_key = "video"
    lengths_key = "video_lengths"
    modality = "video"

    def __init__(
        self,
        model: str = "ViT-B-16",
        pretrained: str | None = None,
        config: dict[str, Any] | None = None,
        frame_rate: float = 25.0,
        chunk_size: int = 256,
        freeze: bool = True,
        lora: LoraConfig | None = None,
        dtype: str = "float32",
    ) -> None:
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"CLIPVideoEncoder.chunk_size must be >= 1, got {chunk_size}")
        if frame_rate <= 0:
            raise ValueError(f"CLIPVideoEncoder.frame_rate must be > 0, got {frame_rate}")
        lora = as_lora_config(lora)
        self._init_args = {
            "model": model,
            "pretrained": pretrained,
            "config": config,
            "frame_rate": frame_rate,
            "chunk_size": chunk_size,
            "freeze": freeze,
            "lora": lora_to_dict(lora),
            "dtype": dtype,
        }
        self.model_name = model
        self.model = _create_visual(model, pretrained, config).to(torch_dtype(dtype))
        pp = self.model.preprocess_cfg
        size = pp["size"]
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        self.resize_mode: str = pp.get("resize_mode", "shortest")
        self.interpolation = InterpolationMode(pp.get("interpolation", "bicubic"))
        self.register_buffer("mean", torch.tensor(pp["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pp["std"]).view(1, 3, 1, 1), persistent=False)
        self.dim: int = int(self.model.output_dim)
        self.frame_rate: float = float(frame_rate)
        self.chunk_size = chunk_size
        if lora is not None:
            inject_lora(self.model, lora, field="CLIPVideoEncoder.lora")
        self.lora = lora
        if freeze:
            self.lock()

    def preprocess(self, frames: Tensor) -> Tensor:
        """``[N, C, H, W]`` frames (uint8 0-255 or float 0-1; C = 1 or 3) -> CLIP pixel inputs."""
        x = frames.float() / 255.0 if frames.dtype == torch.uint8 else frames.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise ValueError(f"CLIPVideoEncoder expects 1 or 3 channels, got {x.shape[1]}")
        if tuple(x.shape[-2:]) != self.image_size:
            if self.resize_mode == "squash":
                x = TF.resize(x, list(self.image_size), self.interpolation, antialias=True)
            else:  # open_clip's default: shortest side to size, centre crop
                x = TF.resize(x, min(self.image_size), self.interpolation, antialias=True)
                x = TF.center_crop(x, list(self.image_size))
            x = x.clamp(0.0, 1.0)
        return (x - self.mean) / self.std

    def forward(self, inputs: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """inputs [B, Tv, C, H, W], lengths [B] valid frames -> ([B, Tv, D], lengths)."""
        if inputs.dim() != 5:
            raise ValueError(
                f"CLIPVideoEncoder expects video [B, Tv, C, H, W], got {tuple(inputs.shape)}"
            )
        b, t = inputs.shape[:2]
        lengths = lengths.to(device=inputs.device, dtype=torch.long)
        if bool((lengths > t).any()):
            raise ValueError(f"video_lengths {lengths.tolist()} exceed the clip's {t} frames")
        valid = torch.arange(t, device=inputs.device)[None, :] < lengths[:, None]
        frames = inputs[valid]  # [N, C, H, W], valid frames only
        out = torch.zeros(b, t, self.dim, device=inputs.device)
        if frames.shape[0] == 0:
            return out, lengths
        dtype = next(self.model.parameters()).dtype
        with self.no_grad_if_frozen():
            chunks = [
                self.model(self.preprocess(chunk).to(dtype))
                for chunk in frames.split(self.chunk_size)
            ]
        out[valid] = torch.cat(chunks).float()
        return out, lengths

    def init_config(self) -> dict[str, Any]:
        """Constructor arguments, so a checkpoint or export can rebuild this encoder."""
        return dict(self._init_args)

    def extra_repr(self) -> str:
        return (
            f"model={self.model_name!r}, image_size={self.image_size}, "
            f"frame_rate={self.frame_rate}, frozen={self.frozen}"
        )
