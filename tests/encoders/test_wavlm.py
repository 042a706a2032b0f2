"""WavLMEncoder against transformers' own feature extractor and model; weighted sum; LoRA."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_wavlm_config
from peft import LoraConfig
from transformers import Wav2Vec2FeatureExtractor

from mmalign.components import build, spec
from mmalign.encoders.base import Encoder
from mmalign.encoders.wavlm import WavLMEncoder, receptive_field

SAMPLES = [6401, 3519, 1000]


def encoder(layer_norm: bool = False, **kwargs) -> WavLMEncoder:
    torch.manual_seed(0)
    return WavLMEncoder("random", config=tiny_wavlm_config(layer_norm), **kwargs)


def waves(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(0.3 * rng.standard_normal(n) + 0.05).astype(np.float32) for n in SAMPLES]


def padded(ws: list[np.ndarray], fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    audio = torch.full((len(ws), max(len(w) for w in ws)), fill)
    for i, w in enumerate(ws):
        audio[i, : len(w)] = torch.from_numpy(w)
    return audio, torch.tensor([len(w) for w in ws])


def test_attributes_and_lengths():
    enc = encoder()
    assert isinstance(enc, Encoder)
    assert (enc.dim, enc.frame_rate, enc.min_samples) == (32, 50.0, 400)
    assert receptive_field(enc.model.config) == 400
    assert enc.input_keys == ("audio", "audio_sample_lengths")
    assert not enc.use_attention_mask and encoder(layer_norm=True).use_attention_mask
    feats, lengths = enc(*padded(waves()))
    expected = enc.model._get_feat_extract_output_lengths(torch.tensor(SAMPLES))
    assert lengths.tolist() == expected.tolist() == [19, 10, 2]
    assert feats.shape == (3, 19, 32)
    assert not feats[1, 10:].any() and not feats[2, 2:].any()


def test_normalisation_is_the_feature_extractors():
    extractor = Wav2Vec2FeatureExtractor(return_attention_mask=True)
    ws = waves()
    ref = extractor(ws, sampling_rate=16000, padding="longest", return_tensors="pt")
    ours = encoder().normalize(*padded(ws, fill=3.0))
    torch.testing.assert_close(ours, ref["input_values"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layer_norm", [False, True], ids=["group-no-mask", "layer-masked"])
def test_equals_transformers_on_extractor_inputs(layer_norm):
    """Same valid frames as WavLMModel fed the way transformers' docs say for that variant."""
    enc = encoder(layer_norm)
    ws = waves()
    # normalised per utterance over its own samples, zero-padded; the mask only for "layer"
    extractor = Wav2Vec2FeatureExtractor(return_attention_mask=True)
    ref_in = extractor(ws, sampling_rate=16000, padding="longest", return_tensors="pt")
    mask = ref_in["attention_mask"] if layer_norm else None
    with torch.no_grad():
        ref = enc.model(ref_in["input_values"], attention_mask=mask).last_hidden_state
    ours, lengths = enc(*padded(ws, fill=-5.0))
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(ours[i, :n], ref[i, :n], rtol=1e-4, atol=1e-4)


def test_masked_variant_ignores_padding_amount():
    enc = encoder(layer_norm=True)
    ws = waves()
    batched, lengths = enc(*padded(ws))
    for i, w in enumerate(ws):
        alone, n = enc(*padded([w]))
        torch.testing.assert_close(
            alone[0, : n.item()], batched[i, : lengths[i]], atol=1e-4, rtol=1e-4
        )


def test_weighted_sum_trains_only_layer_weights():
    enc = encoder(weighted_sum=True)
    assert enc.layer_weights.numel() == 3  # CNN projection + 2 layers
    trainable = [n for n, p in enc.named_parameters() if p.requires_grad]
    assert trainable == ["layer_weights"]
    enc.train()
    assert not enc.training and not enc.model.training  # frozen: dropout/SpecAugment stay off
    audio, lengths = padded(waves())
    feats, n = enc(audio, lengths)
    with torch.no_grad():  # zero weights -> softmax is uniform -> the mean of all hidden states
        states = enc.model(enc.normalize(audio, lengths), output_hidden_states=True).hidden_states
    assert len(states) == 3
    mean = torch.stack(states).mean(0)
    for i, k in enumerate(n.tolist()):
        torch.testing.assert_close(feats[i, :k], mean[i, :k], rtol=1e-5, atol=1e-5)
    feats.square().mean().backward()
    assert enc.layer_weights.grad is not None and enc.layer_weights.grad.abs().sum() > 0
    assert all(p.grad is None for p in enc.model.parameters())


def test_lora_on_the_encoder_and_rebuild():
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["intermediate_dense", "output_dense"])
    enc = encoder(lora=lora)
    trainable = [n for n, p in enc.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # 2 layers x (intermediate, output) x (A, B)
    feats, _ = enc(*padded(waves()))
    feats.sum().backward()
    assert all(p.grad is not None for n, p in enc.named_parameters() if "lora_" in n)
    description = json.loads(json.dumps(spec(enc)))  # what checkpoints and exports store
    rebuilt = build(description)
    assert sorted(rebuilt.state_dict()) == sorted(enc.state_dict())
    assert [n for n, p in rebuilt.named_parameters() if p.requires_grad] == trainable


def test_lora_where_it_would_never_run_is_refused():
    # WavLM's attention hands q/k/v/out_proj weights to F.multi_head_attention_forward
    with pytest.raises(ValueError, match="WavLMEncoder.lora.target_modules"):
        encoder(lora=LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))


def test_short_clip_and_bad_inputs():
    enc = encoder()
    feats, lengths = enc(torch.randn(2, 250), torch.tensor([250, 100]))  # under 25 ms
    assert lengths.tolist() == [1, 1] and feats.shape == (2, 1, 32)
    with pytest.raises(ValueError, match="waveforms"):
        enc(torch.randn(2, 80, 10), torch.tensor([10, 10]))
    with pytest.raises(ValueError, match="config"):
        WavLMEncoder("random")
    with pytest.raises(KeyError, match="keep_waveform"):
        enc.encode_batch({"audio_features": torch.zeros(1, 80, 4), "audio_lengths": torch.ones(1)})
