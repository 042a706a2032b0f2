"""CTC alignment of projector outputs with the LLM's own vocabulary.

A projector trained only through the LLM's next-token loss gets a weak, delayed signal: the
frozen LLM must first learn to read its outputs at all, which is why speech-LLM training often
plateaus for thousands of steps. Scoring each projector output frame directly against the LLM's
token embeddings with CTC (as Soundwave's alignment stage does) pushes the frames, from the first
step, towards the embeddings of the tokens spoken there: the LLM then reads them almost as text.
The logits are the frames' dot products with the (frozen) embedding table, times a learned scale,
plus one learned blank; nothing but the blank and the scale is added to the model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def ctc_feasible(target: list[int], frames: int) -> bool:
    """Whether CTC can align ``target`` to ``frames`` outputs: one frame per token plus one blank
    between each pair of equal neighbours."""
    repeats = sum(a == b for a, b in zip(target, target[1:], strict=False))
    return len(target) > 0 and frames >= len(target) + repeats


class VocabCTC(nn.Module):
    """The blank and the logit scale of CTC over an LLM vocabulary (the blank is the last class).

    ``loss`` returns the summed negative log-likelihood of the feasible samples and how many were
    skipped because their output is shorter than CTC needs (summed, so that the caller divides by
    the same token count as the LLM loss)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.blank = nn.Parameter(torch.zeros(dim))
        self.blank_bias = nn.Parameter(torch.zeros(()))
        # dot products of unit-scale vectors in dim dimensions spread like sqrt(dim)
        self.log_scale = nn.Parameter(torch.tensor(-0.5 * math.log(dim)))

    def logits(self, frames: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
        """``[B, T, V + 1]`` float32 logits of ``frames [B, T, H]`` against ``vocab [V, H]``."""
        frames = frames.float()
        scale = self.log_scale.float().exp()
        tokens = frames @ vocab.float().T
        blank = frames @ self.blank.float() + self.blank_bias.float()
        return torch.cat([tokens, blank[..., None]], dim=-1) * scale

    def loss(
        self,
        frames: torch.Tensor,
        lengths: list[int],
        targets: list[list[int]],
        vocab: torch.Tensor,
    ) -> tuple[torch.Tensor, int]:
        """``(summed CTC loss, samples skipped)`` of ``frames [B, T, H]`` with ``lengths`` valid
        frames against token ``targets``; a sample whose output is too short is skipped."""
        keep = [
            i for i, (t, n) in enumerate(zip(targets, lengths, strict=True)) if ctc_feasible(t, n)
        ]
        skipped = len(targets) - len(keep)
        if not keep:
            return frames.sum() * 0.0, skipped
        log_probs = self.logits(frames[keep], vocab).log_softmax(-1).transpose(0, 1)
        flat = torch.tensor([tok for i in keep for tok in targets[i]], dtype=torch.long)
        loss = F.ctc_loss(
            log_probs,
            flat.to(log_probs.device),
            torch.tensor([lengths[i] for i in keep], dtype=torch.long),
            torch.tensor([len(targets[i]) for i in keep], dtype=torch.long),
            blank=vocab.shape[0],
            reduction="sum",
        )
        return loss, skipped

    @torch.no_grad()
    def best_path(
        self, frames: torch.Tensor, lengths: list[int], vocab: torch.Tensor
    ) -> list[list[tuple[int, int]]]:
        """``(frame, token)`` per emitted token of each sample's best path: argmax per frame,
        the first frame of each run of one token, blanks dropped."""
        best = self.logits(frames, vocab).argmax(-1).tolist()
        blank = vocab.shape[0]
        return [
            [(j, t) for j, t in enumerate(row[:n]) if t != blank and (j == 0 or t != row[j - 1])]
            for row, n in zip(best, lengths, strict=True)
        ]

    def greedy(
        self, frames: torch.Tensor, lengths: list[int], vocab: torch.Tensor
    ) -> list[list[int]]:
        """Best-path token ids per sample: argmax per frame, repeats merged, blanks dropped."""
        return [[t for _, t in path] for path in self.best_path(frames, lengths, vocab)]

    def shrink(
        self, frames: torch.Tensor, lengths: list[int], vocab: torch.Tensor
    ) -> list[torch.Tensor]:
        """Each sample's frames at the tokens its best path emits (the first frame of each run;
        blank frames dropped), so the LLM reads about one vector per token, as it reads text.
        A sample whose path is empty keeps its least blank-like frame. Gradients flow to the
        kept frames; which frames are kept is a decision, not differentiated."""
        paths = self.best_path(frames, lengths, vocab)
        out = []
        for i, (path, n) in enumerate(zip(paths, lengths, strict=True)):
            if not path and n > 0:
                with torch.no_grad():
                    logp = self.logits(frames[i : i + 1, :n], vocab).log_softmax(-1)
                path = [(int(logp[0, :, -1].argmin()), -1)]
            out.append(frames[i, [j for j, _ in path]])
        return out

    def embed(self, frames: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
        """The token embeddings of ``frames [N, H]`` weighted by the head's posterior over tokens
        (blank excluded), as LegoSLM feeds its LLM: the frozen LLM then reads near-text from the
        first step instead of learning to read projector frames. Differentiable through the
        posterior, so the LLM loss still trains the projector."""
        probs = self.logits(frames[None], vocab)[0, :, :-1].softmax(-1)
        return (probs @ vocab.float()).to(frames.dtype)
