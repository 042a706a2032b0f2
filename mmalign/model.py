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
from mmalign.llm.load import CausalLM, is_checkpointing
from mmalign.llm.lora import (
    activate,
    active_adapters,
    add_named_adapters,
    add_rate_adapters,
    check_strategy,
    task_adapter_map,
    task_adapter_names,
)
from mmalign.llm.prompt import (
    IGNORE_INDEX,
    PromptBuilder,
    Spliced,
    attention_inputs,
    is_flash,
    splice,
    to_device,
)
from mmalign.llm.scaling import DeltaScale, PromptScaler
from mmalign.projectors.base import Projector
from mmalign.projectors.ctc import VocabCTC

Encoded = dict[str, tuple[torch.Tensor, torch.Tensor]]  # modality -> (frames [B, T, D], lengths)

MODALITY_ORDER = ("audio", "video")  # span order in the LLM's sequence
CTC_TASKS = ("asr", "avsr")  # tasks whose target is what was said
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

    ``task_adapters`` (modality- or task-specific LoRA, see :mod:`mmalign.llm.lora`) maps each
    task to the adapter(s) its samples run through, e.g. ``{asr: speech, st: [speech,
    translation], vsr: vision, avsr: [speech, vision]}``. The encoders and projectors run once
    for the whole batch; then the samples are grouped by adapter set and each group gets its
    own LLM pass with exactly its adapters active (peft's mixed-batch ``adapter_names=``
    forward is inference-only), so an adapter is trained only by its tasks' samples (the others
    leave its ``grad`` None). The loss is the mean over all the batch's target tokens, as
    without groups (each group's mean weighted by its share of target tokens); decoding groups
    the same way and returns the texts in batch order.

    ``prompt_aware_scaling`` (WavLLM) adds :attr:`prompt_scaler`, a small trainable head that
    reads the mean of each sample's prompt-token embeddings and scales the output of every
    adapter for that sample (see :mod:`mmalign.llm.scaling`); ``prompt_scaling_dim`` is its
    hidden width.

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

    @staticmethod
    def _check_task_adapters(
        task_adapters: dict[str, str | list[str]] | None, llm: CausalLM, lora_strategy: str
    ) -> dict[str, tuple[str, ...]] | None:
        if task_adapters is None:
            return None
        mapping = task_adapter_map(task_adapters)
        if lora_strategy != "shared":
            raise ValueError(
                f"task_adapters and lora_strategy {lora_strategy!r} cannot be combined: "
                "use lora_strategy 'shared' (one adapter set for every rate)"
            )
        from mmalign.llm.tuners import DATA_INITS, init_of, managed

        init = init_of(llm.adapter)
        if managed(init) or init in DATA_INITS or init in ("pissa", "olora"):
            raise ValueError(
                f"init_lora_weights={init!r} initialises one adapter (or moves frozen weights "
                "into it); task_adapters holds several: use a data-free init (true, gaussian)"
            )
        if len(set(mapping.values())) > 1 and is_checkpointing(llm.model):
            raise ValueError(
                "task_adapters with several adapter sets cannot use LLM gradient "
                "checkpointing: recomputation in backward would run every group's layers "
                "with the last group's adapters"
            )
        return mapping

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

    def adapters_of(self, task: str) -> tuple[str, ...]:
        """The adapters a sample of ``task`` runs through (``task_adapters`` only)."""
        assert self.task_adapters is not None
        if task not in self.task_adapters:
            raise KeyError(
                f"task {task!r} has no adapter in task_adapters "
                f"({ {t: list(n) for t, n in self.task_adapters.items()} }); add it"
            )
        return self.task_adapters[task]

    def adapter_groups(
        self, batch: dict[str, Any]
    ) -> list[tuple[tuple[str, ...] | None, list[int]]]:
        """``(adapter names, sample indices)`` per LLM pass, in order of first appearance;
        one group of every sample (names None: the rate's adapters) without task adapters."""
        tasks = self._tasks(batch)
        if self.task_adapters is None:
            return [(None, list(range(len(tasks))))]
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, task in enumerate(tasks):
            groups.setdefault(self.adapters_of(task), []).append(i)
        return list(groups.items())

    def _activate(self, names: tuple[str, ...] | None) -> None:
        if names is None:
            self.activate_rate()
            return
        if not hasattr(self.llm.model, "peft_config"):
            raise ValueError("task_adapters needs an LLM adapter (model.llm.init_args.adapter)")
        activate(self.llm.model, names)

    def prompt_scales(self, heads: Sequence[Sequence[int]], tails: Sequence[Sequence[int]]):
        """Per-sample adapter scales ``[B]`` from the mean embedding of each sample's prompt
        tokens (head and tail around the modality span; one scaler call per distinct prompt)."""
        if self.prompt_scaler is None:
            raise ValueError("prompt_aware_scaling is off")
        keys = [(tuple(h), tuple(t)) for h, t in zip(heads, tails, strict=True)]
        distinct = list(dict.fromkeys(keys))
        weight = self.llm.model.get_input_embeddings().weight
        pooled = []
        for head, tail in distinct:
            ids = torch.tensor([*head, *tail], dtype=torch.long, device=weight.device)
            emb = self.llm.embed(ids)
            pooled.append(emb.mean(0) if len(ids) else emb.new_zeros(weight.shape[1]))
        scales = self.prompt_scaler(torch.stack(pooled))
        where = {k: i for i, k in enumerate(distinct)}
        return scales[torch.tensor([where[k] for k in keys], device=scales.device)]

    def _scale_adapters(self, heads, tails, sequence_ids: torch.Tensor | None = None) -> None:
        """Set the per-sample adapter scales of the next LLM call (prompt-aware scaling)."""
        if self.prompt_scaler is None:
            return
        if not self._delta_scale.install(self.llm.model):
            raise ValueError(
                "prompt_aware_scaling needs an adapter on the LLM's layers (LoRA, DoRA, VeRA "
                "...); this LLM has none"
            )
        self._delta_scale.set(self.prompt_scales(heads, tails), sequence_ids)

    def _unscale_adapters(self) -> None:
        """Drop the scales after an LLM call, unless backward recomputes the layers."""
        if self.prompt_scaler is not None and not is_checkpointing(self.llm.model):
            self._delta_scale.clear()

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

    def project(self, batch: dict[str, Any], encoded: Encoded | None = None) -> Encoded:
        """Projector outputs ``[B, T', H]`` and lengths per modality (from :meth:`encode`)."""
        encoded = encoded if encoded is not None else self.encode(batch)
        return {m: p(*encoded[m]) for m, (_, p) in self.branches().items() if m in encoded}

    def _spans(
        self,
        batch: dict[str, Any],
        encoded: Encoded | None = None,
        projected: Encoded | None = None,
    ) -> list[torch.Tensor]:
        projected = projected if projected is not None else self.project(batch, encoded)
        pieces: dict[str, list[torch.Tensor]] = {}
        for m, (_, projector) in self.branches().items():
            if m not in projected:
                continue
            emb, lengths = projected[m]
            begin, end = projector.begin[None].to(emb.dtype), projector.end[None].to(emb.dtype)
            if m == "audio" and self.ctc_shrink:
                assert self.ctc is not None
                vocab = self.llm.model.get_input_embeddings().weight
                frames = self.ctc.shrink(emb, lengths.tolist(), vocab)
                if self.ctc_embed:
                    frames = [self.ctc.embed(f, vocab) for f in frames]
            else:
                frames = [emb[i, : int(n)] for i, n in enumerate(lengths.tolist())]
            pieces[m] = [torch.cat([begin, f, end]) for f in frames]
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
        group is decoded with its own adapters; the texts come back in batch order.
        """
        if max_new_tokens is None:
            durations = batch.get("durations")
            longest = float(max(durations)) if durations is not None else 30.0
            max_new_tokens = int(math.ceil(longest * tokens_per_second)) + 16
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
            try:
                out = self.llm.model.generate(
                    inputs_embeds=s.inputs_embeds,
                    attention_mask=s.attention_mask,
                    max_new_tokens=max_new_tokens,
                    num_beams=num_beams,
                    eos_token_id=self.prompt.stop_ids,
                    pad_token_id=tok.pad_token_id,
                    **generate_kwargs,
                )
            finally:
                self._delta_scale.clear()
            decoded = [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]
            if len(groups) == 1:
                return decoded  # several sequences per sample (num_return_sequences) allowed
            for i, text in zip(idx, decoded, strict=True):
                texts[i] = text
        return texts


def _check_widths(name: str, projector: Projector, encoder: Encoder, llm: CausalLM) -> None:
    if projector.in_dim != encoder.dim or projector.out_dim != llm.hidden_size:
        raise ValueError(
            f"{name} maps {projector.in_dim}->{projector.out_dim} but its encoder's width "
            f"is {encoder.dim} and the LLM width is {llm.hidden_size}"
        )
