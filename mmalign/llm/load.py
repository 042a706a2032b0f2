"""Load a frozen causal LM and its tokenizer from a hub id, a local directory or a GGUF file."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from mmalign.dtypes import torch_dtype

log = logging.getLogger(__name__)


def split_source(source: str) -> tuple[str, str | None]:
    """Return (directory or hub id, gguf file name or None); resolves ``pinned:`` names."""
    if source.startswith("pinned:"):
        from mmalign.assets import resolve

        source = str(resolve(source.removeprefix("pinned:")))
    if source.endswith(".gguf"):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return str(path.parent), path.name
    return source, None


def dequantized_gguf(path: Path, trust_remote_code: bool = False) -> str:
    """Dequantise a GGUF file once into a transformers directory cached under its sha256.

    transformers' gguf reader takes ~25 s on two cores for a 135M model and repeats the work on
    every load; the cached float copy loads in about a second. The directory is written to a
    temporary name and renamed, so concurrent ranks never see half of it.
    """
    from mmalign.assets import cache_dir, sha256_file

    target = cache_dir() / "gguf" / sha256_file(path)[:32]
    if (target / "config.json").is_file():
        return str(target)
    log.info("dequantising %s into %s (once)", path, target)
    remote = {"trust_remote_code": trust_remote_code}
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, **remote)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **remote)
    model.hf_quantizer = None  # GGUF weights are plain floats now; nothing to re-quantise
    model.config.quantization_config = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


# transformers families whose CausalLM forward computes logits as lm_head(hidden) and nothing else
PLAIN_HEAD_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def load_llm(
    source: str,
    *,
    dtype: str = "float32",
    tokenizer: str | None = None,
    config: dict | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = "sdpa",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model and tokenizer.

    ``source`` is a hub id, a local directory, a ``.gguf`` file (dequantised by transformers'
    gguf support), ``pinned:<name>`` (a checksum-verified asset, see ``mmalign.assets``), or
    ``random`` with ``config`` (kwargs of an ``AutoConfig.for_model``; tests use this with a
    tokenizer directory trained on the fly). ``trust_remote_code`` goes to every
    ``from_pretrained``: it runs code from the model repo, so only for repos you trust.
    ``attn_implementation`` is transformers' (``sdpa``, ``eager``, ``flash_attention_2`` ...).
    """
    remote = {"trust_remote_code": trust_remote_code}
    attn = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if source == "random":
        if config is None or tokenizer is None:
            raise ValueError("llm source 'random' needs both `config` and `tokenizer`")
        cfg = AutoConfig.for_model(**config)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype(dtype), **attn)
        tok = AutoTokenizer.from_pretrained(tokenizer, **remote)
    else:
        where, gguf_file = split_source(source)
        if gguf_file:
            where = dequantized_gguf(Path(where) / gguf_file, trust_remote_code)
        tok = AutoTokenizer.from_pretrained(tokenizer or where, **remote)
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=torch_dtype(dtype), **remote, **attn
        )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    # Decoding settings are mmalign's alone (SpeechLLM.generate): transformers merges the model's
    # generation_config.json into every generate() call, so a hub's repetition_penalty (Qwen2.5
    # instruct: 1.05-1.1), temperature or top_p would silently change greedy transcripts.
    model.generation_config = GenerationConfig()
    return model, tok


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The LLM's decoder layers: modules whose class the model lists in ``_no_split_modules``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Turn on transformers' activation checkpointing of ``model``'s layers, non-reentrant.

    Non-reentrant recomputation reaches the LoRA weights although the frozen layers' inputs need
    no grad, and works under DDP (unused parameters) and inside FSDP units; transformers' layers
    also drop the KV cache while checkpointing, which a recomputed layer would fill twice.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the newer transformers name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()


def is_checkpointing(model: nn.Module) -> bool:
    """Whether transformers' activation checkpointing is on in any layer of ``model``."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


ARCHITECTURE_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
)


class CausalLM(nn.Module):
    """A frozen decoder-only LLM, optionally wrapped by a peft adapter (LoRA by default).

    Args:
        source: hub id, local directory, ``.gguf`` file, ``pinned:<name>`` or ``random``
            (see :func:`load_llm`).
        adapter: any ``peft.PeftConfig`` (e.g. ``peft.LoraConfig`` injected from YAML), so
            rank, alpha, dropout and target modules are peft's own settings; checked at
            construction (see :mod:`mmalign.llm.tuners` for what is supported and refused).
            A data-driven initialisation (``eva``, ``corda``, ``lora_ga``, ``lora_one``) is
            left in ``pending_init`` until ``mmalign fit`` calibrates it.
        dtype: dtype of the frozen weights.
        tokenizer: tokenizer hub id or directory (default: ``source``'s).
        config: ``AutoConfig.for_model`` kwargs for ``source="random"``.
        gradient_checkpointing: recompute the LLM's activations in the backward pass.
        trust_remote_code: let transformers run code from the model repo (custom
            architectures or tokenizers); only for repos you trust. Off by default.
        attn_implementation: transformers' attention kernel: ``sdpa`` (PyTorch's fused
            scaled-dot-product attention, FlashAttention/memory-efficient kernels on GPU),
            ``flash_attention_2`` (needs the flash-attn package), or ``eager``.
        compile: ``torch.compile`` each decoder layer (dynamic shapes: batches vary in length);
            the first steps pay for compilation.
    """

    def __init__(
        self,
        source: str,
        adapter: PeftConfig | None = None,
        dtype: str = "float32",
        tokenizer: str | None = None,
        config: dict | None = None,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        attn_implementation: str | None = "sdpa",
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.source = source
        self.dtype_name = dtype
        self.tokenizer_source = tokenizer
        self.model_config = config
        self.trust_remote_code = trust_remote_code
        self.attn_implementation = attn_implementation
        model, self.tokenizer = load_llm(
            source,
            dtype=dtype,
            tokenizer=tokenizer,
            config=config,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
        )
        model.requires_grad_(False)
        if gradient_checkpointing:
            enable_checkpointing(model)
        self.pending_init: str | None = None  # a data-driven init awaiting calibration
        if adapter is not None:
            from mmalign.llm.tuners import attach_adapter

            model, self.pending_init = attach_adapter(model, adapter)
        self.adapter = adapter
        self.model = model
        if compile:
            for layer in decoder_layers(model):
                layer.compile(dynamic=True)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def architecture(self) -> dict[str, Any]:
        """The shape-defining config fields: an adapter trained on one LLM fits another only
        when these agree (e.g. a base and an instruct model of one family)."""
        cfg = self.model.config
        return {k: getattr(cfg, k, None) for k in ARCHITECTURE_FIELDS}

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    def body_and_head(self) -> tuple[nn.Module, nn.Module] | None:
        """(decoder body, output projection) when the model's logits are exactly
        ``head(body(...).last_hidden_state)``, so the loss can project only the positions it
        needs; None for families that scale or soft-cap logits, and for prompt-learning
        tuners, whose wrapper adds virtual tokens in its own forward."""
        model = self.model
        peft_config = getattr(model, "active_peft_config", None)
        if peft_config is not None and peft_config.is_prompt_learning:
            return None
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if base.config.model_type not in PLAIN_HEAD_FAMILIES:
            return None
        return base.get_decoder(), base.get_output_embeddings()

    def init_config(self) -> dict:
        """Constructor arguments (without the adapter, which export saves in peft's format);
        ``trust_remote_code`` only when set, so that it is never on by default on reload."""
        args: dict[str, Any] = {
            "source": self.source,
            "dtype": self.dtype_name,
            "tokenizer": self.tokenizer_source,
            "config": self.model_config,
        }
        if self.trust_remote_code:
            args["trust_remote_code"] = True
        if self.attn_implementation != "sdpa":
            args["attn_implementation"] = self.attn_implementation
        return args
