"""Prompts and the spliced input sequence.

Per sample: ``[prompt head] [begin] modality embeddings [end] [prompt tail] target END``.
The prompt text comes from the tokenizer's chat template when it has one (the modality sits
where the placeholder was in the user turn), else from a plain template; END is the token that
closes an assistant turn in that template (eos without one). Labels are -100 everywhere but the
target tokens and END.
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
        self.end_id = self._end_of_turn()
        self._cache: dict[tuple[str, tuple], tuple[list[int], list[int]]] = {}

    def _end_of_turn(self) -> int:
        """The token that closes an assistant turn in the chat template (``<|im_end|>``,
        ``<|eot_id|>``, ...), which is what the instruct model learned to emit after an
        answer; the tokenizer's eos without a template, or when the template closes a turn
        with plain text."""
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            return self.eos_id
        probe = "\u2063mmalign-answer\u2063"
        text = tok.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": probe}],
            tokenize=False,
        )
        after = text.split(probe, 1)[-1] if probe in text else ""
        ids = tok(after, add_special_tokens=False)["input_ids"] if after.strip() else []
        special = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}))
        return ids[0] if ids and ids[0] in special else self.eos_id

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end generation: the end of turn, and eos if it differs."""
        return sorted({self.end_id, self.eos_id})

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
            # "...speech: " would end in a lone space token the LLM never saw before content:
            # in its fine-tuning that space is part of the next word's token
            head = head.rstrip(" ")
            enc = self.tokenizer
            self._cache[key] = (
                enc(head, add_special_tokens=False)["input_ids"],
                enc(tail, add_special_tokens=False)["input_ids"],
            )
        return self._cache[key]

    def target(self, text: str) -> list[int]:
        """Target ids followed by the end of turn (a leading space when there is no chat
        template); see :meth:`_end_of_turn`."""
        if not getattr(self.tokenizer, "chat_template", None):
            text = " " + text
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.end_id]


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
    labels: torch.Tensor | None  # [R, L] on the host, -100 outside target + END: see _loss
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


def is_flash(attn_implementation: str | None) -> bool:
    """FlashAttention kernels (``flash_attention_2``/``_3``, hub kernels): padding-free varlen."""
    return "flash" in str(attn_implementation or "")


def attention_inputs(s: Spliced, attn_implementation: str | None) -> dict[str, Any]:
    """The LLM call's masking keyword arguments for ``s`` under transformers 5.

    Unpacked: the 2D padding mask. Packed rows: ``position_ids`` (RoPE restarts per sample)
    and no mask: transformers' ``masking_utils`` then builds the block-diagonal causal mask
    from the restarting positions itself (``find_packed_sequence_indices``). Flat (one
    unpadded row, FlashAttention): no mask,
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
    afters = [
        list(tails[i]) + (list(targets[i]) if targets is not None else [])
        for i in range(len(modality))
    ]
    # every token id of the batch in one host tensor, moved once and embedded in one lookup:
    # per-sample tensors built on the device would each be a blocking host-to-device copy
    flat = [t for head, after in zip(heads, afters, strict=True) for t in (*head, *after)]
    embedded = embed(to_device(torch.tensor(flat, dtype=torch.long), device))
    rows, labels, starts, at = [], [], [], 0
    for i, span in enumerate(modality):
        n_head, n_after = len(heads[i]), len(afters[i])
        emb = embedded[at : at + n_head + n_after]
        at += n_head + n_after
        rows.append(torch.cat([emb[:n_head], span.to(emb.dtype), emb[n_head:]]))
        starts.append(n_head)
        if targets is not None:  # host lists: labels never leave the host until the batch does
            n_t = len(targets[i])
            labels.append([IGNORE_INDEX] * (rows[-1].shape[0] - n_t) + list(targets[i]))
    if packing != "none":
        return _pack(
            rows, labels if targets is not None else None, starts, packing, max_packed_tokens
        )
    lengths = [r.shape[0] for r in rows]
    length = max(lengths)
    offsets = [0 if padding_side == "right" else length - n for n in lengths]
    out = rows[0].new_zeros(len(rows), length, rows[0].shape[1])
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, (r, s, n) in enumerate(zip(rows, offsets, lengths, strict=True)):
        out[i, s : s + n] = r
        mask[i, s : s + n] = 1
    start = torch.tensor([s + h for s, h in zip(offsets, starts, strict=True)], dtype=torch.long)
    lab_out = None
    if targets is not None:  # one host tensor for the whole batch's labels
        pad = IGNORE_INDEX
        padded = [
            [pad] * s + lab + [pad] * (length - s - len(lab))
            for s, lab in zip(offsets, labels, strict=True)
        ]
        lab_out = torch.tensor(padded, dtype=torch.long)
    return Spliced(out, to_device(mask, device), lab_out, to_device(start, device))


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``: pinned and non-blocking for CUDA, so no stall."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _pack(
    rows: list[torch.Tensor],
    labels: list[list[int]] | None,
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
    # the index tensors are built on the host and moved once each
    mask = torch.zeros(n_rows, length, dtype=torch.long)
    seq = torch.full((n_rows, length), -1, dtype=torch.long)
    # padding gets positions 0, 1, ... of its own, so it also reads as a sequence of its own
    pos = torch.arange(length).repeat(n_rows, 1)
    lab_out = None
    start = [0] * len(rows)
    ramp = torch.arange(length)
    row_labels: list[list[int]] = []
    for r, group in enumerate(groups):
        at = 0
        row_labels.append([])
        for i in group:
            n = lengths[i]
            out[r, at : at + n] = rows[i]
            mask[r, at : at + n] = 1
            seq[r, at : at + n] = i
            pos[r, at : at + n] = ramp[:n]
            if labels is not None:
                row_labels[-1] += labels[i]
            start[i] = at + starts[i]
            at += n
        pos[r, at:] = ramp[: length - at]
    if labels is not None:  # one host tensor for the whole batch's labels
        pad = [IGNORE_INDEX] * length
        lab_out = torch.tensor([lab + pad[len(lab) :] for lab in row_labels], dtype=torch.long)
    return Spliced(
        out,
        to_device(mask, device),
        lab_out,
        to_device(torch.tensor(start, dtype=torch.long), device),
        to_device(pos, device),
        to_device(seq, device),
    )
