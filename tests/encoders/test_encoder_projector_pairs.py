"""Every encoder x projector pair on tiny random models: exact shapes and lengths, no padding leak.

Lengths are odd on purpose (partial compression groups, partial Q-Former windows, WavLM conv
remainders). The leak check fills every padded input position with other values and asserts that
the valid outputs do not move. CLIP video pairs are checked here at the module level only: the data
layer does not put video in batches yet, so they have no CLI fit.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_clip_config, tiny_wavlm_config, tiny_whisper_config

from mmalign.encoders.base import Encoder
from mmalign.encoders.clip_video import CLIPVideoEncoder
from mmalign.encoders.fusion import DualEncoder
from mmalign.encoders.wavlm import WavLMEncoder
from mmalign.encoders.whisper import WhisperEncoder
from mmalign.projectors.base import Projector
from mmalign.projectors.conv import ConvProjector
from mmalign.projectors.linear import LinearProjector
from mmalign.projectors.mlp import MLPProjector
from mmalign.projectors.qformer import WindowQFormerProjector
from mmalign.projectors.swiglu import SwiGLUProjector

LLM_WIDTH = 24
SAMPLES = [8001, 5439, 2567]  # 16 kHz samples: odd, and not multiples of WavLM's 320 hop
VIDEO_FRAMES = [9, 5, 1]

ENCODERS = {
    "whisper": lambda: WhisperEncoder("random", config=tiny_whisper_config()),
    "wavlm": lambda: WavLMEncoder("random", config=tiny_wavlm_config()),
    "wavlm-large-weighted": lambda: WavLMEncoder(
        "random", config=tiny_wavlm_config(layer_norm=True), weighted_sum=True
    ),
    "whisper+wavlm": lambda: DualEncoder(
        WhisperEncoder("random", config=tiny_whisper_config()),
        WavLMEncoder("random", config=tiny_wavlm_config(), weighted_sum=True),
    ),
    "clip-video": lambda: CLIPVideoEncoder("tiny", config=tiny_clip_config(), chunk_size=4),
}


def by_three(n: int) -> int:
    return -(-n // 3)


# (factory, output length of a row of n frames)
PROJECTORS = {
    "linear": (lambda d, h: LinearProjector(d, h, rate=3, norm=True), by_three),
    "mlp": (lambda d, h: MLPProjector(d, h, rate=3, mode="avgpool", hidden_dim=16), by_three),
    "swiglu": (lambda d, h: SwiGLUProjector(d, h, rate=3, hidden_dim=16), by_three),
    "conv": (lambda d, h: ConvProjector(d, h, rate=3, kernel_size=5, hidden_dim=16), by_three),
    "qformer": (
        lambda d, h: WindowQFormerProjector(
            d, h, window=5, num_queries=2, hidden_size=16, num_layers=1, num_heads=2
        ),
        lambda n: -(-n // 5) * 2,
    ),
}


def wavlm_frames(n: int) -> int:
    for kernel, stride in zip((10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2), strict=True):
        n = (n - kernel) // stride + 1
    return n


def make_batch(kind: str, fill: float | None = None, seed: int = 0) -> dict:
    """Inputs for every encoder kind; ``fill`` overwrites all padded positions."""
    g = torch.Generator().manual_seed(seed)
    samples = torch.tensor(SAMPLES)
    mel = torch.tensor([math.ceil(s / 160) for s in SAMPLES])
    batch = {
        "audio": 0.1 * torch.randn(3, max(SAMPLES), generator=g),
        "audio_sample_lengths": samples,
        "audio_features": torch.randn(3, 80, int(mel.max()) + 1, generator=g),  # +1: even T
        "audio_lengths": mel,
        "video": torch.randint(0, 256, (3, max(VIDEO_FRAMES), 1, 40, 36), generator=g).to(
            torch.uint8
        ),
        "video_lengths": torch.tensor(VIDEO_FRAMES),
    }
    if fill is not None:
        for i in range(3):
            batch["audio"][i, SAMPLES[i] :] = fill
            batch["audio_features"][i, :, int(mel[i]) :] = fill
            batch["video"][i, VIDEO_FRAMES[i] :] = int(fill) % 256
    return batch


def expected_encoder_lengths(kind: str) -> list[int]:
    whisper = [math.ceil(math.ceil(s / 160) / 2) for s in SAMPLES]
    wavlm = [wavlm_frames(s) for s in SAMPLES]
    return {
        "whisper": whisper,
        "wavlm": wavlm,
        "wavlm-large-weighted": wavlm,
        "whisper+wavlm": [min(a, b) for a, b in zip(whisper, wavlm, strict=True)],
        "clip-video": VIDEO_FRAMES,
    }[kind]


@pytest.fixture(scope="module", params=list(ENCODERS))
def encoder(request) -> tuple[str, Encoder, dict]:
    """(kind, encoder, fill -> encoder outputs): each encoder runs once per fill, not per pair."""
    torch.manual_seed(0)
    enc = ENCODERS[request.param]()
    with torch.no_grad():
        outputs = {
            fill: enc.encode_batch(make_batch(request.param, fill)) for fill in (None, 0.0, 7.0)
        }
    return request.param, enc, outputs


@pytest.mark.parametrize("proj_name", list(PROJECTORS))
def test_pair_shapes_lengths_and_no_padding_leak(encoder, proj_name):
    kind, enc, outputs = encoder
    make_proj, out_len = PROJECTORS[proj_name]
    torch.manual_seed(1)
    projector: Projector = make_proj(enc.dim, LLM_WIDTH).eval()
    feats, lengths = outputs[None]
    with torch.no_grad():
        emb, emb_lengths = projector(feats, lengths)
    assert feats.shape[0] == 3 and feats.shape[2] == enc.dim
    assert lengths.tolist() == expected_encoder_lengths(kind)
    assert feats.shape[1] == max(lengths.tolist())
    assert emb_lengths.tolist() == [out_len(n) for n in lengths.tolist()]
    assert emb.shape == (3, max(emb_lengths.tolist()), LLM_WIDTH)
    assert torch.isfinite(emb).all()
    for fill in (0.0, 7.0):
        with torch.no_grad():
            emb2, lengths2 = projector(*outputs[fill])
        assert torch.equal(lengths2, emb_lengths)
        for i, n in enumerate(emb_lengths.tolist()):
            torch.testing.assert_close(emb2[i, :n], emb[i, :n], rtol=1e-5, atol=1e-5)
