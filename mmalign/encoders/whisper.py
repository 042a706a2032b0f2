"""Whisper encoder family: hub ids, local transformers directories, CTranslate2 directories, pins.

Whisper is trained on 30 s windows, and transformers' encoder refuses anything else. Utterances in
ASR corpora are mostly a few seconds long, so by default this encoder runs on a window as long as
the batch's longest input (positions sliced to fit), and each clip is encoded exactly as it would be
alone on its own window: its convolutions see zeros past its end (as their own padding would give)
and attention never reaches the frames past it. ``pad_to_30s=True`` gives the original behaviour,
each utterance padded to 30 s with silence, for when faithfulness matters more than time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F
from transformers import WhisperConfig, WhisperModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

from mmalign import assets
from mmalign.dtypes import torch_dtype
from mmalign.encoders.base import Encoder, valid_mask
from mmalign.encoders.ctranslate2 import is_ct2_whisper_dir, load_ct2_whisper

__all__ = ["WhisperEncoder", "load_hf_whisper_encoder", "whisper_silence"]

# Log-mel of an all-zero waveform after Whisper's normalisation: (log10(1e-10) + 4) / 4.
_EMPTY_SILENCE = -1.5


def load_hf_whisper_encoder(
    source: str, dtype: torch.dtype = torch.float32, config: dict[str, Any] | None = None
) -> HFWhisperEncoder:
    """transformers' WhisperEncoder from ``source`` (see ``WhisperEncoder``), cast to ``dtype``.

    ``config`` is the whole WhisperConfig for ``source="random"``, else overrides of the loaded one.
    """
    if source == "random":
        if config is None:
            raise ValueError("source='random' needs config=<WhisperConfig kwargs>")
        return HFWhisperEncoder(WhisperConfig(**config)).to(dtype)
    if assets.is_pinned(source):
        return load_ct2_whisper(assets.resolve(source).parent, dtype, True, config)
    if is_ct2_whisper_dir(source):
        return load_ct2_whisper(source, dtype, True, config)
    overrides = dict(config or {})
    # fixed transformers classes: no code from the repo runs, whatever its config says
    cfg = WhisperConfig.from_pretrained(source, trust_remote_code=False, **overrides)
    if "WhisperEncoder" in (cfg.architectures or []):  # saved from an encoder alone
        return HFWhisperEncoder.from_pretrained(
            source, config=cfg, dtype=dtype, trust_remote_code=False
        )
    model = WhisperModel.from_pretrained(source, config=cfg, dtype=dtype, trust_remote_code=False)
    return model.get_encoder()


def whisper_silence(inputs: Tensor, lengths: Tensor) -> Tensor:
    """Per-sample log-mel value of silence [B], as Whisper's feature extractor would produce it.

    Whisper pads the waveform with zeros, takes log10 of the mel power, clamps it to
    (max - 8) and maps x -> (x + 4) / 4, so padded frames hold exactly (max valid value - 2).
    """
    valid = torch.arange(inputs.shape[-1], device=inputs.device) < lengths[:, None]  # [B, T]
    masked = inputs.masked_fill(~valid[:, None, :], float("-inf"))
    peak = masked.amax(dim=(1, 2))
    return torch.where(lengths > 0, peak - 2.0, torch.full_like(peak, _EMPTY_SILENCE))


class WhisperEncoder(Encoder):
    """Whisper's encoder on log-mel frames: [B, n_mels, T] at 100/s in, [B, ceil(T/2), d_model] out.

    ``source`` is a hub id or local transformers directory, a CTranslate2 (faster-whisper)
    directory, ``"pinned:whisper-tiny.en"`` (real weights from a pinned pip package, hash checked),
    or ``"random"`` with ``config`` (WhisperConfig kwargs) for tests. Loading uses transformers'
    own Whisper classes, so no code from a model repo ever runs. A clip's output does not depend
    on its batch mates or on how the collate padded: on the variable window it is computed as if the
    clip were alone, and with ``pad_to_30s`` its padding is Whisper's own silence value.
    ``dtype`` is the encoder's compute dtype; outputs come back in the input's.
    """

    def __init__(
        self,
        source: str,
        pad_to_30s: bool = False,
        freeze: bool = True,
        dtype: str = "float32",
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.source = str(source) if isinstance(source, Path) else source
        self.pad_to_30s = pad_to_30s
        self._init_args = {
            "source": self.source,
            "pad_to_30s": pad_to_30s,
            "freeze": freeze,
            "dtype": dtype,
            "config": config,
        }
        self.model = load_hf_whisper_encoder(self.source, torch_dtype(dtype), config)
        cfg = self.model.config
        self.dim: int = cfg.d_model
        self.n_mels: int = cfg.num_mel_bins
        self.frame_rate: float = 50.0  # 10 ms mel hop, halved by conv2's stride
        self.max_frames: int = cfg.max_source_positions * 2  # 3000 for every released Whisper
        if freeze:
            self.lock()

    @property
    def max_seconds(self) -> float:
        """The window: ``max_frames`` log-mel frames at Whisper's 100 a second (30 s)."""
        return self.max_frames / 100.0

    def forward(self, inputs: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """inputs [B, n_mels, T] log-mel, lengths [B] valid frames -> ([B, ceil(T/2), D], [B])."""
        if inputs.dim() != 3 or inputs.shape[1] != self.n_mels:
            raise ValueError(
                f"WhisperEncoder expects log-mel inputs [B, {self.n_mels}, T], "
                f"got {tuple(inputs.shape)}"
            )
        frames = inputs.shape[-1]
        if frames > self.max_frames:
            raise ValueError(
                f"input has {frames} frames; Whisper encodes at most {self.max_frames}"
            )
        lengths = lengths.to(device=inputs.device, dtype=torch.long)
        if bool((lengths > frames).any()):
            raise ValueError(f"lengths {lengths.tolist()} exceed the input's {frames} frames")
        out_lengths = (lengths + 1) // 2
        with self.no_grad_if_frozen():
            if self.pad_to_30s:
                x = self._pad_with_silence(inputs, lengths, self.max_frames).to(self.model.dtype)
                hidden = self.model(input_features=x).last_hidden_state[:, : (frames + 1) // 2]
            else:
                hidden = self._encode_window(inputs.to(self.model.dtype), lengths, out_lengths)
        out_dtype = inputs.dtype if inputs.is_floating_point() else hidden.dtype
        return hidden.to(out_dtype), out_lengths

    @staticmethod
    def _pad_with_silence(inputs: Tensor, lengths: Tensor, frames: int) -> Tensor:
        silence = whisper_silence(inputs, lengths)
        x = F.pad(inputs, (0, frames - inputs.shape[-1]))
        valid = torch.arange(frames, device=x.device) < lengths[:, None]
        return torch.where(valid[:, None, :], x, silence[:, None, None].to(x.dtype))

    def _encode_window(self, x: Tensor, lengths: Tensor, out_lengths: Tensor) -> Tensor:
        """Each clip as if alone on a window of its own length, whatever its batch mates.

        transformers' WhisperEncoder.forward step by step (it insists on 3000 frames and takes no
        padding mask): conv1 and conv2 zero-pad their inputs, so zeroing each clip's frames past its
        end (mel input, then conv1's output) gives its last frames exactly what they would see
        alone; the layers are then driven through their public ``attention_mask`` argument, built by
        transformers for the model's attention implementation. Positions are sliced, not edited
        into the config, so batches of any length (and threads, torch.compile) are safe.
        """
        enc = self.model
        valid = valid_mask(lengths, x.shape[-1])[:, None, :].to(x.dtype)  # conv1 keeps the length
        hidden = F.gelu(enc.conv1(x * valid)) * valid
        hidden = F.gelu(enc.conv2(hidden)).permute(0, 2, 1)
        hidden = hidden + enc.embed_positions.weight[: hidden.shape[1]]
        hidden = F.dropout(hidden, p=enc.dropout, training=enc.training)
        # an empty clip keeps one key, so its (discarded) rows stay finite
        keys = valid_mask(out_lengths.clamp(min=1), hidden.shape[1])
        mask = create_bidirectional_mask(enc.config, hidden, keys)
        for layer in enc.layers:
            if enc.training and enc.layerdrop > 0 and torch.rand([]) < enc.layerdrop:
                continue
            hidden = layer(hidden, attention_mask=mask)
        return enc.layer_norm(hidden)

    def init_config(self) -> dict[str, Any]:
        """Constructor arguments, so a checkpoint or export can rebuild this encoder."""
        return dict(self._init_args)

    def extra_repr(self) -> str:
        return f"source={self.source!r}, pad_to_30s={self.pad_to_30s}, frozen={self.frozen}"
