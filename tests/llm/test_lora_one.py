"""LoRA-One: the factors span the top singular subspaces of the full gradient (checked against a
dense backward + torch.linalg.svd), computed holding one layer's dense gradient at a time."""

from __future__ import annotations

import weakref

import pytest
import torch
from conftest import tiny_batch, tiny_llm_config, tiny_whisper_config
from torch import nn

from mmalign.llm import calibration, lora_one, offsets, tuners
from mmalign.llm.lora_one import GradientSketch, lora_one_factors, sketch_gradients, sketch_rank

QV = ["q_proj", "v_proj"]


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the column spaces of ``a`` and ``b``."""
    qa, _ = torch.linalg.qr(a.double())
    qb, _ = torch.linalg.qr(b.double())
    return torch.linalg.svdvals(qa.T @ qb)


def linear_problem(seed: int = 0, d_in: int = 12, hidden: int = 10, d_out: int = 8):
    """Two stacked linear layers fitting a target that differs from them by low-rank shifts."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Identity(), nn.Linear(d_in, hidden, bias=False), nn.Linear(hidden, d_out, bias=False)
    )
    model.requires_grad_(False)
    truth = nn.Sequential(nn.Linear(d_in, hidden, bias=False), nn.Linear(hidden, d_out, bias=False))
    with torch.no_grad():
        for mine, target in zip(model[1:], truth, strict=True):
            w = mine.weight
            shift = torch.randn(w.shape[0], 2, generator=g) @ torch.randn(
                2, w.shape[1], generator=g
            )
            target.weight.copy_(w + shift)
    batches = []
    for _ in range(3):
        x = torch.randn(16, 5, d_in, generator=g)
        with torch.no_grad():
            batches.append((x, truth(x)))
    return model, batches


def mse(model: nn.Module):
    return lambda batch: (model(batch[0]) - batch[1]).pow(2).mean()


def dense_gradients(model: nn.Module, batches, names=("1", "2")) -> dict[str, torch.Tensor]:
    """Mean gradient of each weight: a plain full backward with every weight requiring grad."""
    layers = {n: model.get_submodule(n) for n in names}
    for layer in layers.values():
        layer.weight.requires_grad_(True)
    try:
        for batch in batches:
            mse(model)(batch).backward()
        return {n: layer.weight.grad / len(batches) for n, layer in layers.items()}
    finally:
        for layer in layers.values():
            layer.weight.requires_grad_(False)
            layer.weight.grad = None


@pytest.mark.parametrize("r", [1, 3])
def test_factors_span_the_top_singular_subspace_of_the_dense_gradient(r):
    model, batches = linear_problem()
    reference = dense_gradients(model, batches)
    linears = [("1", model[1]), ("2", model[2])]
    ranks = {n: sketch_rank(r, tuple(m.weight.shape)) for n, m in linears}
    sketches, count = sketch_gradients(model, linears, ranks, mse(model), batches, model[0])
    assert count == len(batches)
    for name, _ in linears:
        G = reference[name]
        U, S, Vh = torch.linalg.svd(-G)  # LoRA-One decomposes the negative gradient
        B, A = lora_one_factors(*sketches[name].factors(count), r=r, gamma=16.0)
        assert B.shape == (G.shape[0], r) and A.shape == (r, G.shape[1])
        torch.testing.assert_close(cosines(B, U[:, :r]), torch.ones(r, dtype=torch.float64))
        torch.testing.assert_close(cosines(A.T, Vh[:r].T), torch.ones(r, dtype=torch.float64))
        # the documented scaling: B0 A0 = -[G]_r / (gamma * sigma_1), split sqrt(S) each side
        best = (U[:, :r] * S[:r]) @ Vh[:r]
        torch.testing.assert_close(B @ A, best / (16.0 * S[0]), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(B.norm(dim=0), A.norm(dim=1))


def test_sketch_keeps_the_top_subspace_beyond_its_rank():
    """More batches than the sketch's rank can hold exactly: a clear spectral gap survives."""
    g = torch.Generator().manual_seed(1)
    top = torch.randn(40, 2, generator=g) @ torch.randn(2, 30, generator=g) * 10
    parts = [top / 6 + 0.05 * torch.randn(40, 30, generator=g) for _ in range(6)]
    sketch = GradientSketch(rank=6)
    for p in parts:
        sketch.add(p.clone())
    U, S, Vh = sketch.factors(len(parts))
    total = torch.stack(parts).mean(0)
    U_ref, _, Vh_ref = torch.linalg.svd(total)
    assert cosines(U[:, :2], U_ref[:, :2]).min() > 1 - 1e-4
    assert cosines(Vh[:2].T, Vh_ref[:2].T).min() > 1 - 1e-4


def test_randomised_sketch_of_large_layers_matches_the_full_svd(monkeypatch):
    """Layers wider than FULL_SVD_MAX_DIM merge with a seeded randomised SVD."""
    g = torch.Generator().manual_seed(2)
    decay = 0.5 ** torch.arange(40.0)
    parts = [
        (torch.randn(300, 40, generator=g) * decay) @ torch.randn(40, 200, generator=g)
        for _ in range(4)
    ]
    sketches = {}
    for limit in (1000, 100):  # full SVD, then randomised
        monkeypatch.setattr(lora_one, "FULL_SVD_MAX_DIM", limit)
        sketches[limit] = GradientSketch(rank=16)
        for p in parts:
            sketches[limit].add(p.clone())
    (U1, S1, V1), (U2, S2, V2) = (sketches[k].factors(4) for k in (1000, 100))
    torch.testing.assert_close(S2[:8], S1[:8], rtol=1e-4, atol=1e-6)
    assert cosines(U2[:, :8], U1[:, :8]).min() > 1 - 1e-6
    assert cosines(V2[:8].T, V1[:8].T).min() > 1 - 1e-6


def test_one_dense_gradient_alive_at_a_time(monkeypatch):
    """Every dense layer gradient is created by ``dense_gradient``; count those alive."""
    alive: weakref.WeakSet = weakref.WeakSet()
    peak, calls = [0], [0]
    original = lora_one.dense_gradient

    def spy(grad_output, inputs):
        dense = original(grad_output, inputs)
        alive.add(dense)
        calls[0] += 1
        peak[0] = max(peak[0], len(alive))
        return dense

    monkeypatch.setattr(lora_one, "dense_gradient", spy)
    model, batches = linear_problem(d_in=64, hidden=48, d_out=32)
    linears = [("1", model[1]), ("2", model[2])]
    ranks = {n: 4 for n, _ in linears}
    sketch_gradients(model, linears, ranks, mse(model), batches, model[0])
    assert calls[0] == len(linears) * len(batches)
    assert peak[0] == 1
    assert all(m.weight.grad is None and not m.weight.requires_grad for _, m in linears)


def _speech_llm(adapter, tokenizer_dir):
    from mmalign.encoders.whisper import WhisperEncoder
    from mmalign.llm.load import CausalLM
    from mmalign.model import SpeechLLM
    from mmalign.projectors.mlp import MLPProjector

    torch.manual_seed(0)
    encoder = WhisperEncoder(source="random", config=tiny_whisper_config())
    llm = CausalLM(
        "random", adapter=adapter, tokenizer=str(tokenizer_dir), config=tiny_llm_config()
    )
    return SpeechLLM(encoder, MLPProjector(encoder.dim, llm.hidden_size, rate=2), llm)


def test_lora_one_on_the_llm_matches_a_dense_backward(tokenizer_dir):
    """Through the real model forward: each target's factors span the top-r singular
    subspaces of the dense gradient of the training loss; the frozen weights are untouched."""
    r, gamma = 4, 16.0
    adapter = tuners.LoraConfig(
        r=r,
        lora_alpha=8,
        target_modules=QV,
        init_lora_weights="lora_one",
        lora_one_config={"gamma": gamma},
    )
    model = _speech_llm(adapter, tokenizer_dir)
    batches = [tiny_batch()]
    layers = offsets.lora_layers(model.llm.model)
    weights = {n: layer.get_base_layer().weight for n, layer in layers}
    before = {n: w.detach().clone() for n, w in weights.items()}
    # the reference: a plain full backward with every target weight requiring grad
    model.eval()
    for w in weights.values():
        w.requires_grad_(True)
    with model.llm.model.disable_adapter():
        model(batches[0]).backward()
    reference = {n: w.grad.clone() for n, w in weights.items()}
    for p in model.parameters():
        p.grad = None
    for w in weights.values():
        w.requires_grad_(False)

    assert calibration.initialize_adapter(model.llm, model, batches) == "lora_one"
    for name, layer in layers:
        U, S, Vh = torch.linalg.svd(-reference[name])
        B, A = layer.lora_B["default"].weight, layer.lora_A["default"].weight
        assert cosines(B, U[:, :r]).min() > 1 - 1e-4, name
        assert cosines(A.T, Vh[:r].T).min() > 1 - 1e-4, name
        best = (U[:, :r] * S[:r]) @ Vh[:r]
        torch.testing.assert_close(B @ A, best / (gamma * S[0]), rtol=1e-3, atol=1e-5)
        assert torch.equal(weights[name], before[name])  # W is left unchanged
        assert weights[name].grad is None
