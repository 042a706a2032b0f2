"""SpeechLLM: encoders -> projectors -> spliced prompt -> LLM; plain torch, no Lightning needed.

The class is assembled from one part per concept: :mod:`mmalign.model.inputs` (modality
branches, spans, prompts, splicing), :mod:`mmalign.model.adapters` (which adapters each LLM pass
runs with: rates, task adapters, prompt-aware scaling) and :mod:`mmalign.model.decoding`
(generation); this module builds the model and computes its losses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmalign.encoders.base import Encoder
from mmalign.llm.load import CausalLM
from mmalign.llm.lora import (
    activate,
    add_named_adapters,
    add_rate_adapters,
    check_strategy,
    task_adapter_names,
)
from mmalign.llm.prompt import (
    IGNORE_INDEX,
    PromptBuilder,
    attention_inputs,
    splice,
    to_device,
)
from mmalign.llm.scaling import DeltaScale, PromptScaler
from mmalign.model.adapters import AdapterRouting
from mmalign.model.decoding import Decoding
from mmalign.model.inputs import MODALITY_ORDER, TASK_MODALITIES, Encoded, ModelInputs
from mmalign.projectors.base import Projector
from mmalign.projectors.ctc import VocabCTC

CTC_TASKS = ("asr", "avsr")  # tasks whose target is what was said


class SpeechLLM(ModelInputs, AdapterRouting, Decoding, nn.Module):
    """The whole model; training and decoding both go through :meth:`splice_batch`.

    Batch keys used: each encoder's inputs (``audio_features [B, n_mels, T]`` + ``audio_lengths``,
    ``video [B, Tv, 1, H, W]`` + ``video_lengths``) or, read from a feature cache,
    ``encoder_features [B, T', D]`` + ``encoder_lengths`` (the encoder's stored output: it is
    not run), ``texts``, ``task`` (list of task names),
    optionally ``meta`` (per-sample dicts for prompt fields) and ``durations [B]`` (seconds;
    bounds the number of generated tokens).

    Modalities, spans and splicing: :class:`~mmalign.model.inputs.ModelInputs`; rates
    (Matryoshka), ``task_adapters`` and ``prompt_aware_scaling``:
    :class:`~mmalign.model.adapters.AdapterRouting`; decoding:
    :class:`~mmalign.model.decoding.Decoding`.

    ``packing`` (training loss only): several samples share one LLM row, laid end to end,
    position ids restarting at 0 with each and attention kept within each (a block-diagonal
    causal mask under SDPA and eager attention; FlashAttention's padding-free varlen kernel,
    all samples in one unpadded row, under ``flash_attention_2``/``_3``). Rows are filled
    first-fit-decreasing by length up to ``max_packed_tokens`` (default: the batch's longest
    sample, so no row is longer than unpacked padding makes it). The loss is that of the
    unpacked batch; decoding is never packed.

    ``ctc`` adds :attr:`ctc`, the blank and scale of a CTC loss of the audio projector's outputs
    against the LLM's token embeddings (:meth:`ctc_loss`; training schedules it). ``ctc_shrink``
    (Soundwave's shrinking) gives the LLM only the audio frames at which the CTC head emits a
    token: about one vector per spoken token, already near that token's embedding, instead of
    12.5 frames a second of which most are blanks. ``ctc_embed`` (LegoSLM) replaces each kept
    frame by the token embeddings weighted by the head's posterior there, so the frozen LLM reads
    near-text from its first step.
    """

    # SpeechLLM arguments that describe the adapter layout (exports and checkpoints keep them)
    ADAPTER_OPTIONS = ("task_adapters", "prompt_aware_scaling", "prompt_scaling_dim")

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
        task_adapters: dict[str, str | list[str]] | None = None,
        prompt_aware_scaling: bool = False,
        prompt_scaling_dim: int = 64,
        ctc: bool = False,
        ctc_shrink: bool = False,
        ctc_embed: bool = False,
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
        self.task_adapters = self._check_task_adapters(task_adapters, llm, lora_strategy)
        if self.task_adapters is not None and llm.adapter is not None:
            names = add_named_adapters(
                llm.model, llm.adapter, task_adapter_names(self.task_adapters)
            )
            activate(llm.model, names)  # all of them until a batch picks its own
        self.prompt_aware_scaling = bool(prompt_aware_scaling)
        self.prompt_scaling_dim = prompt_scaling_dim
        self.prompt_scaler = (
            PromptScaler(llm.hidden_size, prompt_scaling_dim) if prompt_aware_scaling else None
        )
        self._delta_scale = DeltaScale()
        if ctc and encoder.modality != "audio":
            raise ValueError("ctc=True aligns an audio projector; this model's encoder reads video")
        self.ctc = VocabCTC(llm.hidden_size) if ctc else None
        if ctc_shrink and not ctc:
            raise ValueError("ctc_shrink=True keeps the frames a CTC head picks: set ctc=True")
        self.ctc_shrink = bool(ctc_shrink)
        if ctc_embed and not ctc_shrink:
            raise ValueError("ctc_embed=True embeds the frames ctc_shrink keeps: set ctc_shrink")
        self.ctc_embed = bool(ctc_embed)
        self.activate_rate()

    def forward(
        self,
        batch: dict[str, Any],
        encoded: Encoded | None = None,
        reduction: str = "mean",
        projected: Encoded | None = None,
    ) -> torch.Tensor:
        """Mean cross-entropy over target tokens and END (at the active rate); ``reduction="sum"``
        gives the sum, for training that divides by the optimizer step's token count.

        Logits are computed only at the (row, position) pairs that predict a target token: the
        prompt, modality and padding positions never need the vocabulary projection, which is a
        fifth of a small LLM's compute and most of its activation memory. ``encoded`` (from
        :meth:`encode`) skips the encoder, ``projected`` (from :meth:`project`) the projector
        too. With ``packing`` the batch is packed (see
        :meth:`packing_layout`); the loss runs over the same target tokens, so it is the unpacked
        one. With ``task_adapters`` each adapter group has its own LLM pass and the group sums
        add up: the mean is over the whole batch's target tokens.
        """
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction={reduction!r}: 'mean' or 'sum'")
        heads, tails = self._segments(batch)
        targets = [self.prompt.target(t) for t in batch["texts"]]
        spans = self._spans(batch, encoded, projected)
        total = None
        for names, idx in self.adapter_groups(batch):
            self._activate(names)
            part = self._loss(*([xs[i] for i in idx] for xs in (heads, spans, tails, targets)))
            total = part if total is None else total + part
        assert total is not None
        return total if reduction == "sum" else total / sum(len(t) for t in targets)

    def ctc_loss(
        self, batch: dict[str, Any], projected: Encoded | None = None
    ) -> tuple[torch.Tensor, int]:
        """``(summed CTC loss, samples skipped)`` of the audio projector's outputs against the
        transcript's tokens in the LLM vocabulary (see :mod:`mmalign.projectors.ctc`).

        Only transcription samples (``asr``, ``avsr``) take part: a translation's target is not
        what was said. A sample whose output is shorter than CTC needs is skipped and counted."""
        if self.ctc is None:
            raise ValueError("this model has no CTC head: build it with ctc=True")
        rows = [i for i, t in enumerate(self._tasks(batch)) if t in CTC_TASKS]
        if not rows:
            return self.ctc.blank.sum() * 0.0, 0
        projected = projected if projected is not None else self.project(batch)
        frames, lengths = projected["audio"]
        targets = [self.prompt.target(batch["texts"][i])[:-1] for i in rows]
        vocab = self.llm.model.get_input_embeddings().weight
        lengths = lengths.tolist()
        return self.ctc.loss(frames[rows], [lengths[i] for i in rows], targets, vocab)

    def target_tokens(self, batch: dict[str, Any]) -> int:
        """Number of target tokens (EOS included) the loss of ``batch`` is taken over."""
        return sum(len(self.prompt.target(t)) for t in batch["texts"])

    def _loss(self, heads: list, spans: list, tails: list, targets: list) -> torch.Tensor:
        """Summed cross-entropy of one LLM pass over these samples (the active adapters)."""
        s = splice(
            self.llm.embed,
            heads,
            spans,
            tails,
            targets,
            padding_side="right",
            packing=self.packing_layout(),
            max_packed_tokens=self.max_packed_tokens,
        )
        assert s.labels is not None
        # the (row, position) pairs that predict a label, found on the host: no device sync
        rows, cols = (s.labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
        device = s.inputs_embeds.device
        labels = to_device(s.labels[rows, cols + 1], device)
        masking = {"use_cache": False, **attention_inputs(s, self.attn_implementation)}
        parts = self.llm.body_and_head()
        self._scale_adapters(heads, tails, s.sequence_ids)
        try:  # no KV cache: training never reuses it
            if parts is not None:  # the vocabulary projection at exactly those pairs
                body, head = parts
                hidden = body(inputs_embeds=s.inputs_embeds, **masking).last_hidden_state
                logits = head(hidden[to_device(rows, device), to_device(cols, device)])
            else:  # the positions any row needs (logits_to_keep), then the pairs among them
                keep = cols.unique()
                out = self.llm.model(
                    inputs_embeds=s.inputs_embeds, logits_to_keep=to_device(keep, device), **masking
                )
                at = torch.searchsorted(keep, cols)
                logits = out.logits[to_device(rows, device), to_device(at, device)]
        finally:
            self._unscale_adapters()
        return F.cross_entropy(logits.float(), labels, reduction="sum")

    def loss_per_rate(
        self,
        batch: dict[str, Any],
        rates: Sequence[int],
        encoded: Encoded | None = None,
        reduction: str = "mean",
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
                losses[int(rate)] = self(batch, encoded, reduction)
        finally:
            self.set_rate(before)
        return losses


def _check_widths(name: str, projector: Projector, encoder: Encoder, llm: CausalLM) -> None:
    if projector.in_dim != encoder.dim or projector.out_dim != llm.hidden_size:
        raise ValueError(
            f"{name} maps {projector.in_dim}->{projector.out_dim} but its encoder's width "
            f"is {encoder.dim} and the LLM width is {llm.hidden_size}"
        )
