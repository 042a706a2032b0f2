"""The projector family: lengths, padding independence, designs, rebuild from init_config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from mmalign.components import build, spec
from mmalign.projectors.base import Projector
from mmalign.projectors.conv import ConvProjector
from mmalign.projectors.linear import LinearProjector
from mmalign.projectors.mlp import MLPProjector
from mmalign.projectors.qformer import WindowQFormerProjector
from mmalign.projectors.swiglu import SwiGLUProjector

D, H = 12, 20
LENGTHS = [23, 14, 1]

FACTORIES = {
    "linear-stack": lambda: LinearProjector(D, H, rate=4),
    "linear-avgpool-norm": lambda: LinearProjector(D, H, rate=3, mode="avgpool", norm=True),
    "mlp-norm": lambda: MLPProjector(D, H, rate=3, hidden_dim=16, activation="relu", norm=True),
    "swiglu": lambda: SwiGLUProjector(D, H, rate=4, hidden_dim=18),
    "swiglu-no-post": lambda: SwiGLUProjector(D, H, rate=1, hidden_dim=8, post_norm=False),
    "conv": lambda: ConvProjector(D, H, rate=4),
    "conv-overlap": lambda: ConvProjector(D, H, rate=3, kernel_size=7, hidden_dim=10, norm=True),
    "qformer": lambda: WindowQFormerProjector(
        D, H, window=5, num_queries=3, hidden_size=16, num_layers=2, num_heads=4
    ),
}
RATES = {  # output tokens of a row of n frames
    "linear-stack": lambda n: -(-n // 4),
    "linear-avgpool-norm": lambda n: -(-n // 3),
    "mlp-norm": lambda n: -(-n // 3),
    "swiglu": lambda n: -(-n // 4),
    "swiglu-no-post": lambda n: n,
    "conv": lambda n: -(-n // 4),
    "conv-overlap": lambda n: -(-n // 3),
    "qformer": lambda n: -(-n // 5) * 3,
}


def make(name: str) -> Projector:
    torch.manual_seed(0)
    return FACTORIES[name]().eval()


def features(fill: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(3, max(LENGTHS), D, generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor(LENGTHS)
    if fill is not None:
        for i, n in enumerate(LENGTHS):
            x[i, n:] = fill
    return x, lengths


@pytest.mark.parametrize("name", list(FACTORIES))
def test_lengths_and_padding_independence(name):
    proj = make(name)
    x, lengths = features()
    with torch.no_grad():
        y, out = proj(x, lengths)
        y_big, _ = proj(*features(fill=1e4))
    assert out.tolist() == [RATES[name](n) for n in LENGTHS]
    assert y.shape == (3, max(out.tolist()), H)
    for i, n in enumerate(out.tolist()):
        torch.testing.assert_close(y_big[i, :n], y[i, :n])
        assert not y[i, n:].any(), "padded outputs are exact zeros"
        # a row alone, without any padding, gives the same tokens as in the batch
        with torch.no_grad():
            alone, alone_len = proj(x[i : i + 1, : LENGTHS[i]], lengths[i : i + 1])
        assert alone_len.item() == n
        torch.testing.assert_close(alone[0], y[i, :n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_every_parameter_trains_and_config_rebuilds(name):
    proj = make(name).train()
    x, lengths = features()
    y, out = proj(x, lengths)
    (y.square().mean() + proj.boundary.sum()).backward()
    unused = [n for n, p in proj.named_parameters() if p.grad is None]
    assert not unused, f"parameters that never get a gradient break DDP: {unused}"
    rebuilt = build(spec(proj), D, H)
    assert type(rebuilt) is type(proj) and rebuilt.init_config() == proj.init_config()
    rebuilt.load_state_dict(proj.state_dict())  # same architecture, key for key
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x, lengths)[0], proj.eval()(x, lengths)[0])


def test_parameter_counts():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    boundary = 2 * H
    assert count(LinearProjector(D, H, rate=4)) == 4 * D * H + H + boundary
    assert count(SwiGLUProjector(D, H, rate=4, hidden_dim=18)) == (
        4 * D + 4 * D * 18 + 9 * H + H + boundary
    )
    assert count(ConvProjector(D, H, rate=4, hidden_dim=10)) == (
        D * 10 * 4 + 10 + 10 * H + H + boundary
    )


def test_swiglu_is_ultravox_projector():
    """Same numbers as Ultravox's StackAudioFrames + projector written out with its own parts."""
    proj = make("swiglu")
    x = torch.randn(2, 8, D)
    y, _ = proj(x, torch.tensor([8, 8]))
    stacked = x.reshape(2, 2, 4 * D)  # StackAudioFrames(4), nothing to pad
    ln_pre = LlamaRMSNorm(4 * D, eps=1e-6)
    ln_pre.weight.data.fill_(0.4)
    h = proj.linear_1(ln_pre(stacked))
    a, gate = h.chunk(2, dim=-1)
    ln_post = LlamaRMSNorm(H, eps=1e-6)
    ln_post.weight.data.fill_(0.4)
    torch.testing.assert_close(y, ln_post(proj.linear_2(F.silu(gate) * a)))


def test_conv_windows_cover_their_frames():
    proj = ConvProjector(D, H, rate=3, kernel_size=3).eval()
    x = torch.randn(1, 9, D)
    y, _ = proj(x, torch.tensor([9]))
    x2 = x.clone()
    x2[0, 3:6] += 1.0  # window 1 only
    y2, _ = proj(x2, torch.tensor([9]))
    assert torch.equal(y[0, 0], y2[0, 0]) and torch.equal(y[0, 2], y2[0, 2])
    assert not torch.allclose(y[0, 1], y2[0, 1])


def test_qformer_windows_are_independent():
    proj = make("qformer")
    x = torch.randn(1, 15, D)
    with torch.no_grad():
        y, n = proj(x, torch.tensor([15]))
        x2 = x.clone()
        x2[0, 5:10] = torch.randn(5, D)  # window 1 -> queries 3..5
        y2, _ = proj(x2, torch.tensor([15]))
    assert n.item() == 9
    torch.testing.assert_close(y2[0, :3], y[0, :3])
    torch.testing.assert_close(y2[0, 6:], y[0, 6:])
    assert not torch.allclose(y2[0, 3:6], y[0, 3:6])


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: SwiGLUProjector(D, H, hidden_dim=7), "even"),
        (lambda: ConvProjector(D, H, rate=4, kernel_size=2), "kernel_size"),
        (lambda: ConvProjector(D, H, activation="nope"), "activation"),
        (lambda: WindowQFormerProjector(D, H, hidden_size=10, num_heads=4), "num_heads"),
        (lambda: WindowQFormerProjector(D, H, window=0), "window"),
        (lambda: LinearProjector(D, H, rate=0), "rate"),
    ],
)
def test_bad_settings_name_the_field(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()
