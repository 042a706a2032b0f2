"""DualEncoder (WavLLM): per-encoder batch keys, frame alignment, concatenation, rebuild."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_wavlm_config, tiny_whisper_config

from mmalign.components import build, spec
from mmalign.encoders.base import Encoder
from mmalign.encoders.fusion import DualEncoder, resample_frames
from mmalign.encoders.wavlm import WavLMEncoder
from mmalign.encoders.whisper import WhisperEncoder

SAMPLES = [8000, 4961]


class FakeEncoder(Encoder):
    """Frame i of row b is the value i (one channel) at a chosen rate: alignment is visible."""

    def __init__(self, frame_rate: float, key: str = "x") -> None:
        super().__init__()
        self.dim, self.frame_rate = 1, frame_rate
        self.input_key, self.lengths_key = key, f"{key}_lengths"

    def forward(self, inputs, lengths):
        return inputs[..., None].float(), lengths


def dual() -> DualEncoder:
    torch.manual_seed(0)
    return DualEncoder(
        WhisperEncoder("random", config=tiny_whisper_config()),
        WavLMEncoder("random", config=tiny_wavlm_config(), weighted_sum=True),
    )


def batch() -> dict:
    mel = [math.ceil(s / 160) for s in SAMPLES]
    return {
        "audio_features": torch.randn(2, 80, max(mel)),
        "audio_lengths": torch.tensor(mel),
        "audio": torch.randn(2, max(SAMPLES)) * 0.1,
        "audio_sample_lengths": torch.tensor(SAMPLES),
    }


def test_resample_frames_averages_valid_frames_only():
    x = torch.arange(8.0).reshape(1, 8, 1).repeat(2, 1, 1)
    x[1, 5:] = 1e6  # padding of row 1
    y, n = resample_frames(x, torch.tensor([8, 5]), 50.0, 25.0)
    assert n.tolist() == [4, 3]
    assert y[0, :, 0].tolist() == [0.5, 2.5, 4.5, 6.5]
    assert y[1, :3, 0].max() < 10  # no padding pooled in
    y, n = resample_frames(x, torch.tensor([8, 5]), 50.0, 30.0)  # non-integer ratio
    assert n.tolist() == [5, 3] and y.shape == (2, 5, 1)
    with pytest.raises(ValueError, match="downsamples"):
        resample_frames(x, torch.tensor([8, 5]), 25.0, 50.0)


def test_alignment_of_rates_and_lengths():
    fused = DualEncoder(FakeEncoder(50.0, "a"), FakeEncoder(25.0, "b"))
    assert (fused.dim, fused.frame_rate) == (2, 25.0)
    assert fused.input_keys == ("a", "a_lengths", "b", "b_lengths")
    a = torch.arange(10.0).repeat(2, 1)
    b = torch.arange(6.0).repeat(2, 1) * 100
    y, n = fused.encode_batch(
        {"a": a, "a_lengths": torch.tensor([10, 7]), "b": b, "b_lengths": torch.tensor([6, 3])}
    )
    assert n.tolist() == [5, 3]  # min(ceil(10 / 2), 6), min(ceil(7 / 2), 3)
    assert y.shape == (2, 5, 2)
    assert y[0, :, 0].tolist() == [0.5, 2.5, 4.5, 6.5, 8.5]
    assert y[0, :, 1].tolist() == [0.0, 100.0, 200.0, 300.0, 400.0]
    assert not y[1, 3:].any()


def test_whisper_plus_wavlm_concatenates_both():
    enc = dual()
    assert (enc.dim, enc.frame_rate, enc.n_mels) == (64, 50.0, 80)
    assert set(enc.input_keys) == {
        "audio_features",
        "audio_lengths",
        "audio",
        "audio_sample_lengths",
    }
    b = batch()
    fused, lengths = enc.encode_batch(b)
    w, wl = enc.first.encode_batch(b)
    v, vl = enc.second.encode_batch(b)
    assert wl.tolist() == [25, 16] and vl.tolist() == [24, 15]  # differ by a frame
    assert lengths.tolist() == [24, 15]
    assert fused.shape == (2, 24, 64)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(fused[i, :n], torch.cat([w[i, :n], v[i, :n]], -1))
    # only WavLM's layer weights are trainable; a frozen encoder stays in eval mode
    assert [n for n, p in enc.named_parameters() if p.requires_grad] == ["second.layer_weights"]
    enc.train()
    assert not enc.first.training and not enc.second.training


def test_missing_waveform_names_the_fix():
    b = batch()
    del b["audio"]
    with pytest.raises(KeyError, match="keep_waveform"):
        dual().encode_batch(b)


def test_rebuilds_from_its_description():
    enc = dual()
    description = json.loads(json.dumps(spec(enc)))
    assert description["init_args"]["second"]["class_path"].endswith("WavLMEncoder")
    rebuilt = build(description)
    rebuilt.load_state_dict(enc.state_dict())
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.encode_batch(b)[0], enc.encode_batch(b)[0])
