"""Shared decoding helpers: length-sorted batches, beams, waveform encoders, rates, hashes."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

from mmalign.encoders.base import Encoder
from mmalign.inference.decode import (
    DecodeOptions,
    decode_samples,
    length_sorted_batches,
    model_sha256,
    needs_waveform,
    select_rates,
)
from mmalign.model import SpeechLLM
from mmalign.projectors.mlp import MLPProjector


def samples(durations: list[float]) -> list[dict]:
    return [
        {"audio": torch.randn(int(16000 * d)) * 0.1, "text": "", "duration": d, "task": "asr"}
        for d in durations
    ]


def test_batches_are_length_sorted_and_capped():
    batches = length_sorted_batches(samples([1.0, 3.0, 2.0, 2.5, 0.5]), 6.0, 2)
    assert batches == [[1, 3], [2, 0], [4]]  # longest first; 3 s x 2 fits, 2 s x 3 would not cap
    assert length_sorted_batches(samples([1.0, 1.0, 1.0]), 2.5, None) == [[0, 1], [2]]


def test_beam_search_decodes_a_batch_in_input_order(tiny_parts):
    encoder, llm = tiny_parts
    torch.manual_seed(0)
    projector = MLPProjector(encoder.dim, llm.hidden_size, rate=2)
    with torch.no_grad():
        projector.net[-1].weight.mul_(30.0)  # loud audio: outputs that tell samples apart
    model = SpeechLLM(encoder, projector, llm).eval()
    batch = samples([0.3, 0.6, 0.4])
    for s, hz in zip(batch, (150.0, 1200.0, 4000.0), strict=True):  # tones that differ
        s["audio"] = 0.5 * torch.sin(2 * torch.pi * hz * torch.arange(len(s["audio"])) / 16000)
    options = DecodeOptions(batch_size=3, max_new_tokens=3)
    greedy = decode_samples(model, batch, options)
    assert greedy == decode_samples(model, batch, options)  # greedy is deterministic
    beam_options = DecodeOptions(num_beams=2, max_new_tokens=8)
    beams = decode_samples(model, batch, beam_options)
    # batched (length-sorted inside) and back in input order: each equals that sample alone
    assert beams == [decode_samples(model, [s], beam_options)[0] for s in batch]
    assert len(set(beams)) > 1


def test_results_come_back_in_input_order(tiny_parts, monkeypatch):
    encoder, llm = tiny_parts
    model = SpeechLLM(encoder, MLPProjector(encoder.dim, llm.hidden_size, rate=2), llm).eval()
    seen: list[list[float]] = []

    def fake_generate(batch, **kwargs):
        seen.append([round(d, 1) for d in batch["durations"].tolist()])
        return [f"{d:.1f}" for d in batch["durations"].tolist()]

    monkeypatch.setattr(model, "generate", fake_generate)
    out = decode_samples(model, samples([0.3, 0.6, 0.4, 0.5]), DecodeOptions(batch_size=2))
    assert out == ["0.3", "0.6", "0.4", "0.5"]
    assert seen == [[0.6, 0.5], [0.4, 0.3]]  # decoded longest first


class WaveEncoder(Encoder):
    """Test double of a waveform encoder (WavLM-like): 320-sample frames, one Linear."""

    input_key = "audio"
    lengths_key = "audio_sample_lengths"

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.dim, self.frame_rate, self.seen = dim, 50.0, []
        self.proj = nn.Linear(320, dim)

    def forward(self, inputs, lengths):
        self.seen.append(tuple(inputs.shape))
        frames = inputs.shape[1] // 320
        x = inputs[:, : frames * 320].reshape(inputs.shape[0], frames, 320)
        return self.proj(x), torch.div(lengths, 320, rounding_mode="floor").clamp(min=1)


def test_waveform_encoders_get_waveforms(tiny_parts):
    _, llm = tiny_parts
    encoder = WaveEncoder()
    model = SpeechLLM(encoder, MLPProjector(encoder.dim, llm.hidden_size, rate=2), llm).eval()
    assert needs_waveform(model)
    decode_samples(model, samples([0.5, 0.3]), DecodeOptions(max_new_tokens=2))
    assert encoder.seen == [(2, 8000)]


def test_single_rate_models_decode_at_their_rate(tiny_parts):
    encoder, llm = tiny_parts
    model = SpeechLLM(encoder, MLPProjector(encoder.dim, llm.hidden_size, rate=2), llm)
    assert select_rates(model) == [2] and select_rates(model, [2]) == [2]
    with pytest.raises(ValueError, match="single compression rate"):
        select_rates(model, [2, 4])


def test_export_hash_covers_names_and_contents(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"1")
    (tmp_path / "y.json").write_text("{}")
    first = model_sha256(tmp_path)
    assert model_sha256(tmp_path / "y.json") == hashlib.sha256(b"{}").hexdigest()
    (tmp_path / "a" / "x.bin").write_bytes(b"2")
    assert model_sha256(tmp_path) != first
    (tmp_path / "a" / "x.bin").write_bytes(b"1")
    assert model_sha256(tmp_path) == first
    (tmp_path / "a" / "x.bin").rename(tmp_path / "a" / "z.bin")
    assert model_sha256(tmp_path) != first


def test_hub_generation_config_does_not_change_greedy_output(tmp_path, tokenizer_dir):
    """A generation_config.json's repetition_penalty (as Qwen2.5-Instruct ships) is ignored."""
    from conftest import tiny_batch, tiny_llm_config, tiny_whisper_config
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from mmalign.encoders.whisper import WhisperEncoder
    from mmalign.llm.load import CausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_llm_config())).eval()
    hf.save_pretrained(tmp_path / "plain")
    hf.generation_config = GenerationConfig(repetition_penalty=1.3)
    hf.save_pretrained(tmp_path / "hub")
    ids = torch.tensor([[5, 6, 7]])  # this tiny model falls into a loop: the penalty bites
    plain = hf.generate(ids, max_new_tokens=64, do_sample=False, repetition_penalty=1.0)
    hub = AutoModelForCausalLM.from_pretrained(tmp_path / "hub").eval()
    assert hub.generation_config.repetition_penalty == 1.3
    assert not torch.equal(hub.generate(ids, max_new_tokens=64, do_sample=False), plain)

    def decode(source: str) -> list[str]:
        torch.manual_seed(0)
        encoder = WhisperEncoder("random", config=tiny_whisper_config())
        llm = CausalLM(source, tokenizer=str(tokenizer_dir))
        torch.manual_seed(2)
        model = SpeechLLM(encoder, MLPProjector(encoder.dim, llm.hidden_size, rate=2), llm)
        torch.manual_seed(1)
        return model.eval().generate(tiny_batch(), max_new_tokens=64)

    texts = decode(str(tmp_path / "plain"))
    assert decode(str(tmp_path / "hub")) == texts
    assert any(len(t.split()) > 2 for t in texts)
