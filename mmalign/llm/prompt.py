"""Prompts and the spliced input sequence.

Per sample: ``[prompt head] [begin] modality embeddings [end] [prompt tail] target EOS``.
The prompt text comes from the tokenizer's chat template when it has one (the modality sits
where the placeholder was in the user turn), else from a plain template. Labels are -100
everywhere but the target tokens and EOS.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from string import Formatter
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

PLACEHOLDER = "<|modality|>"
IGNORE_INDEX = -100

DEFAULT_PROMPTS = {
    "asr": "Transcribe the speech: {modality}",
    "vsr": "Transcribe the lip movements: {modality}",
    "avsr": "Transcribe the speech and lip movements: {modality}",
    "st": "Translate the speech into {target_lang}: {modality}",
}


class PromptBuilder:
    """Turns a task name into prompt token ids (cached) and a transcript into target ids."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompts: dict[str, str] | None = None,
        system_prompt: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.prompts = {**DEFAULT_PROMPTS, **(prompts or {})}
        for task, text in self.prompts.items():
            if "{modality}" not in text:
                raise ValueError(f"prompt for task {task!r} lacks the '{{modality}}' placeholder")
        self.system_prompt = system_prompt
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError("the LLM tokenizer has no eos token; set one before training")
        self._cache: dict[tuple[str, tuple], tuple[list[int], list[int]]] = {}

    def fields(self, task: str) -> list[str]:
        """Names a task's prompt needs from the sample metadata (e.g. ``target_lang``)."""
        names = [f for _, f, _, _ in Formatter().parse(self.prompts.get(task, "")) if f]
        return [f for f in names if f != "modality"]

    def text(self, task: str, **fields: str) -> str:
        """The full prompt text with the modality placeholder still in it."""
        if task not in self.prompts:
            raise KeyError(f"no prompt for task {task!r}; known tasks: {sorted(self.prompts)}")
        user = self.prompts[task].format(modality=PLACEHOLDER, **fields)
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": user}]
            if self.system_prompt is not None:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        bos = self.tokenizer.bos_token or ""
        system = f"{self.system_prompt}\n" if self.system_prompt else ""
        return f"{bos}{system}{user}\nAnswer:"

    def segments(self, task: str, **fields: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the modality span."""
        key = (task, tuple(sorted(fields.items())))
        if key not in self._cache:
            head, tail = self.text(task, **fields).split(PLACEHOLDER)
            enc = self.tokenizer
            self._cache[key] = (
                enc(head, add_special_tokens=False)["input_ids"],
                enc(tail, add_special_tokens=False)["input_ids"],
            )
        return self._cache[key]

    def target(self, text: str) -> list[int]:
        """Target ids followed by EOS (a leading space when there is no chat template)."""
        if not getattr(self.tokenizer, "chat_template", None):
            text = " " + text
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos_id]


PACKINGS = ("none", "rows", "flat")


@dataclass
class Spliced:
    """The LLM input of a batch.

    Unpacked (``packing="none"``) there is one row per sample. Packed, a row holds several
    samples one after another: ``position_ids`` restart at 0 with each sample and
    ``sequence_ids`` say which sample (its index in the batch) each position belongs to, -1 on
    padding, so attention can be kept within each sample (see :func:`attention_inputs`).
    """

    inputs_embeds: torch.Tensor  # [R, L, H]: R = B rows unpacked, fewer when packed
    attention_mask: torch.Tensor  # [R, L] 1 on sample tokens, 0 on padding
    labels: torch.Tensor | None  # [R, L], -100 outside target + EOS
    modality_start: torch.Tensor  # [B] index of each sample's begin boundary in its row
    position_ids: torch.Tensor | None = None  # [R, L] packed only: 0, 1, ... per sample
    sequence_ids: torch.Tensor | None = None  # [R, L] packed only: sample index, -1 padding

    @property
    def packed(self) -> bool:
        return self.sequence_ids is not None


def padding_efficiency(s: Spliced) -> float:
    """Share of the LLM input positions that hold a sample's token: valid / (rows x length)."""
    return float(s.attention_mask.sum()) / max(1, s.attention_mask.numel())


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bin-pack item indices by ``lengths`` into rows of at most ``capacity`` (first fit,
    longest first). An item longer than ``capacity`` gets a row of its own."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):  # stable: ties keep order
        n = int(lengths[i])
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return rows


def block_causal_mask(sequence_ids: torch.Tensor, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """``[R, 1, L, L]`` mask letting each position see the earlier positions of its own sample
    (padding, id -1, sees earlier padding, so no row is fully masked). Boolean (True = attend,
    for SDPA) or, for a float ``dtype``, additive (0 / dtype min, for eager attention)."""
    same = sequence_ids[:, :, None] == sequence_ids[:, None, :]
    n = sequence_ids.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=sequence_ids.device).tril()
    mask = (same & causal)[:, None]
    if dtype == torch.bool:
        return mask
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, torch.finfo(dtype).min)


def is_flash(attn_implementation: str | None) -> bool:
    """FlashAttention kernels (``flash_attention_2``/``_3``, hub kernels): padding-free varlen."""
    return "flash" in str(attn_implementation or "")


def attention_inputs(s: Spliced, attn_implementation: str | None) -> dict[str, Any]:
    """The LLM call's masking keyword arguments for ``s`` under transformers 5.

    Unpacked: the 2D padding mask. Packed rows: ``position_ids`` (RoPE restarts per sample)
    plus a block-diagonal causal 4D mask, which transformers' ``masking_utils`` passes through
    unchanged: boolean for ``sdpa``, additive for ``eager``; any other implementation gets no
    mask and derives the same blocks from the restarting ``position_ids`` (``masking_utils``
    does so whenever the 2D mask is None). Flat (one unpadded row, FlashAttention): no mask,
    ``position_ids`` and the varlen boundaries ``cu_seq_lens_q/k``, ``max_length_q/k`` that
    ``flash_attn_varlen_func`` takes (also for padded rows: the kernel sees all positions
    flattened, each padding run a segment of its own). Packed, ``use_cache=False`` comes too:
    ``masking_utils`` derives blocks from position ids only without a KV cache.
    """
    if not s.packed:
        return {"attention_mask": s.attention_mask}
    assert s.position_ids is not None and s.sequence_ids is not None
    # no KV cache: transformers reads packing from position ids only when there is none
    out: dict[str, Any] = {"position_ids": s.position_ids, "attention_mask": None}
    out["use_cache"] = False
    impl = str(attn_implementation or "sdpa")
    if is_flash(impl):
        # the varlen path runs over all R x L positions flattened; every sample (and every
        # padding run, whose positions also start at 0) is one segment
        flat = s.position_ids.flatten()
        starts = (flat == 0).nonzero().squeeze(1)
        total = torch.tensor([flat.numel()], device=starts.device)
        cu = torch.cat([starts, total]).to(torch.int32)
        longest = int(cu.diff().max())
        out.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    elif impl == "sdpa":
        out["attention_mask"] = block_causal_mask(s.sequence_ids)
    elif impl == "eager":
        out["attention_mask"] = block_causal_mask(s.sequence_ids, s.inputs_embeds.dtype)
    return out


def splice(
    embed: Callable[[torch.Tensor], torch.Tensor],
    heads: Sequence[Sequence[int]],
    modality: Sequence[torch.Tensor],
    tails: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]] | None = None,
    padding_side: str = "right",
    packing: str = "none",
    max_packed_tokens: int | None = None,
) -> Spliced:
    """Build padded ``inputs_embeds`` from token ids and per-sample modality spans ``[L_i, H]``.

    Training pads right; generation (``targets=None``) pads left so every row ends where
    the first new token goes.

    ``packing`` (training; padding is then always on the right): ``rows`` puts several samples
    into one row, filled first-fit-decreasing by length up to ``max_packed_tokens`` (default:
    the longest sample, so no row is longer than unpacked padding makes it); ``flat`` puts
    every sample into one unpadded row (for FlashAttention's varlen kernels).
    """
    if packing not in PACKINGS:
        raise ValueError(f"packing={packing!r}: use one of {PACKINGS}")
    device = modality[0].device
    rows, labels, starts = [], [], []
    for i, span in enumerate(modality):
        after = list(tails[i]) + (list(targets[i]) if targets is not None else [])
        head_ids = torch.tensor(list(heads[i]), dtype=torch.long, device=device)
        after_ids = torch.tensor(after, dtype=torch.long, device=device)
        ids = torch.cat([head_ids, after_ids])
        emb = embed(ids)
        n_head = len(head_ids)
        rows.append(torch.cat([emb[:n_head], span.to(emb.dtype), emb[n_head:]]))
        starts.append(n_head)
        if targets is not None:
            lab = torch.full((rows[-1].shape[0],), IGNORE_INDEX, dtype=torch.long, device=device)
            n_t = len(targets[i])
            lab[-n_t:] = torch.tensor(list(targets[i]), dtype=torch.long, device=device)
            labels.append(lab)
    if packing != "none":
        return _pack(
            rows, labels if targets is not None else None, starts, packing, max_packed_tokens
        )
    length = max(r.shape[0] for r in rows)
    hidden = rows[0].shape[1]
    out = rows[0].new_zeros(len(rows), length, hidden)
    mask = torch.zeros(len(rows), length, dtype=torch.long, device=device)
    lab_out = (
        torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long, device=device)
        if targets is not None
        else None
    )
    start = torch.tensor(starts, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        n = r.shape[0]
        s = 0 if padding_side == "right" else length - n
        out[i, s : s + n] = r
        mask[i, s : s + n] = 1
        start[i] += s
        if lab_out is not None:
            lab_out[i, s : s + n] = labels[i]
    return Spliced(out, mask, lab_out, start)


def _pack(
    rows: list[torch.Tensor],
    labels: list[torch.Tensor] | None,
    starts: list[int],
    packing: str,
    max_packed_tokens: int | None,
) -> Spliced:
    """Lay per-sample sequences end to end into packed rows (right padding)."""
    lengths = [r.shape[0] for r in rows]
    if packing == "flat":
        groups = [list(range(len(rows)))]
    else:
        capacity = max(lengths) if max_packed_tokens is None else int(max_packed_tokens)
        if capacity < 1:
            raise ValueError(f"max_packed_tokens={max_packed_tokens!r}: a positive int or None")
        groups = first_fit_decreasing(lengths, capacity)
    device = rows[0].device
    n_rows = len(groups)
    length = max(sum(lengths[i] for i in g) for g in groups)
    out = rows[0].new_zeros(n_rows, length, rows[0].shape[1])
    mask = torch.zeros(n_rows, length, dtype=torch.long, device=device)
    seq = torch.full((n_rows, length), -1, dtype=torch.long, device=device)
    # padding gets positions 0, 1, ... of its own, so it also reads as a sequence of its own
    pos = torch.arange(length, device=device).repeat(n_rows, 1)
    lab_out = None
    if labels is not None:
        lab_out = torch.full((n_rows, length), IGNORE_INDEX, dtype=torch.long, device=device)
    start = torch.zeros(len(rows), dtype=torch.long, device=device)
    ramp = torch.arange(length, device=device)
    for r, group in enumerate(groups):
        at = 0
        for i in group:
            n = lengths[i]
            out[r, at : at + n] = rows[i]
            mask[r, at : at + n] = 1
            seq[r, at : at + n] = i
            pos[r, at : at + n] = ramp[:n]
            if lab_out is not None:
                lab_out[r, at : at + n] = labels[i]
            start[i] = at + starts[i]
            at += n
        pos[r, at:] = ramp[: length - at]
    return Spliced(out, mask, lab_out, start, pos, seq)
