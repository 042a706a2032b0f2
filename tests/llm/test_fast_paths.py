"""LLM fast paths: the attention kernel is chosen by config, and compile wraps decoder layers."""

from __future__ import annotations

import pytest
from conftest import tiny_llm_config

from mmalign.llm.load import CausalLM, decoder_layers


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_attention_implementation_reaches_the_model(tokenizer_dir, attn) -> None:
    llm = CausalLM(
        "random", tokenizer=str(tokenizer_dir), config=tiny_llm_config(), attn_implementation=attn
    )
    assert llm.model.config._attn_implementation == attn
    assert llm.init_config().get("attn_implementation", "sdpa") == attn  # rebuilt the same


def test_compile_wraps_every_decoder_layer_only(tokenizer_dir) -> None:
    plain = CausalLM("random", tokenizer=str(tokenizer_dir), config=tiny_llm_config())
    layers = decoder_layers(plain.model)
    assert len(layers) == tiny_llm_config()["num_hidden_layers"]
    assert all(layer._compiled_call_impl is None for layer in layers)
    compiled = CausalLM(
        "random", tokenizer=str(tokenizer_dir), config=tiny_llm_config(), compile=True
    )
    assert all(layer._compiled_call_impl is not None for layer in decoder_layers(compiled.model))
    others = [m for m in compiled.model.modules() if m not in decoder_layers(compiled.model)]
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in others)
