"""SpeechLLM: encoder -> projector -> spliced prompt -> LLM; plain torch, no Lightning needed."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmalign.encoders.base import Encoder
from mmalign.llm.load import CausalLM
from mmalign.llm.prompt import IGNORE_INDEX, PromptBuilder, Spliced, splice
from mmalign.projectors.base import Projector


class SpeechLLM(nn.Module):
    """The whole model; training and decoding both go through :meth:`splice_batch`.

    Batch keys used: ``audio_features [B, n_mels, T]``, ``audio_lengths [B]``, ``texts``,
    ``task`` (list of task names), optionally ``meta`` (per-sample dicts for prompt fields)
    and ``durations [B]`` (seconds; bounds the number of generated tokens).
    """

    def __init__(
        self,
        encoder: Encoder,
        projector: Projector,
        llm: CausalLM,
        prompts: dict[str, str] | None = None,
        system_prompt: str | None = None,
    ) -> None:
        super().__init__()
        if projector.in_dim != encoder.dim or projector.out_dim != llm.hidden_size:
            raise ValueError(
                f"projector maps {projector.in_dim}->{projector.out_dim} but the encoder width "
                f"is {encoder.dim} and the LLM width is {llm.hidden_size}"
            )
        self.encoder = encoder
        self.projector = projector
        self.llm = llm
        self.prompt = PromptBuilder(llm.tokenizer, prompts, system_prompt)

    @property
    def tokenizer(self):
        return self.llm.tokenizer

    def embed_audio(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder frames -> projected embeddings ``[B, T', H]`` and their lengths."""
        feats, lengths = self.encoder.encode_batch(batch)
        return self.projector(feats, lengths)

    def _spans(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        emb, lengths = self.embed_audio(batch)
        begin, end = self.projector.begin[None], self.projector.end[None]
        return [
            torch.cat([begin.to(emb.dtype), emb[i, : int(n)], end.to(emb.dtype)])
            for i, n in enumerate(lengths.tolist())
        ]

    def _segments(self, batch: dict[str, Any]) -> tuple[list[list[int]], list[list[int]]]:
        tasks = batch.get("task") or ["asr"] * len(batch["texts"])
        metas = batch.get("meta") or [{}] * len(tasks)
        heads, tails = [], []
        for task, meta in zip(tasks, metas, strict=True):
            missing = [f for f in self.prompt.fields(task) if f not in meta]
            if missing:
                raise KeyError(f"task {task!r} needs sample field(s) {missing} in its json")
            h, t = self.prompt.segments(task, **{f: meta[f] for f in self.prompt.fields(task)})
            heads.append(h)
            tails.append(t)
        return heads, tails

    def splice_batch(self, batch: dict[str, Any], train: bool) -> Spliced:
        heads, tails = self._segments(batch)
        targets = [self.prompt.target(t) for t in batch["texts"]] if train else None
        return splice(
            self.llm.embed,
            heads,
            self._spans(batch),
            tails,
            targets,
            padding_side="right" if train else "left",
        )

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """Mean cross-entropy over target tokens and EOS.

        Logits are computed only at positions that predict a target token (``logits_to_keep``
        with an index tensor): the prompt and modality positions never need the vocabulary
        projection, which is a fifth of a small LLM's compute.
        """
        s = self.splice_batch(batch, train=True)
        predicts = (s.labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)
        out = self.llm.model(
            inputs_embeds=s.inputs_embeds, attention_mask=s.attention_mask, logits_to_keep=predicts
        )
        targets = s.labels[:, predicts + 1]
        return F.cross_entropy(
            out.logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX
        )

    @torch.no_grad()
    def generate(
        self,
        batch: dict[str, Any],
        max_new_tokens: int | None = None,
        num_beams: int = 1,
        tokens_per_second: float = 8.0,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Batched decoding with left padding; greedy unless ``num_beams`` > 1 or sampling asked."""
        if max_new_tokens is None:
            durations = batch.get("durations")
            longest = float(max(durations)) if durations is not None else 30.0
            max_new_tokens = int(math.ceil(longest * tokens_per_second)) + 16
        s = self.splice_batch(batch, train=False)
        tok = self.tokenizer
        generate_kwargs.setdefault("do_sample", False)
        out = self.llm.model.generate(
            inputs_embeds=s.inputs_embeds,
            attention_mask=s.attention_mask,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **generate_kwargs,
        )
        return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]
