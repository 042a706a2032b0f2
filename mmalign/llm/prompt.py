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


@dataclass
class Spliced:
    inputs_embeds: torch.Tensor  # [B, L, H]
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor | None  # [B, L], -100 outside target + EOS
    modality_start: torch.Tensor  # [B] index of the begin boundary in each row


def splice(
    embed: Callable[[torch.Tensor], torch.Tensor],
    heads: Sequence[Sequence[int]],
    modality: Sequence[torch.Tensor],
    tails: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]] | None = None,
    padding_side: str = "right",
) -> Spliced:
    """Build padded ``inputs_embeds`` from token ids and per-sample modality spans ``[L_i, H]``.

    Training pads right; generation (``targets=None``) pads left so every row ends where
    the first new token goes.
    """
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
