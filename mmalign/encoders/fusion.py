"""Two encoders side by side, frames aligned in time and concatenated on the channel axis.

This is WavLLM's front end (Whisper for content, WavLM for speaker and acoustics), but any two
encoders work: each reads its own batch keys, the faster stream is average-pooled to the slower
one's frame rate, the time axes are cut to the shorter (Whisper and WavLM are both 50 Hz but can
differ by a frame on the same clip) and the features are concatenated, ``dim = first.dim +
second.dim``. The valid length of a fused row is the smaller of the two.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from mmalign.components import build, spec
from mmalign.encoders.base import Encoder, valid_mask

__all__ = ["DualEncoder", "resample_frames"]


def resample_frames(
    features: Tensor, lengths: Tensor, src_rate: float, dst_rate: float
) -> tuple[Tensor, Tensor]:
    """Average-pool ``features [B, T, D]`` from ``src_rate`` to a lower ``dst_rate`` frames/s.

    Each row's valid frames are pooled on their own (adaptive average pooling, so non-integer
    ratios work), so padding never enters a valid output frame. New lengths are
    ``ceil(lengths * dst_rate / src_rate)``.
    """
    if dst_rate > src_rate:
        raise ValueError(f"resample_frames only downsamples; got {src_rate} -> {dst_rate} frames/s")
    if dst_rate == src_rate:
        return features, lengths
    new_lengths = torch.ceil(lengths.double() * dst_rate / src_rate - 1e-9).long().clamp(min=1)
    new_lengths = torch.where(lengths > 0, new_lengths, torch.zeros_like(new_lengths))
    out = features.new_zeros(features.shape[0], int(new_lengths.max()), features.shape[2])
    for row, (n, m) in enumerate(zip(lengths.tolist(), new_lengths.tolist(), strict=True)):
        if n > 0:
            pooled = F.adaptive_avg_pool1d(features[row, :n].T[None].float(), m)[0].T
            out[row, :m] = pooled.to(out.dtype)
    return out, new_lengths


class DualEncoder(Encoder):
    """``first`` and ``second`` encoders fused frame by frame (WavLLM: Whisper + WavLM).

    ``forward`` takes one input and one lengths tensor per encoder (``encode_batch`` picks them
    from the batch by each encoder's own keys). Both sub-encoders keep their own freezing, LoRA
    and trainable extras (e.g. WavLM's layer weights). In a checkpoint description the two are
    nested ``{class_path, init_args}`` specs, which the constructor accepts too.
    """

    def __init__(self, first: Encoder, second: Encoder) -> None:
        super().__init__()
        first = build(first) if isinstance(first, dict) else first
        second = build(second) if isinstance(second, dict) else second
        for name, enc in (("first", first), ("second", second)):
            if not isinstance(enc, Encoder):
                raise TypeError(f"DualEncoder.{name} must be an Encoder, got {type(enc).__name__}")
        if first.modality != second.modality:
            raise ValueError(
                f"DualEncoder fuses one modality; first is {first.modality!r}, "
                f"second is {second.modality!r}"
            )
        self.first = first
        self.second = second
        self.modality = first.modality
        self.dim: int = first.dim + second.dim
        self.frame_rate: float = min(first.frame_rate, second.frame_rate)
        self.frozen = first.frozen and second.frozen
        n_mels = getattr(first, "n_mels", None) or getattr(second, "n_mels", None)
        if n_mels is not None:
            self.n_mels: int = n_mels  # AlignmentModule checks it against the data's mel bins

    @property
    def input_keys(self) -> tuple[str, ...]:
        keys = (*self.first.input_keys, *self.second.input_keys)
        return tuple(dict.fromkeys(keys))

    @property
    def max_seconds(self) -> float | None:
        """The shorter window of the two (None when neither has one)."""
        windows = [w for w in (self.first.max_seconds, self.second.max_seconds) if w is not None]
        return min(windows) if windows else None

    def encode_batch(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Each encoder reads its own keys (e.g. ``audio_features`` and ``audio``)."""
        pairs = [self._inputs(enc, batch) for enc in (self.first, self.second)]
        return self(
            (pairs[0][0], pairs[1][0]),  # type: ignore[arg-type]
            (pairs[0][1], pairs[1][1]),  # type: ignore[arg-type]
        )

    @staticmethod
    def _inputs(encoder: Encoder, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        for key in (encoder.input_key, encoder.lengths_key):
            if key not in batch:
                raise KeyError(
                    f"DualEncoder: {type(encoder).__name__} reads batch[{key!r}], which the data "
                    "did not provide"
                    + (" (set data.keep_waveform: true)" if key == "audio" else "")
                )
        return batch[encoder.input_key], batch[encoder.lengths_key]

    def forward(  # type: ignore[override]
        self, inputs: tuple[Tensor, Tensor], lengths: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """(inputs, inputs), (lengths, lengths) of first and second -> [B, T, D1 + D2], [B]."""
        if not isinstance(inputs, (tuple, list)) or len(inputs) != 2 or len(lengths) != 2:
            raise TypeError(
                "DualEncoder.forward takes (first_inputs, second_inputs) and two lengths"
            )
        a, la = self.first(inputs[0], lengths[0])
        b, lb = self.second(inputs[1], lengths[1])
        a, la = resample_frames(a, la, self.first.frame_rate, self.frame_rate)
        b, lb = resample_frames(b, lb, self.second.frame_rate, self.frame_rate)
        frames = min(a.shape[1], b.shape[1])
        out_lengths = torch.minimum(la, lb).clamp(max=frames)
        dtype = torch.promote_types(a.dtype, b.dtype)
        fused = torch.cat([a[:, :frames].to(dtype), b[:, :frames].to(dtype)], dim=-1)
        fused = fused * valid_mask(out_lengths, frames)[..., None].to(dtype)
        return fused, out_lengths

    def lock(self) -> DualEncoder:
        self.first.lock()
        self.second.lock()
        self.frozen = True
        return self.train(False)

    def train(self, mode: bool = True) -> DualEncoder:
        # each sub-encoder decides for itself (a frozen one stays in eval mode)
        return super(Encoder, self).train(mode)

    def init_config(self) -> dict[str, Any]:
        """Nested specs of both encoders, so a checkpoint or export can rebuild the pair."""
        return {"first": spec(self.first), "second": spec(self.second)}
