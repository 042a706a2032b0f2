"""What the LLM reads: modality branches, encoded and projected spans, prompts, splicing.

Mixed into :class:`mmalign.model.SpeechLLM`, whose constructor sets the attributes used here
(``encoder``, ``projector``, ``video_encoder``, ``video_projector``, ``task_modalities``,
``llm``, ``prompt``, ``ctc``, ``ctc_shrink``, ``ctc_embed``, ``packing``, ``max_packed_tokens``).
"""

from __future__ import annotations

from typing import Any

import torch

from mmalign.data.tasks import prompt_key, prompt_value
from mmalign.encoders.base import Encoder
from mmalign.llm.prompt import Spliced, is_flash, splice
from mmalign.projectors.base import Projector

Encoded = dict[str, tuple[torch.Tensor, torch.Tensor]]  # modality -> (frames [B, T, D], lengths)

MODALITY_ORDER = ("audio", "video")  # span order in the LLM's sequence
TASK_MODALITIES: dict[str, tuple[str, ...]] = {
    "asr": ("audio",),
    "st": ("audio",),
    "vsr": ("video",),
    "avsr": ("audio", "video"),
}


class ModelInputs:
    """Encoders, projectors and prompts of a :class:`~mmalign.model.SpeechLLM` batch.

    Modalities (the Llama-AVSR layout): ``encoder``/``projector`` form the main branch, of
    whatever modality the encoder reads; ``video_encoder``/``video_projector`` add a video
    branch to an audio model. Each sample's task picks the spans it gets (``asr``: audio,
    ``vsr``: video, ``avsr``: both, audio first; ``task_modalities`` extends the map), so one
    model serves ASR, VSR and AVSR, and only the encoders some sample needs are run.
    """

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
