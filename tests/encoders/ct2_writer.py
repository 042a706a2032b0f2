"""Write transformers Whisper models as CTranslate2 / faster-whisper directories, for the tests.

The inverse of :mod:`mmalign.encoders.ctranslate2` (whose docstring describes ``model.bin``):
tests build a tiny random Whisper, write it here, and check that the reader gives it back.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor
from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

from mmalign.encoders.ctranslate2 import (
    _DTYPES,
    _GELU,
    BINARY_VERSION,
    SPEC_NAME,
    SPEC_REVISION,
    _name_map,
)

_DTYPE_IDS = {dtype: i for i, dtype in _DTYPES.items()}
# Spec options the writer emits, exactly as CTranslate2's converter does for Whisper.
_DECODER_OPTIONS: dict[str, tuple[torch.dtype, int]] = {
    "activation": (torch.int8, _GELU),
    "alibi": (torch.int8, 0),
    "alignment_heads": (torch.int16, 1),
    "alignment_layer": (torch.int16, -1),
    "pre_norm": (torch.int8, 1),
    "scale_embeddings": (torch.int8, 0),
    "start_from_zero_embedding": (torch.int8, 0),
}


def _hf_state(model: torch.nn.Module) -> tuple[dict[str, Tensor], WhisperConfig, bool]:
    """State dict named like WhisperModel's, the config, and whether a decoder is present."""
    if isinstance(model, WhisperForConditionalGeneration):
        base, proj = model.model, model.proj_out.weight
    elif isinstance(model, WhisperModel):
        base, proj = model, None
    elif isinstance(model, HFWhisperEncoder):
        state = {f"encoder.{k}": t for k, t in model.state_dict().items()}
        return state, model.config, False
    else:
        raise TypeError(
            f"write_ct2_whisper needs a transformers Whisper model, got {type(model).__name__}"
        )
    state = dict(base.state_dict())
    if proj is not None and proj.data_ptr() != base.decoder.embed_tokens.weight.data_ptr():
        state["proj_out.weight"] = proj
    return state, model.config, True


def _write_str(file: BinaryIO, text: str) -> None:
    data = text.encode("utf-8") + b"\0"
    file.write(struct.pack("<H", len(data)) + data)


def write_ct2_whisper(
    model: torch.nn.Module, path: str | Path, dtype: torch.dtype = torch.float16
) -> Path:
    """Write ``model.bin`` and ``config.json`` the way CTranslate2's Whisper converter does.

    Takes ``WhisperForConditionalGeneration``, ``WhisperModel`` or transformers' ``WhisperEncoder``
    (an encoder-only file: ``load_ct2_whisper`` reads it, CTranslate2 itself cannot). float16
    matches faster-whisper; pass float32 for a lossless copy. Returns the directory.
    """
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    state, config, has_decoder = _hf_state(model)
    n_dec = config.decoder_layers if has_decoder else 0
    plain, fused = _name_map(config.encoder_layers, n_dec)

    arrays: dict[str, Tensor] = {ct2: state[hf] for ct2, hf in plain}
    for ct2, targets in fused:
        weights, biases = [], []
        for target in targets:
            weight = state[f"{target}.weight"]
            weights.append(weight)
            biases.append(state.get(f"{target}.bias", torch.zeros(weight.shape[0])))
        arrays[f"{ct2}/weight"] = torch.cat(weights)
        arrays[f"{ct2}/bias"] = torch.cat([b.to(weights[0].dtype) for b in biases])
    arrays = {name: t.detach().to("cpu", dtype) for name, t in arrays.items()}
    arrays["encoder/num_heads"] = torch.tensor(config.encoder_attention_heads, dtype=torch.int16)
    aliases: dict[str, str] = {}
    if has_decoder:
        arrays["decoder/num_heads"] = torch.tensor(
            config.decoder_attention_heads, dtype=torch.int16
        )
        for option, (option_dtype, value) in _DECODER_OPTIONS.items():
            arrays[f"decoder/{option}"] = torch.tensor(value, dtype=option_dtype)
        if "proj_out.weight" in state:
            arrays["decoder/projection/weight"] = state["proj_out.weight"].detach().to("cpu", dtype)
        else:
            aliases["decoder/projection/weight"] = "decoder/embeddings/weight"

    with open(directory / "model.bin", "wb") as file:
        file.write(struct.pack("<I", BINARY_VERSION))
        _write_str(file, SPEC_NAME)
        file.write(struct.pack("<II", SPEC_REVISION, len(arrays)))
        for name in sorted(arrays):
            t = arrays[name].contiguous()
            _write_str(file, name)
            file.write(struct.pack("<B", t.dim()) + struct.pack(f"<{t.dim()}I", *t.shape))
            data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
            file.write(struct.pack("<BI", _DTYPE_IDS[t.dtype], len(data)))
            file.write(data)
        file.write(struct.pack("<I", len(aliases)))
        for alias, target in sorted(aliases.items()):
            _write_str(file, alias)
            _write_str(file, target)

    meta: dict[str, Any] = {
        "suppress_ids": list(config.suppress_tokens or []),
        "suppress_ids_begin": list(config.begin_suppress_tokens or []),
    }
    generation = getattr(model, "generation_config", None)
    if getattr(generation, "alignment_heads", None):
        meta["alignment_heads"] = [list(h) for h in generation.alignment_heads]
    if getattr(generation, "lang_to_id", None):
        meta["lang_ids"] = sorted(generation.lang_to_id.values())
    # Not read by faster-whisper; lets load_ct2_whisper rebuild models that ship no tokenizer.
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        if getattr(config, key, None) is not None:
            meta[key] = getattr(config, key)
    if not has_decoder:
        meta["vocab_size"] = config.vocab_size
    (directory / "config.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return directory
