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


def test_frozen_encoder_runs_in_inference_mode_and_hands_out_normal_tensors(monkeypatch) -> None:
    import torch
    from conftest import tiny_batch, tiny_whisper_config

    from mmalign.encoders.whisper import WhisperEncoder

    encoder = WhisperEncoder(source="random", config=tiny_whisper_config())
    modes = []
    forward = encoder.forward

    def spy(*args):
        modes.append(torch.is_inference_mode_enabled())
        return forward(*args)

    monkeypatch.setattr(encoder, "forward", spy)
    features, lengths = encoder.encode_batch(tiny_batch())
    assert modes == [True]
    assert not features.is_inference() and not lengths.is_inference()
    weight = torch.randn(features.shape[-1], 2, requires_grad=True)
    (features @ weight).sum().backward()  # usable by a trainable projector
    assert weight.grad is not None
    encoder.model.layers[0].fc1.weight.requires_grad_(True)  # something trains: autograd mode
    modes.clear()
    encoder.encode_batch(tiny_batch())
    assert modes == [False]
