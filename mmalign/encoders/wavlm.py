"""WavLM encoder on raw 16 kHz waveforms (transformers' WavLMModel), frozen, optionally with LoRA.

WavLM reads samples, not log-mel frames, so its batches need ``data.keep_waveform: true``
(``audio [B, S]`` and ``audio_sample_lengths [B]``). Inputs are normalised as its own feature
extractor would (``Wav2Vec2FeatureExtractor``: zero mean and unit variance per utterance over its
valid samples, padding set to ``padding_value``) so the collate can pad with anything.

The output is the last layer, or (``weighted_sum=True``, as in SUPERB and WavLLM) a softmax-weighted
sum of every hidden layer with learned weights: those few weights are trained and checkpointed
even though the encoder itself is frozen.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMModel
from transformers.models.wavlm.modeling_wavlm import WavLMAttention

from mmalign.dtypes import torch_dtype
from mmalign.encoders.base import (
    Encoder,
    as_lora_config,
    inject_lora,
    lora_to_dict,
    valid_mask,
)

__all__ = ["WavLMEncoder", "receptive_field"]


def receptive_field(config: WavLMConfig) -> int:
    """Samples that one output frame of the conv feature extractor sees (400 for WavLM)."""
    field, jump = 1, 1
    for kernel, stride in zip(config.conv_kernel, config.conv_stride, strict=True):
        field += (kernel - 1) * jump
        jump *= stride
    return field


def _attention_reads_weights(parent: nn.Module, child: str) -> bool:
    # WavLMAttention hands q/k/v/out_proj.weight to F.multi_head_attention_forward
    return isinstance(parent, WavLMAttention) and child in {
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
    }


class WavLMEncoder(Encoder):
    """WavLM on waveforms: ``audio [B, S]`` at 16 kHz in, ``[B, T, hidden_size]`` at 50/s out.

    Args:
        source: hub id (``microsoft/wavlm-base-plus``), local transformers directory, or
            ``"random"`` with ``config`` (WavLMConfig kwargs) for tests. Loaded with
            transformers' own WavLM classes: no code from the model repo runs.
        weighted_sum: output a learned softmax-weighted sum of all hidden layers instead of the
            last one; the weights (``layer_weights``) stay trainable when the encoder is frozen.
        attention_mask: mask padded samples inside the model. Default: only when the model's
            ``feat_extract_norm == "layer"`` (wavlm-large); the group-norm models (base, base-plus)
            were trained without one and transformers advises against passing it to them.
        freeze: lock the pretrained weights (eval mode, no grad, not checkpointed).
        lora: optional ``peft.LoraConfig`` put on the encoder; its weights are trained and
            checkpointed even when frozen. Target the feed-forward layers (``intermediate_dense``,
            ``output_dense``): WavLM's attention reads its q/k/v/out projection weights directly,
            so LoRA there would never run (that is refused).
        dtype: compute dtype of the pretrained weights; outputs come back in float32.
        config: WavLMConfig kwargs for ``source="random"``, else overrides of the loaded config.
        feature_extractor: Wav2Vec2FeatureExtractor kwargs for ``source="random"`` (defaults are
            transformers' own); hub and local sources use their ``preprocessor_config.json``.
    """

    input_key = "audio"
    lengths_key = "audio_sample_lengths"

    def __init__(
        self,
        source: str,
        weighted_sum: bool = False,
        attention_mask: bool | None = None,
        freeze: bool = True,
        lora: LoraConfig | None = None,
        dtype: str = "float32",
        config: dict[str, Any] | None = None,
        feature_extractor: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.source = str(source) if isinstance(source, Path) else source
        lora = as_lora_config(lora)
        self._init_args = {
            "source": self.source,
            "weighted_sum": weighted_sum,
            "attention_mask": attention_mask,
            "freeze": freeze,
            "lora": lora_to_dict(lora),
            "dtype": dtype,
            "config": config,
            "feature_extractor": feature_extractor,
        }
        if self.source == "random":
            if config is None:
                raise ValueError("WavLMEncoder: source='random' needs config=<WavLMConfig kwargs>")
            self.model = WavLMModel(WavLMConfig(**config)).to(torch_dtype(dtype))
            extractor = Wav2Vec2FeatureExtractor(**(feature_extractor or {}))
        else:
            if feature_extractor is not None:
                raise ValueError(
                    "WavLMEncoder: feature_extractor is only for source='random'; "
                    f"{self.source!r} brings its own preprocessor_config.json"
                )
            self.model = WavLMModel.from_pretrained(  # a fixed class: no repo code runs
                self.source, dtype=torch_dtype(dtype), trust_remote_code=False, **(config or {})
            )
            extractor = Wav2Vec2FeatureExtractor.from_pretrained(self.source)
        cfg = self.model.config
        self.do_normalize: bool = bool(extractor.do_normalize)
        self.padding_value: float = float(extractor.padding_value)
        self.sample_rate: int = int(extractor.sampling_rate)
        self.use_attention_mask: bool = (
            cfg.feat_extract_norm == "layer" if attention_mask is None else attention_mask
        )
        self.min_samples = receptive_field(cfg)
        self.dim: int = cfg.hidden_size
        self.frame_rate: float = self.sample_rate / math.prod(cfg.conv_stride)  # 16000/320 = 50
        self.weighted_sum = weighted_sum
        if weighted_sum:  # one weight per hidden state: the CNN projection plus every layer
            self.layer_weights = nn.Parameter(torch.zeros(cfg.num_hidden_layers + 1))
        if lora is not None:
            inject_lora(self.model, lora, _attention_reads_weights, "WavLMEncoder.lora")
        self.lora = lora
        if freeze:
            self.lock()

    def stays_trainable(self, name: str) -> bool:
        return name == "layer_weights" or super().stays_trainable(name)

    def normalize(self, audio: Tensor, lengths: Tensor) -> Tensor:
        """Wav2Vec2FeatureExtractor's normalisation in torch: per utterance over valid samples."""
        valid = valid_mask(lengths, audio.shape[1])
        x = audio.float()
        if self.do_normalize:
            n = lengths.clamp(min=1).to(x.dtype)[:, None]
            mean = (x * valid).sum(1, keepdim=True) / n
            var = (((x - mean) * valid) ** 2).sum(1, keepdim=True) / n
            x = (x - mean) / torch.sqrt(var + 1e-7)
        return x.masked_fill(~valid, self.padding_value)

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """Frames per utterance: the model's own conv arithmetic (clips shorter than one
        receptive field, 25 ms, count as one frame)."""
        lengths = lengths.clamp(min=self.min_samples)
        return self.model._get_feat_extract_output_lengths(lengths).to(torch.long)

    def forward(self, inputs: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """inputs [B, S] waveform, lengths [B] valid samples -> ([B, T, D], [B] valid frames)."""
        if inputs.dim() != 2:
            raise ValueError(
                f"WavLMEncoder expects waveforms [B, S] (batch['audio']), got {tuple(inputs.shape)}"
            )
        lengths = lengths.to(device=inputs.device, dtype=torch.long)
        if bool((lengths > inputs.shape[1]).any()):
            raise ValueError(f"lengths {lengths.tolist()} exceed the input's {inputs.shape[1]}")
        x = self.normalize(inputs, lengths)
        if x.shape[1] < self.min_samples:
            x = F.pad(x, (0, self.min_samples - x.shape[1]), value=self.padding_value)
        mask_lengths = lengths.clamp(min=self.min_samples)
        mask = valid_mask(mask_lengths, x.shape[1]).long() if self.use_attention_mask else None
        # with only layer_weights trainable, the backbone itself needs no graph
        backbone_grad = torch.is_grad_enabled() and (
            not self.frozen or any(p.requires_grad for p in self.model.parameters())
        )
        with torch.set_grad_enabled(backbone_grad):
            out = self.model(
                x.to(self.model.dtype),
                attention_mask=mask,
                output_hidden_states=self.weighted_sum,
            )
        if self.weighted_sum:
            states = torch.stack(out.hidden_states)  # [L + 1, B, T, D]
            if states.shape[0] != self.layer_weights.numel():
                raise RuntimeError(
                    f"WavLM returned {states.shape[0]} hidden states, expected "
                    f"{self.layer_weights.numel()} layer_weights"
                )
            weights = self.layer_weights.softmax(0).to(states.dtype)
            hidden = torch.einsum("l,lbtd->btd", weights, states)
        else:
            hidden = out.last_hidden_state
        out_lengths = self.output_lengths(lengths)
        hidden = hidden * valid_mask(out_lengths, hidden.shape[1])[..., None].to(hidden.dtype)
        return hidden.float(), out_lengths

    def init_config(self) -> dict[str, Any]:
        """Constructor arguments, so a checkpoint or export can rebuild this encoder."""
        return dict(self._init_args)

    def extra_repr(self) -> str:
        return (
            f"source={self.source!r}, weighted_sum={self.weighted_sum}, "
            f"attention_mask={self.use_attention_mask}, frozen={self.frozen}"
        )
