"""Which adapters each LLM pass runs with: compression rates, task adapters, prompt scaling.

Mixed into :class:`mmalign.model.SpeechLLM`, whose constructor sets the attributes used here
(``projector``, ``llm``, ``lora_strategy``, ``task_adapters``, ``prompt_scaler``,
``_delta_scale``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmalign.llm.load import CausalLM, is_checkpointing
from mmalign.llm.lora import activate, active_adapters, task_adapter_map


class AdapterRouting:
    """Switches the LLM's adapters before every LLM call of a :class:`~mmalign.model.SpeechLLM`.

    A multi-rate projector (``rates`` + ``set_rate``, e.g. ``MatryoshkaProjector``) makes this a
    Matryoshka model: ``lora_strategy`` (see :mod:`mmalign.llm.lora`) lays out its adapters, and
    before every LLM call the adapters of the projector's active rate are switched on, so
    ``model.projector.set_rate(r)`` (what ``mmalign evaluate`` calls) or :meth:`set_rate` is all
    it takes to decode at another rate.

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
    """

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
