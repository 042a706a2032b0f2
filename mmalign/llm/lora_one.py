"""LoRA-One initialisation, and the layer-by-layer gradient sketches it (and LoRA-GA) start from.

LoRA-One (Zhang, Liu and Chen, "LoRA-One: One-Step Full Gradient Could Suffice for Fine-Tuning
Large Language Models, Provably and Efficiently", ICML 2025, arXiv:2502.01235) initialises every
LoRA target ``W`` (``d_out x d_in``) from the best rank-``r`` approximation of one full
fine-tuning gradient step. With ``G`` the gradient of the training loss with respect to ``W``,
averaged over a few batches, and ``-G = U diag(S) V^T`` (``S`` descending), mmalign sets, as the
reference implementation (github.com/YuanheZ/LoRA-One, ``direction: LoRA-One``, ``scale:
stable``) does::

    B0 = U[:, :r] diag(sqrt(S[:r])) / sqrt(gamma * S[0])        (d_out x r, peft's lora_B)
    A0 = diag(sqrt(S[:r])) V[:, :r]^T / sqrt(gamma * S[0])      (r x d_in,  peft's lora_A)

so that the adapter's initial update is ``scaling * B0 @ A0 = -(scaling / (gamma * S[0])) [G]_r``:
one rank-``r`` gradient-descent step of full fine-tuning whose spectral norm is ``scaling / gamma``
(``scaling`` is peft's ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA). ``W`` is left
unchanged, as in the paper's algorithm and the reference code: unlike PiSSA or LoRA-GA nothing is
subtracted from the frozen weight, so the model starts one step ahead rather than where it was,
and an export is a plain LoRA adapter. ``gamma`` (``LoraOneConfig.gamma``) is the paper's
stabilising scale. mmalign's default is 64, the value of the reference code's README example
run (its code defaults to 16): on the demo ASR task, 100 steps, 64 gave 3.2% WER, 128 5.6% and
16 20.0% (``bench/results/adapters_lora_one_gamma*.json``).
With DoRA the magnitude vector is recomputed from ``W + scaling * B0 @ A0``, as the reference
code does.

The gradient is never materialised for all layers at once. A forward hook on each target's frozen
``nn.Linear`` keeps the layer input ``x``; a hook on its output receives ``dL/dy`` during the
backward pass and forms that layer's gradient ``dL/dW = dy^T x`` (:func:`dense_gradient`), which
:class:`GradientSketch` folds at once into a rank-``k`` SVD and drops. The frozen weights never
require grad, so autograd keeps no ``.grad`` for them: at any moment at most one layer's dense
gradient exists. Over several batches the sketch merges each new gradient into its running
rank-``k`` factors (``k`` = ``2r`` or ``r + 8``, whichever is larger); that is exact when the
accumulated gradient has rank ``<= k`` (one batch of fewer than ``k`` target tokens, or a small
layer) and otherwise keeps the top-``r`` subspace up to the energy beyond the ``k``-th singular
value. The layer inputs are kept until the backward pass, as the LoRA ``A`` factors' own
backward keeps them during training.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

FULL_SVD_MAX_DIM = 256  # above this, the sketch update uses a randomised SVD


@dataclass
class LoraOneConfig:
    """LoRA-One settings (``lora_one_config`` of :class:`mmalign.llm.tuners.LoraConfig`).

    Args:
        gamma: the stabilising scale ``gamma``: the initial update is one rank-``r`` gradient
            step of spectral norm ``scaling / gamma`` (see :mod:`mmalign.llm.lora_one`).
    """

    gamma: float = 64.0

    def __post_init__(self) -> None:
        if not self.gamma > 0:
            raise ValueError(f"lora_one_config.gamma={self.gamma}: must be > 0")


def dense_gradient(grad_output: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """``dL/dW`` of a linear layer ``y = x W^T`` from ``dL/dy`` and ``x`` (any leading dims):
    ``sum over positions of dy^T x``, ``d_out x d_in`` in float32."""
    g = grad_output.reshape(-1, grad_output.shape[-1]).float()
    x = inputs.reshape(-1, inputs.shape[-1]).float()
    return g.T @ x


class GradientSketch:
    """A running rank-``k`` SVD of a sum of dense matrices, each folded in and dropped.

    ``add(G)`` replaces the factors by the top-``k`` SVD of ``U diag(S) Vh + G`` (``G`` is
    updated in place, so only one dense matrix lives at a time); :meth:`factors` returns the
    mean over ``count`` additions.
    """

    def __init__(self, rank: int) -> None:
        if rank < 1:
            raise ValueError(f"sketch rank {rank}: must be >= 1")
        self.rank = rank
        self.U: torch.Tensor | None = None
        self.S: torch.Tensor | None = None
        self.Vh: torch.Tensor | None = None

    @torch.no_grad()
    def add(self, dense: torch.Tensor) -> None:
        if self.U is not None and self.S is not None and self.Vh is not None:
            dense.addmm_(self.U * self.S, self.Vh)
        k = min(self.rank, min(dense.shape))
        if min(dense.shape) <= FULL_SVD_MAX_DIM:
            U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
            U, S, Vh = U[:, :k], S[:k], Vh[:k]
        else:  # a seeded randomised SVD: ten times faster, and no draw from the global RNG
            devices = [dense.device] if dense.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(0)
                U, S, V = torch.svd_lowrank(dense, q=min(k + 16, min(dense.shape)), niter=6)
            U, S, Vh = U[:, :k], S[:k], V[:, :k].T
        self.U, self.S, self.Vh = U.contiguous(), S.contiguous(), Vh.contiguous()

    def factors(self, count: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U, S, Vh)`` of the mean of the added matrices (``count`` of them)."""
        if self.U is None or self.S is None or self.Vh is None:
            raise RuntimeError("no gradient reached this layer during the calibration passes")
        return self.U, self.S / max(1, count), self.Vh


class GradientHooks:
    """Hooks that sketch the weight gradient of each named frozen ``nn.Linear``.

    Use as a context manager around forward and backward passes; ``sketches[name]`` then holds
    that layer's gradient sketch. A layer's output must require grad for its gradient to be
    seen (:func:`sketch_gradients` makes the LLM's input embeddings require grad).
    """

    def __init__(self, linears: Sequence[tuple[str, nn.Module]], ranks: dict[str, int]) -> None:
        self.linears = list(linears)
        self.sketches = {name: GradientSketch(ranks[name]) for name, _ in self.linears}
        self._handles: list[Any] = []

    def __enter__(self) -> GradientHooks:
        for name, linear in self.linears:
            self._handles.append(linear.register_forward_hook(partial(self._forward, name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _forward(self, name: str, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor)):
            return
        if not output.requires_grad:
            return
        inputs = args[0].detach()
        sketch = self.sketches[name]

        def on_grad(grad: torch.Tensor) -> None:
            sketch.add(dense_gradient(grad, inputs))

        output.register_hook(on_grad)


def sketch_gradients(
    model: nn.Module,
    linears: Sequence[tuple[str, nn.Module]],
    ranks: dict[str, int],
    loss_fn: Callable[[Any], torch.Tensor],
    batches: Iterable[Any],
    embeddings: nn.Module | None = None,
    contexts: Sequence[Any] = (),
) -> tuple[dict[str, GradientSketch], int]:
    """Run ``loss_fn(batch).backward()`` over ``batches`` with :class:`GradientHooks` on
    ``linears``; returns the sketches and the number of batches (for the mean).

    ``embeddings`` (the LLM's input embedding module) gets a hook that makes its output
    require grad, so the backward pass reaches every layer even when nothing before the LLM
    trains. Gradients that the passes leave on ``model``'s parameters are cleared.
    """
    count = 0
    with ExitStack() as stack:
        hooks = stack.enter_context(GradientHooks(linears, ranks))
        if embeddings is not None:
            stack.enter_context(_inputs_require_grad(embeddings))
        for ctx in contexts:
            stack.enter_context(ctx)
        with torch.enable_grad():
            for batch in batches:
                loss = loss_fn(batch)
                if not loss.requires_grad:
                    raise RuntimeError("the calibration loss does not depend on the LLM weights")
                loss.backward()
                count += 1
                for p in model.parameters():
                    p.grad = None
    return hooks.sketches, count


class _inputs_require_grad:
    def __init__(self, embeddings: nn.Module) -> None:
        self.embeddings = embeddings
        self.handle: Any = None

    def __enter__(self) -> None:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            return output if output.requires_grad else output.detach().requires_grad_(True)

        self.handle = self.embeddings.register_forward_hook(hook)

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


def sketch_rank(r: int, shape: tuple[int, int]) -> int:
    """Rank kept by LoRA-One's sketch of a layer with LoRA rank ``r``."""
    return min(max(2 * r, r + 8), min(shape))


def lora_one_factors(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, r: int, gamma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B0, A0)`` from the SVD ``G = U diag(S) Vh`` of the mean gradient (not its negative):
    ``B0 @ A0 = -[G]_r / (gamma * S[0])``, split as ``sqrt(S)`` on each side."""
    if r > S.numel():
        raise ValueError(f"LoRA rank {r} exceeds the {S.numel()} gradient directions kept")
    root = S[:r].clamp_min(0).sqrt() / math.sqrt(gamma * float(S[0]))
    B = -(U[:, :r] * root)
    A = root[:, None] * Vh[:r]
    return B, A


@torch.no_grad()
def apply_lora_one(
    layer: nn.Module, adapter: str, sketch: GradientSketch, count: int, gamma: float
) -> bool:
    """Overwrite ``layer``'s LoRA factors of ``adapter`` with LoRA-One's (DoRA magnitude
    recomputed); ``False`` (factors untouched, a warning) when the gradient is zero."""
    U, S, Vh = sketch.factors(count)
    if not float(S[0]) > 0:
        log.warning("LoRA-One: zero gradient at a target layer; it keeps its default init")
        return False
    r = layer.r[adapter]
    B, A = lora_one_factors(U, S, Vh, r, gamma)
    lora_A, lora_B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    lora_A.copy_(A.to(lora_A.dtype))
    lora_B.copy_(B.to(lora_B.dtype))
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    if variant is not None and getattr(layer, "use_dora", {}).get(adapter):
        variant.init(layer, adapter_name=adapter)  # magnitude = ||W + scaling B A|| per row
    return True
