"""SpeechLLM: encoder -> projector -> spliced prompt -> LLM; plain torch, no Lightning needed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmalign.encoders.base import Encoder
from mmalign.llm.load import CausalLM
from mmalign.llm.lora import activate, active_adapters, add_rate_adapters, check_strategy
from mmalign.llm.prompt import IGNORE_INDEX, PromptBuilder, Spliced, splice
from mmalign.projectors.base import Projector

Encoded = tuple[torch.Tensor, torch.Tensor]


class SpeechLLM(nn.Module):
    """The whole model; training and decoding both go through :meth:`splice_batch`.

    Batch keys used: ``audio_features [B, n_mels, T]``, ``audio_lengths [B]``, ``texts``,
    ``task`` (list of task names), optionally ``meta`` (per-sample dicts for prompt fields)
    and ``durations [B]`` (seconds; bounds the number of generated tokens).

    A multi-rate projector (``rates`` + ``set_rate``, e.g. ``MatryoshkaProjector``) makes this a
    Matryoshka model: ``lora_strategy`` (see :mod:`mmalign.llm.lora`) lays out its adapters, and
    before every LLM call the adapters of the projector's active rate are switched on, so
    ``model.projector.set_rate(r)`` (what ``mmalign evaluate`` calls) or :meth:`set_rate` is all
    it takes to decode at another rate.
    """

    def __init__(
        self,
        encoder: Encoder,
        projector: Projector,
        llm: CausalLM,
        prompts: dict[str, str] | None = None,
        system_prompt: str | None = None,
        lora_strategy: str = "shared",
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
        self.lora_strategy = check_strategy(lora_strategy)
        if lora_strategy != "shared":
            if self.rates is None:
                raise ValueError(
                    f"lora_strategy {lora_strategy!r} needs a multi-rate projector (with `rates` "
                    f"and `set_rate`); {type(projector).__name__} has one rate"
                )
            if llm.adapter is not None:
                add_rate_adapters(llm.model, llm.adapter, lora_strategy, self.rates)
        self.activate_rate()

    @property
    def rates(self) -> list[int] | None:
        """The projector's compression rates when it is multi-rate, else None."""
        rates = getattr(self.projector, "rates", None)
        if rates is None or not callable(getattr(self.projector, "set_rate", None)):
            return None
        return [int(r) for r in rates]

    def set_rate(self, rate: int) -> None:
        """Switch projector and LoRA adapters to ``rate`` (one of :attr:`rates`)."""
        if self.rates is None:
            raise ValueError(f"{type(self.projector).__name__} has a single compression rate")
        self.projector.set_rate(rate)
        self.activate_rate()

    def activate_rate(self) -> None:
        """Activate the adapters of the projector's current rate (no-op for one shared adapter).

        Called before every LLM call, so a rate set on the projector directly is honoured.
        """
        if self.lora_strategy == "shared" or self.llm.adapter is None:
            return
        activate(self.llm.model, active_adapters(self.lora_strategy, self.projector.rate))

    @property
    def tokenizer(self):
        return self.llm.tokenizer

    def encode(self, batch: dict[str, Any]) -> Encoded:
        """Encoder frames ``[B, T, D]`` and lengths; computed once and reused across rates."""
        return self.encoder.encode_batch(batch)

    def embed_audio(
        self, batch: dict[str, Any], encoded: Encoded | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder frames -> projected embeddings ``[B, T', H]`` and their lengths."""
        feats, lengths = encoded if encoded is not None else self.encode(batch)
        return self.projector(feats, lengths)

    def _spans(self, batch: dict[str, Any], encoded: Encoded | None = None) -> list[torch.Tensor]:
        emb, lengths = self.embed_audio(batch, encoded)
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

    def splice_batch(
        self, batch: dict[str, Any], train: bool, encoded: Encoded | None = None
    ) -> Spliced:
        heads, tails = self._segments(batch)
        targets = [self.prompt.target(t) for t in batch["texts"]] if train else None
        return splice(
            self.llm.embed,
            heads,
            self._spans(batch, encoded),
            tails,
            targets,
            padding_side="right" if train else "left",
        )

    def forward(self, batch: dict[str, Any], encoded: Encoded | None = None) -> torch.Tensor:
        """Mean cross-entropy over target tokens and EOS (at the active rate).

        Logits are computed only at positions that predict a target token (``logits_to_keep``
        with an index tensor): the prompt and modality positions never need the vocabulary
        projection, which is a fifth of a small LLM's compute. ``encoded`` (from :meth:`encode`)
        skips the encoder.
        """
        self.activate_rate()
        s = self.splice_batch(batch, train=True, encoded=encoded)
        predicts = (s.labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)
        out = self.llm.model(
            inputs_embeds=s.inputs_embeds, attention_mask=s.attention_mask, logits_to_keep=predicts
        )
        targets = s.labels[:, predicts + 1]
        return F.cross_entropy(
            out.logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX
        )

    def loss_per_rate(
        self, batch: dict[str, Any], rates: Sequence[int], encoded: Encoded | None = None
    ) -> dict[int, torch.Tensor]:
        """Loss at each of ``rates``, running the encoder once (Matryoshka training).

        Each rate's LLM pass runs with that rate's adapters; autograd keeps the parameters each
        pass used, so one backward through the summed losses trains every rate. The active
        rate is restored afterwards.
        """
        if self.rates is None:
            raise ValueError(f"{type(self.projector).__name__} has a single compression rate")
        encoded = encoded if encoded is not None else self.encode(batch)
        before = self.projector.rate
        try:
            losses = {}
            for rate in rates:
                self.projector.set_rate(rate)
                losses[int(rate)] = self(batch, encoded)
        finally:
            self.set_rate(before)
        return losses

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
        encoder when one batch is decoded at several rates.
        """
        if max_new_tokens is None:
            durations = batch.get("durations")
            longest = float(max(durations)) if durations is not None else 30.0
            max_new_tokens = int(math.ceil(longest * tokens_per_second)) + 16
        self.activate_rate()
        s = self.splice_batch(batch, train=False, encoded=encoded)
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
