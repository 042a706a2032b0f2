"""Decoding: the LLM's generated text, and the CTC head's best path without the LLM.

Mixed into :class:`mmalign.model.SpeechLLM`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from mmalign.llm.prompt import splice
from mmalign.model.inputs import Encoded


class RowBudget(StoppingCriteria):
    """Ends each row at its own token budget. With one budget for the batch (its longest
    clip's), a sample that loops would run on for as long as its longest batch mate allows, so
    its transcript, and the WER, would depend on its batch mates."""

    def __init__(self, budgets: list[int]) -> None:
        self.budgets = torch.tensor(budgets)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        # generate() from inputs_embeds holds only the new tokens in input_ids
        return (input_ids.shape[1] >= self.budgets).to(input_ids.device)


class Decoding:
    """Batched decoding of a :class:`~mmalign.model.SpeechLLM` (left padding, never packed)."""

    @torch.no_grad()
    def ctc_transcribe(self, batch: dict[str, Any], encoded: Encoded | None = None) -> list[str]:
        """Best-path CTC transcripts of the audio projector's outputs: what the alignment stage
        has taught the projector to say, with no LLM in the loop."""
        if self.ctc is None:
            raise ValueError("this model has no CTC head: build it with ctc=True")
        frames, lengths = self.project(batch, encoded)["audio"]
        vocab = self.llm.model.get_input_embeddings().weight
        ids = self.ctc.greedy(frames, lengths.tolist(), vocab)
        return [self.tokenizer.decode(i, skip_special_tokens=True).strip() for i in ids]

    @torch.no_grad()
    def generate(
        self,
        batch: dict[str, Any],
        max_new_tokens: int | None = None,
        num_beams: int = 1,
        tokens_per_second: float = 8.0,
        encoded: Encoded | None = None,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Batched decoding with left padding; greedy unless ``num_beams`` > 1 or sampling asked.

        Decodes at the projector's active rate; ``encoded`` (from :meth:`encode`) skips the
        encoder when one batch is decoded at several rates. With ``task_adapters`` each adapter
        group is decoded with its own adapters; the texts come back in batch order. Without
        ``max_new_tokens``, each sample (greedy) gets its own budget of ``tokens_per_second``
        per second of its ``durations`` plus 16, whatever its batch mates' lengths.
        """
        limits = None  # with durations and greedy search: each sample's own token budget
        if max_new_tokens is None:
            durations = batch.get("durations")
            seconds = [float(d) for d in durations] if durations is not None else [30.0]
            budgets = [int(math.ceil(d * tokens_per_second)) + 16 for d in seconds]
            max_new_tokens = max(budgets)
            if durations is not None and num_beams == 1:
                if generate_kwargs.get("num_return_sequences", 1) == 1:
                    limits = budgets
        heads, tails = self._segments(batch)
        spans = self._spans(batch, encoded)
        tok = self.tokenizer
        generate_kwargs.setdefault("do_sample", False)
        texts: list[str] = [""] * len(spans)
        groups = self.adapter_groups(batch)
        for names, idx in groups:
            self._activate(names)
            head, tail = [heads[i] for i in idx], [tails[i] for i in idx]
            s = splice(self.llm.embed, head, [spans[i] for i in idx], tail, padding_side="left")
            self._scale_adapters(head, tail)
            kwargs = dict(generate_kwargs)
            if limits is not None:
                stop = StoppingCriteriaList(kwargs.get("stopping_criteria") or [])
                stop.append(RowBudget([limits[i] for i in idx]))
                kwargs["stopping_criteria"] = stop
            try:
                out = self.llm.model.generate(
                    inputs_embeds=s.inputs_embeds,
                    attention_mask=s.attention_mask,
                    max_new_tokens=max_new_tokens,
                    num_beams=num_beams,
                    eos_token_id=self.prompt.stop_ids,
                    pad_token_id=tok.pad_token_id,
                    **kwargs,
                )
            finally:
                self._delta_scale.clear()
            decoded = [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]
            if len(groups) == 1:
                return decoded  # several sequences per sample (num_return_sequences) allowed
            for i, text in zip(idx, decoded, strict=True):
                texts[i] = text
        return texts
