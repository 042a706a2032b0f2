"""SpeechLLM: encoders -> projectors -> spliced prompt -> LLM; plain torch, no Lightning needed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmalign.data.tasks import prompt_key, prompt_value
from mmalign.encoders.base import Encoder
from mmalign.llm.load import CausalLM
from mmalign.llm.lora import activate, active_adapters, add_rate_adapters, check_strategy
from mmalign.llm.prompt import (
    IGNORE_INDEX,
    PromptBuilder,
    Spliced,
    attention_inputs,
    is_flash,
    splice,
)
from mmalign.projectors.base import Projector

Encoded = dict[str, tuple[torch.Tensor, torch.Tensor]]  # modality -> (frames [B, T, D], lengths)

MODALITY_ORDER = ("audio", "video")  # span order in the LLM's sequence
TASK_MODALITIES: dict[str, tuple[str, ...]] = {
    "asr": ("audio",),
    "st": ("audio",),
    "vsr": ("video",),
    "avsr": ("audio", "video"),
}


class SpeechLLM(nn.Module):
    """The whole model; training and decoding both go through :meth:`splice_batch`.

    Batch keys used: each encoder's inputs (``audio_features [B, n_mels, T]`` + ``audio_lengths``,
    ``video [B, Tv, 1, H, W]`` + ``video_lengths``) or, read from a feature cache,
    ``encoder_features [B, T', D]`` + ``encoder_lengths`` (the encoder's stored output: it is
    not run), ``texts``, ``task`` (list of task names),
    optionally ``meta`` (per-sample dicts for prompt fields) and ``durations [B]`` (seconds;
    bounds the number of generated tokens).

    Modalities (the Llama-AVSR layout): ``encoder``/``projector`` form the main branch, of
    whatever modality the encoder reads; ``video_encoder``/``video_projector`` add a video
    branch to an audio model. Each sample's task picks the spans it gets (``asr``: audio,
    ``vsr``: video, ``avsr``: both, audio first; ``task_modalities`` extends the map), so one
    model serves ASR, VSR and AVSR, and only the encoders some sample needs are run.

    A multi-rate projector (``rates`` + ``set_rate``, e.g. ``MatryoshkaProjector``) makes this a
    Matryoshka model: ``lora_strategy`` (see :mod:`mmalign.llm.lora`) lays out its adapters, and
    before every LLM call the adapters of the projector's active rate are switched on, so
    ``model.projector.set_rate(r)`` (what ``mmalign evaluate`` calls) or :meth:`set_rate` is all
    it takes to decode at another rate.

    ``packing`` (training loss only): several samples share one LLM row, laid end to end,
    position ids restarting at 0 with each and attention kept within each (a block-diagonal
    causal mask under SDPA and eager attention; FlashAttention's padding-free varlen kernel,
    all samples in one unpadded row, under ``flash_attention_2``/``_3``). Rows are filled
    first-fit-decreasing by length up to ``max_packed_tokens`` (default: the batch's longest
    sample, so no row is longer than unpacked padding makes it). The loss is that of the
    unpacked batch; decoding is never packed.
    """

    def __init__(
        self,
        encoder: Encoder,
        projector: Projector,
        llm: CausalLM,
        prompts: dict[str, str] | None = None,
        system_prompt: str | None = None,
        lora_strategy: str = "shared",
        video_encoder: Encoder | None = None,
        video_projector: Projector | None = None,
        task_modalities: dict[str, list[str]] | None = None,
        packing: bool = False,
        max_packed_tokens: int | None = None,
    ) -> None:
        super().__init__()
        _check_widths("projector", projector, encoder, llm)
        if max_packed_tokens is not None and (
            not isinstance(max_packed_tokens, int) or max_packed_tokens < 1
        ):
            raise ValueError(f"max_packed_tokens={max_packed_tokens!r}: a positive int or None")
        self.packing = bool(packing)
        self.max_packed_tokens = max_packed_tokens
        self.encoder = encoder
        self.projector = projector
        self.video_encoder = video_encoder
        self.video_projector = video_projector
        if (video_encoder is None) != (video_projector is None):
            raise ValueError("video_encoder and video_projector come together: give both or none")
        if video_encoder is not None:
            _check_widths("video_projector", video_projector, video_encoder, llm)
            if video_encoder.modality != "video" or encoder.modality != "audio":
                raise ValueError(
                    "video_encoder adds a video branch to an audio model: the encoder reads "
                    f"{encoder.modality!r} and the video_encoder {video_encoder.modality!r}"
                )
        if encoder.modality not in MODALITY_ORDER:
            raise ValueError(f"unknown modality {encoder.modality!r}; known: {MODALITY_ORDER}")
        self.task_modalities = {
            **TASK_MODALITIES,
            **{t: tuple(m) for t, m in (task_modalities or {}).items()},
        }
        for task, mods in self.task_modalities.items():
            bad = [m for m in mods if m not in MODALITY_ORDER]
            if bad or not mods:
                raise ValueError(f"task_modalities[{task!r}]={list(mods)}: use {MODALITY_ORDER}")
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

    def branches(self) -> dict[str, tuple[Encoder, Projector]]:
        """Modality -> (encoder, projector), in sequence order."""
        found = {self.encoder.modality: (self.encoder, self.projector)}
        if self.video_encoder is not None and self.video_projector is not None:
            found["video"] = (self.video_encoder, self.video_projector)
        return {m: found[m] for m in MODALITY_ORDER if m in found}

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities this model reads, in sequence order."""
        return tuple(self.branches())

    @property
    def default_task(self) -> str:
        """The task that uses every input this model reads: ``asr``, ``vsr`` or ``avsr``."""
        return {("video",): "vsr", ("audio", "video"): "avsr"}.get(self.modalities, "asr")

    def modalities_of(self, task: str) -> tuple[str, ...]:
        """The spans a sample of ``task`` gets; a task the model cannot serve is an error."""
        wanted = self.task_modalities.get(task, self.modalities)
        missing = [m for m in wanted if m not in self.modalities]
        if missing:
            raise ValueError(
                f"task {task!r} needs {missing[0]} but this model reads only "
                f"{list(self.modalities)}; give the data a task it serves "
                f"(e.g. data.task: {self.default_task})"
            )
        return wanted

    def _tasks(self, batch: dict[str, Any]) -> list[str]:
        return list(batch.get("task") or ["asr"] * len(batch["texts"]))

    def encode(self, batch: dict[str, Any]) -> Encoded:
        """Frames ``[B, T, D]`` and lengths per modality the batch's tasks need; computed once
        and reused across compression rates."""
        needed = {m for t in set(self._tasks(batch)) for m in self.modalities_of(t)}
        return {
            m: (batch["encoder_features"], batch["encoder_lengths"])  # feature cache
            if enc is self.encoder and "encoder_features" in batch
            else enc.encode_batch(batch)
            for m, (enc, _) in self.branches().items()
            if m in needed
        }

    def _spans(self, batch: dict[str, Any], encoded: Encoded | None = None) -> list[torch.Tensor]:
        encoded = encoded if encoded is not None else self.encode(batch)
        pieces: dict[str, list[torch.Tensor]] = {}
        for m, (_, projector) in self.branches().items():
            if m not in encoded:
                continue
            emb, lengths = projector(*encoded[m])
            begin, end = projector.begin[None].to(emb.dtype), projector.end[None].to(emb.dtype)
            pieces[m] = [
                torch.cat([begin, emb[i, : int(n)], end]) for i, n in enumerate(lengths.tolist())
            ]
        spans = []
        for i, task in enumerate(self._tasks(batch)):
            spans.append(torch.cat([pieces[m][i] for m in self.modalities_of(task)]))
        return spans

    def _segments(self, batch: dict[str, Any]) -> tuple[list[list[int]], list[list[int]]]:
        tasks = self._tasks(batch)
        metas = batch.get("meta") or [{}] * len(tasks)
        heads, tails = [], []
        for task, meta in zip(tasks, metas, strict=True):
            key = prompt_key(self.prompt.prompts, task, meta)
            fields = {}
            for f in self.prompt.fields(key):
                try:
                    fields[f] = prompt_value(f, meta)
                except KeyError:
                    raise KeyError(
                        f"task {task!r} needs sample field {f!r} in its json (prompt {key!r})"
                    ) from None
            h, t = self.prompt.segments(key, **fields)
            heads.append(h)
            tails.append(t)
        return heads, tails

    @property
    def attn_implementation(self) -> str | None:
        """The LLM's attention kernel as transformers resolved it (``sdpa``, ``eager`` ...)."""
        config = getattr(self.llm.model, "config", None)
        found = getattr(config, "_attn_implementation", None)
        return found or getattr(self.llm, "attn_implementation", None)

    def packing_layout(self) -> str:
        """How :meth:`forward` lays out the batch: ``none``, ``rows`` (block-diagonal mask) or
        ``flat`` (one unpadded row, FlashAttention varlen)."""
        if not self.packing:
            return "none"
        return "flat" if is_flash(self.attn_implementation) else "rows"

    def splice_batch(
        self,
        batch: dict[str, Any],
        train: bool,
        encoded: Encoded | None = None,
        packing: str = "none",
    ) -> Spliced:
        """The LLM input of ``batch``; ``packing`` (``rows``/``flat``, training only) packs
        several samples per row (see :func:`mmalign.llm.prompt.splice`)."""
        heads, tails = self._segments(batch)
        targets = [self.prompt.target(t) for t in batch["texts"]] if train else None
        if packing != "none" and not train:
            raise ValueError("packing is for training: decoding pads left, one row a sample")
        return splice(
            self.llm.embed,
            heads,
            self._spans(batch, encoded),
            tails,
            targets,
            padding_side="right" if train else "left",
            packing=packing,
            max_packed_tokens=self.max_packed_tokens,
        )

    def forward(self, batch: dict[str, Any], encoded: Encoded | None = None) -> torch.Tensor:
        """Mean cross-entropy over target tokens and EOS (at the active rate).

        Logits are computed only at positions that predict a target token (``logits_to_keep``
        with an index tensor): the prompt and modality positions never need the vocabulary
        projection, which is a fifth of a small LLM's compute. ``encoded`` (from :meth:`encode`)
        skips the encoder. With ``packing`` the batch is packed (see :meth:`packing_layout`);
        the mean runs over the same target tokens, so the loss is the unpacked one.
        """
        self.activate_rate()
        s = self.splice_batch(batch, train=True, encoded=encoded, packing=self.packing_layout())
        predicts = (s.labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)
        masking = {"use_cache": False, **attention_inputs(s, self.attn_implementation)}
        out = self.llm.model(  # no KV cache: training never reuses it
            inputs_embeds=s.inputs_embeds, logits_to_keep=predicts, **masking
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


def _check_widths(name: str, projector: Projector, encoder: Encoder, llm: CausalLM) -> None:
    if projector.in_dim != encoder.dim or projector.out_dim != llm.hidden_size:
        raise ValueError(
            f"{name} maps {projector.in_dim}->{projector.out_dim} but its encoder's width "
            f"is {encoder.dim} and the LLM width is {llm.hidden_size}"
        )
