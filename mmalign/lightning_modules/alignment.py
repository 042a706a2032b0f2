"""AlignmentModule: trains projector + adapters of a SpeechLLM; frozen parts never hit disk."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from mmalign.data.tasks import TRANSLATION_TASKS
from mmalign.encoders.base import Encoder
from mmalign.eval.metrics import error_rates, example, translation_metrics
from mmalign.llm.load import CausalLM
from mmalign.llm.tuners import (
    OFFSET_A,
    OFFSET_B,
    calibrate,
    check_strategy,
    offset_buffer_names,
    sync_base_offsets,
)
from mmalign.model import CTC_TASKS, SpeechLLM
from mmalign.projectors.base import Projector

log = logging.getLogger(__name__)

ProjectorFactory = Callable[[int, int], Projector]
SchedulerFactory = Callable[[Optimizer, int], LRScheduler]
OFFSET_SUFFIXES = (OFFSET_A, OFFSET_B)  # adapter init offsets (see mmalign.llm.tuners)


def _gather(items: list[Any]) -> list[Any]:
    """Every rank's ``items``, rank by rank (the list itself without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, items)
        return [o for part in parts for o in part]
    return items


def _clean(name: str) -> str:
    """A parameter name without FSDP / activation-checkpoint wrapper parts (state dicts have
    none)."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


class AlignmentModule(L.LightningModule):
    """Lightning wrapper around :class:`SpeechLLM`.

    Args:
        encoder: frozen feature encoder (e.g. ``mmalign.encoders.whisper.WhisperEncoder``).
        projector: projector class with its settings; built as ``projector(encoder.dim,
            llm.hidden_size)`` so widths are never repeated in the config.
        llm: the frozen LLM with its peft adapter.
        optimizer: built over trainable parameters only.
        scheduler: built as ``scheduler(optimizer, total_steps)``, stepped every step.
        prompts: task name -> prompt text with a ``{modality}`` placeholder.
        system_prompt: optional system turn for chat templates.
        normalizer: text normaliser for WER (``english``, ``basic``, ``none``).
        num_beams: beam width for validation/test decoding (1 = greedy).
        max_new_tokens: decoding cap; by default derived from each batch's duration.
        predictions_dir: where ``test`` writes ``utterances.jsonl`` (default: the log dir).
        log_examples: how many reference/hypothesis pairs to print after val/test.
        lora_strategy: multi-rate projectors only: ``shared`` (one adapter for all rates),
            ``per_rate`` or ``shared+per_rate`` (see :mod:`mmalign.llm.lora`).
        rate_sampling: multi-rate projectors only: ``all`` averages the loss over every rate
            each step (the encoder runs once), ``sample`` trains one drawn rate per step.
        rate_weights: one weight per projector rate: the weighted mean in ``all`` mode, the
            draw probabilities in ``sample`` mode (default: uniform).
        rate_seed: seed of the rate draws; a draw depends only on (seed, step, batch index),
            so resumed and multi-device runs draw the same rates. With ``sample`` and
            per-rate adapters under DDP, set the strategy's ``find_unused_parameters: true``.
        video_encoder: optional video encoder (e.g. ``CLIPVideoEncoder``) beside an audio
            ``encoder``: an audio-visual model (see :class:`mmalign.model.SpeechLLM`).
        video_projector: projector class for the video branch, built like ``projector``.
        task_modalities: extra task name -> modalities (``audio``, ``video``) entries.
        init_from: a checkpoint of an earlier run (a curriculum stage) whose trained weights
            (projectors, LoRA, trainable encoder parts) this model starts from; optimizer,
            scheduler and step count start afresh.
        init_adapter: ``continue`` trains the loaded LoRA on; ``fresh`` loads everything but
            the LoRA, so the stage trains a new adapter from its usual initialisation.
        modality_dropout: training only: probabilities that an ``avsr`` sample is trained as
            ``asr`` (video dropped) or ``vsr`` (audio dropped), e.g. ``{asr: 0.25, vsr: 0.25}``,
            so one model serves all three tasks. Drawn from (``rate_seed``, step, batch index,
            sample), so resumed runs draw the same. A batch may then leave one branch unused:
            under DDP set the strategy's ``find_unused_parameters: true``.
        max_nonfinite_steps: a step whose loss or gradients are not finite is skipped (no
            optimizer update) and counted (``train/nonfinite_steps``); this many in a row stop
            the run with an error. Under 16-bit AMP the grad scaler handles this instead.
        packing: pack several short samples into one LLM row for the loss (training and the
            validation loss; decoding is never packed), attention kept within each sample and
            position ids restarting per sample: the loss is the unpacked one, with less
            padding (see :class:`mmalign.model.SpeechLLM`).
        max_packed_tokens: longest packed row; default: the batch's longest sample, so no
            row is longer than unpacked padding makes it.
        adapter_init_batches: training batches of the calibration pass that a data-driven
            adapter initialisation (``init_lora_weights`` ``eva``, ``corda``, ``lora_ga``,
            ``lora_one``) runs at the start of ``fit``, through the real forward and loss,
            before the optimizer exists (see :mod:`mmalign.llm.tuners`); not when
            ``init_from`` continues a trained adapter.
        task_adapters: modality/task-specific adapters: task -> adapter name(s), e.g.
            ``{asr: speech, st: [speech, translation]}``; each sample runs (and trains) only
            its task's adapters (see :class:`mmalign.model.SpeechLLM`). A batch may leave an
            adapter unused: under DDP set the strategy's ``find_unused_parameters: true``.
        prompt_aware_scaling: a trainable head reads each sample's pooled prompt embedding
            and scales every adapter's output for that sample (WavLLM; see
            :mod:`mmalign.llm.scaling`); ``prompt_scaling_dim`` is its hidden width.
        ctc_weight: weight of a CTC loss of the audio projector's outputs against the
            transcript's tokens in the LLM's own vocabulary, added to the LLM loss (both per
            target token); 0 = off. See :mod:`mmalign.projectors.ctc`.
        ctc_only_steps: the first this many optimizer steps train the projector with the CTC
            loss alone, without running the LLM (Soundwave's alignment stage; each step costs
            the encoder and projector only); then the LLM loss (plus ``ctc_weight`` x CTC).
            The adapter has no gradient in those steps: under DDP set the strategy's
            ``find_unused_parameters: true``.
        projector_warmup_steps: the first this many steps update the projector only (the
            adapter's gradients are dropped), so LoRA starts on inputs that already carry speech.
        ctc_shrink: the LLM reads only the audio frames at which the CTC head emits a token
            (about one per spoken token) instead of every frame; see :class:`SpeechLLM`. Train
            the head first (``ctc_only_steps``) and keep it learning (``ctc_weight``).
        ctc_embed: with ``ctc_shrink``, the LLM reads the token embeddings weighted by the CTC
            head's posterior at each kept frame (LegoSLM) instead of the projector's frame.

    Randomness inside a training step (LoRA and projector dropout) is seeded from
    (``rate_seed``, step, batch index, rank), so a resumed run repeats an uninterrupted one.
    Batches marked ``pad`` (ranks evened out at the end of an exact epoch) train with weight 0
    and are not evaluated.

    With a multi-rate projector, validation and test decode at every rate and log
    ``val/wer_r{rate}`` (and ``cer``/``loss``) per rate, with ``val/wer`` at the default rate.
    """

    def __init__(
        self,
        encoder: Encoder,
        projector: ProjectorFactory,
        llm: CausalLM,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: SchedulerFactory | None = None,
        prompts: dict[str, str] | None = None,
        system_prompt: str | None = None,
        normalizer: str = "english",
        num_beams: int = 1,
        max_new_tokens: int | None = None,
        predictions_dir: str | None = None,
        log_examples: int = 3,
        lora_strategy: str = "shared",
        rate_sampling: str = "all",
        rate_weights: list[float] | None = None,
        rate_seed: int = 0,
        video_encoder: Encoder | None = None,
        video_projector: ProjectorFactory | None = None,
        task_modalities: dict[str, list[str]] | None = None,
        modality_dropout: dict[str, float] | None = None,
        init_from: str | None = None,
        init_adapter: str = "continue",
        max_nonfinite_steps: int = 10,
        packing: bool = False,
        max_packed_tokens: int | None = None,
        adapter_init_batches: int = 8,
        task_adapters: dict[str, str | list[str]] | None = None,
        prompt_aware_scaling: bool = False,
        prompt_scaling_dim: int = 64,
        ctc_weight: float = 0.0,
        ctc_only_steps: int = 0,
        projector_warmup_steps: int = 0,
        ctc_shrink: bool = False,
        ctc_embed: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("ctc_only_steps", ctc_only_steps),
                            ("projector_warmup_steps", projector_warmup_steps)):  # fmt: skip
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"model.{name}={value!r}: an int >= 0")
        if not ctc_weight >= 0:
            raise ValueError(f"model.ctc_weight={ctc_weight!r}: a number >= 0")
        self.ctc_weight = float(ctc_weight)
        self.ctc_only_steps = ctc_only_steps
        self.projector_warmup_steps = projector_warmup_steps
        if (video_encoder is None) != (video_projector is None):
            raise ValueError("model.video_encoder and model.video_projector come together")
        check_strategy(llm, lora_strategy)
        self.adapter_init_batches = adapter_init_batches
        self.model = SpeechLLM(
            encoder,
            projector(encoder.dim, llm.hidden_size),
            llm,
            prompts,
            system_prompt,
            lora_strategy=lora_strategy,
            video_encoder=video_encoder,
            video_projector=(
                video_projector(video_encoder.dim, llm.hidden_size)
                if video_encoder is not None and video_projector is not None
                else None
            ),
            task_modalities=task_modalities,
            packing=packing,
            max_packed_tokens=max_packed_tokens,
            task_adapters=task_adapters,
            prompt_aware_scaling=prompt_aware_scaling,
            prompt_scaling_dim=prompt_scaling_dim,
            ctc=self.ctc_weight > 0 or ctc_only_steps > 0 or ctc_shrink,
            ctc_shrink=ctc_shrink,
            ctc_embed=ctc_embed,
        )
        if (task_adapters is not None or prompt_aware_scaling) and llm.adapter is None:
            raise ValueError(
                "model.task_adapters and model.prompt_aware_scaling need an LLM adapter "
                "(model.llm.init_args.adapter)"
            )
        self.modality_dropout = self._check_dropout(modality_dropout)
        self.rate_sampling = rate_sampling
        self.rate_seed = rate_seed
        self.rate_weights = self._check_rates(rate_sampling, rate_weights, lora_strategy)
        error_rates([], [], normalizer)  # fail now on an unknown normaliser name
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.normalizer = normalizer
        self.num_beams = num_beams
        self.max_new_tokens = max_new_tokens
        self.predictions_dir = predictions_dir
        self.log_examples = log_examples
        self._outputs: list[dict[str, Any]] = []
        self._skipped_total = 0
        self._ctc_skipped = 0
        self._ctc_outputs: list[tuple[str, str]] = []
        self._num_trainable: int | None = None
        if not isinstance(max_nonfinite_steps, int) or max_nonfinite_steps < 1:
            raise ValueError(f"model.max_nonfinite_steps={max_nonfinite_steps!r}: an int >= 1")
        self.max_nonfinite_steps = max_nonfinite_steps
        self._nonfinite_in_a_row = 0
        self._nonfinite_total = 0
        self._loss_finite: bool | torch.Tensor = True
        self._skipped_update = False
        self._step_tokens = 0  # target tokens of the optimizer step so far (this rank)
        self.strict_loading = False  # frozen weights are absent on purpose; checked below
        if init_adapter not in ("continue", "fresh"):
            raise ValueError(f"model.init_adapter={init_adapter!r}: use 'continue' or 'fresh'")
        self.init_from = init_from
        if init_from is not None:
            self.load_trained(init_from, skip_lora=init_adapter == "fresh")
            if init_adapter == "continue":  # the adapter is trained: no data-driven init
                self.model.llm.pending_init = None

    def load_trained(self, checkpoint: str, skip_lora: bool = False) -> list[str]:
        """Start from another run's trained weights (a curriculum stage): every trainable
        tensor of ``checkpoint`` must exist here with the same shape; optimizer, scheduler and
        step start afresh. ``skip_lora`` keeps this model's new LoRA (a fresh adapter)."""
        from mmalign.checkpoint_io import load_checkpoint_file

        ckpt = load_checkpoint_file(checkpoint)
        state = {
            k: v
            for k, v in ckpt["state_dict"].items()
            if not (skip_lora and ("lora_" in k or k.endswith(OFFSET_SUFFIXES)))
            and not (k.startswith("model.ctc.") and self.model.ctc is None)  # alignment done
        }
        own = dict(self.state_dict())
        trainable = self.trainable_names()
        unknown = [k for k in state if k not in own or k not in trainable]
        wrong = [
            f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}"
            for k, v in state.items()
            if k in own and v.shape != own[k].shape
        ]
        if unknown or wrong or not state:
            raise ValueError(
                f"model.init_from={checkpoint}: its weights do not fit this model "
                f"(not trainable here: {unknown[:3]}; shape mismatches: {wrong[:3]}"
                f"{'; nothing to load' if not state else ''})"
            )
        super().load_state_dict(state, strict=False)
        sync_base_offsets(self.model.llm)
        return sorted(state)

    def _check_rates(
        self, sampling: str, weights: list[float] | None, strategy: str
    ) -> list[float] | None:
        rates = self.model.rates
        if sampling not in ("all", "sample"):
            raise ValueError(f"rate_sampling {sampling!r} is not one of ('all', 'sample')")
        if rates is None:
            if weights is not None:
                raise ValueError("rate_weights needs a multi-rate projector (with `rates`)")
            return None
        weights = [1.0] * len(rates) if weights is None else [float(w) for w in weights]
        if len(weights) != len(rates) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(
                f"rate_weights {weights} must be one non-negative weight per rate {rates}, "
                "not all zero"
            )
        base = getattr(self.model.llm.model, "base_model", self.model.llm.model)
        checkpointing = getattr(base, "is_activation_checkpointing", None)
        if checkpointing is None:  # transformers < 5 name
            checkpointing = getattr(base, "is_gradient_checkpointing", False)
        if checkpointing and sampling == "all" and strategy != "shared":
            raise ValueError(
                f"rate_sampling 'all' with lora_strategy {strategy!r} cannot use LLM gradient "
                "checkpointing: recomputation in backward would run with the last rate's "
                "adapters; use rate_sampling 'sample' or lora_strategy 'shared'"
            )
        return weights

    def _check_dropout(self, dropout: dict[str, float] | None) -> dict[str, float]:
        dropout = {str(k): float(v) for k, v in (dropout or {}).items()}
        bad = [k for k in dropout if k not in ("asr", "vsr")]
        if bad or any(v < 0 for v in dropout.values()) or sum(dropout.values()) > 1:
            raise ValueError(
                f"model.modality_dropout={dropout}: keys 'asr'/'vsr', probabilities >= 0 "
                "summing to at most 1"
            )
        if dropout and set(self.model.modalities) != {"audio", "video"}:
            raise ValueError(
                "model.modality_dropout needs an audio-visual model (encoder + video_encoder)"
            )
        return dropout

    def drop_modalities(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """The batch with some ``avsr`` samples turned into ``asr``/``vsr`` (modality dropout)."""
        if not self.modality_dropout:
            return batch
        rng = np.random.default_rng([self.rate_seed, int(self.global_step), int(batch_idx), 7])
        names = ["avsr", *self.modality_dropout]
        p = [1.0 - sum(self.modality_dropout.values()), *self.modality_dropout.values()]
        draws = rng.choice(len(names), size=len(batch["texts"]), p=p)
        tasks = [
            names[int(d)] if t == "avsr" else t
            for t, d in zip(self.model._tasks(batch), draws, strict=True)
        ]
        return {**batch, "task": tasks}

    def _default_rate(self) -> int:
        """The rate ``val/wer`` is reported at: the projector's ``default_rate``, else its first."""
        rates = self.model.rates or [0]
        return int(getattr(self.model.projector, "default_rate", rates[0]))

    def training_rates(self, batch_idx: int) -> list[int]:
        """The rates this step trains: all of them, or one drawn from (seed, step, batch)."""
        rates = self.model.rates
        assert rates is not None and self.rate_weights is not None
        if self.rate_sampling == "all":
            return rates
        rng = np.random.default_rng([self.rate_seed, int(self.global_step), int(batch_idx)])
        p = np.asarray(self.rate_weights) / sum(self.rate_weights)
        return [rates[int(rng.choice(len(rates), p=p))]]

    # -- parameters and checkpoints -------------------------------------------------------

    def trainable_names(self) -> set[str]:
        """State-dict keys that a checkpoint carries: trainable parameters and projector buffers."""
        names = {_clean(n) for n, p in self.named_parameters() if p.requires_grad}
        names |= {f"model.projector.{n}" for n, _ in self.model.projector.named_buffers()}
        names |= {_clean(f"model.llm.{n}") for n in offset_buffer_names(self.model.llm)}
        if self.model.video_projector is not None:
            buffers = self.model.video_projector.named_buffers()
            names |= {f"model.video_projector.{n}" for n, _ in buffers}
        return names

    def num_trainable_parameters(self) -> int:
        """Counted before any strategy shards the parameters (FSDP would show one shard)."""
        if self._num_trainable is None:
            self._num_trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return self._num_trainable

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from mmalign.inference.export import CKPT_KEY, describe

        checkpoint[CKPT_KEY] = describe(self.model)  # plain JSON types: loads with weights_only
        keep = self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign=False):
        """Load trainable weights; every missing key must belong to a frozen part."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        sync_base_offsets(self.model.llm)  # frozen weights minus the loaded init offsets
        trainable = self.trainable_names()
        missing = [k for k in result.missing_keys if k in trainable]
        if missing or result.unexpected_keys:
            raise RuntimeError(
                "checkpoint does not match the model: missing trainable keys "
                f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected keys "
                f"{result.unexpected_keys[:5]}{'...' if len(result.unexpected_keys) > 5 else ''}"
            )
        return result

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: every parameter is frozen")
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, total)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        n_mels = getattr(self.model.encoder, "n_mels", None)
        if dm is not None and n_mels is not None and getattr(dm, "n_mels", n_mels) != n_mels:
            raise ValueError(
                f"data.n_mels={dm.n_mels} but the encoder expects {n_mels} mel bins; "
                "set data.init_args.n_mels to match"
            )
        if callable(getattr(dm, "limit_audio_to", None)):  # before any dataloader is built
            from mmalign.inference.decode import min_seconds

            encoder = self.model.encoder
            window = getattr(encoder, "max_seconds", None)
            dm.limit_audio_to(window, type(encoder).__name__, min_seconds(self.model))
        caches = getattr(dm, "caches", None) or {}
        if caches:  # feature caches: refuse one the model's encoder would not have written
            from mmalign.inference.encoder_identity import check_model_cache

            check_model_cache(self.model, caches, sample_rate=dm.sample_rate, n_mels=dm.n_mels)
        all_cached = bool(caches) and set(caches) == set(getattr(dm, "shard_sets", {}))
        keys = getattr(self.model.encoder, "input_keys", ())
        if (
            dm is not None
            and "audio" in keys
            and not getattr(dm, "keep_waveform", True)
            and not all_cached
        ):
            raise ValueError(
                f"{type(self.model.encoder).__name__} reads raw waveforms (batch['audio']); "
                "set data.keep_waveform: true"
            )
        adapter_sets = set((self.model.task_adapters or {}).values())
        if len(adapter_sets) > 1 and self._sharded():
            raise ValueError(
                "model.task_adapters with several adapter sets runs one LLM pass per set "
                "present in a batch, which sharded strategies (FSDP, DeepSpeed ZeRO-3) cannot "
                "keep in step across ranks; use DDP"
            )
        if stage == "fit":  # a data-driven adapter init: before the optimizer is built
            calibrate(self, self.adapter_init_batches)

    def on_fit_start(self) -> None:
        self.print(f"trainable parameters: {self.num_trainable_parameters():,}")

    # -- steps ----------------------------------------------------------------------------

    def _log_skipped(self, batch: dict[str, Any]) -> None:
        # batches carry the samples dropped as corrupt since the previous batch of their worker
        self._skipped_total += int(batch.get("skipped", 0))
        self.log("data/skipped", float(self._skipped_total), batch_size=len(batch["texts"]))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        seed = [self.rate_seed, int(self.global_step), int(batch_idx), int(self.global_rank), 11]
        torch.manual_seed(int(np.random.SeedSequence(seed).generate_state(1, np.uint64)[0] >> 1))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        # a pad batch (ranks evened out) runs the same computation as any other, so DDP and
        # FSDP see the same collectives on every rank, and trains with weight 0
        pad = bool(batch.get("pad"))
        bs = len(batch["texts"])
        batch = self.drop_modalities(batch, batch_idx)
        # summed over target tokens; on_before_optimizer_step divides the gradients by the
        # optimizer step's token count (all micro-batches, all ranks): see _token_weighted
        reduction = "sum" if self._token_weighted() else "mean"
        n = self.model.target_tokens(batch)
        per_token = n if reduction == "sum" else 1
        llm_weight, ctc_weight = self.loss_weights(int(self.global_step))
        encoded = projected = ctc = None
        if ctc_weight > 0:  # the encoder and projector run once for both losses
            encoded = self.model.encode(batch)
            projected = self.model.project(batch, encoded)
            ctc, skipped = self.model.ctc_loss(batch, projected)
            ctc = ctc if reduction == "sum" else ctc / n
            self._ctc_skipped += 0 if pad else skipped
            if not pad:
                self.log("train/ctc", ctc.detach() / per_token, prog_bar=True, batch_size=bs)
                self.log("train/ctc_skipped", float(self._ctc_skipped), batch_size=bs)
        if llm_weight == 0:
            assert ctc is not None
            loss = ctc_weight * ctc
        elif self.model.rates is None:
            loss = self.model(batch, encoded, reduction, projected)
        else:
            losses = self.model.loss_per_rate(
                batch, self.training_rates(batch_idx), encoded, reduction
            )
            weight = dict(zip(self.model.rates, self.rate_weights or [], strict=True))
            total = sum(weight[r] for r in losses)
            loss = sum(weight[r] * v for r, v in losses.items()) / total
            if not pad:
                for r, v in losses.items():
                    self.log(f"train/loss_r{r}", v.detach() / per_token, batch_size=bs)
        if llm_weight > 0 and not pad:
            self.log("train/loss", loss.detach() / per_token, prog_bar=True, batch_size=bs)
        if llm_weight > 0 and ctc is not None:
            loss = loss + ctc_weight * ctc
        if pad:
            return loss * 0.0  # no tokens: adds nothing to the step's gradient or its count
        self._step_tokens += n
        self._loss_finite = torch.isfinite(loss.detach()).all()  # read in optimizer_step: no sync
        self._log_skipped(batch)
        return loss

    def loss_weights(self, step: int) -> tuple[float, float]:
        """``(LLM loss weight, CTC weight)`` at optimizer step ``step``: CTC alone during the
        first ``ctc_only_steps``, then the LLM loss plus ``ctc_weight`` x CTC. A function of the
        step alone, so a resumed run follows the same schedule."""
        if step < self.ctc_only_steps:
            return 0.0, 1.0
        return 1.0, self.ctc_weight

    def _token_weighted(self) -> bool:
        """Whether the step's gradient is the mean over its target tokens (every strategy whose
        gradients mmalign sees: not DeepSpeed, which accumulates inside its engine)."""
        trainer = self._trainer
        return trainer is None or "DeepSpeed" not in type(trainer.strategy).__name__

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Make the gradient the mean over every target token of the optimizer step.

        Each micro-batch's loss is a token sum, which Lightning divides by
        ``accumulate_grad_batches`` and DDP/FSDP average over ranks; scaling by
        ``accumulate * world_size / tokens`` (tokens summed over micro-batches and ranks) turns
        that into the global token mean, so neither how the step was split into micro-batches
        nor a rank's pad batch changes it.
        """
        tokens, self._step_tokens = self._step_tokens, 0
        if self.global_step < self.projector_warmup_steps:  # AdamW skips a None gradient
            for p in self.model.llm.parameters():
                p.grad = None
        if not self._token_weighted():
            return
        grads = [p.grad for p in self.parameters() if p.requires_grad and p.grad is not None]
        if not grads:
            return
        trainer = self.trainer
        if trainer.world_size > 1:  # one collective (and one sync) per optimizer step
            count = torch.tensor(float(tokens), device=grads[0].device)
            tokens = int(trainer.strategy.reduce(count, reduce_op="sum").item())
        scale = trainer.accumulate_grad_batches * trainer.world_size / max(tokens, 1)
        torch._foreach_mul_(grads, scale)

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        """Skip the update when the loss or any gradient is not finite (all ranks agree).

        One fused norm over all gradients tells, so the check costs one device sync, not one per
        trainable tensor. A skipped step does not step the LR scheduler either (see
        :meth:`lr_scheduler_step`), so the schedule stays in step with the optimizer.
        """
        self._skipped_update = False
        if str(self.trainer.precision).startswith("16"):  # AMP's scaler skips such steps
            optimizer.step(closure=optimizer_closure)
            return
        if optimizer_closure is not None:
            optimizer_closure()
        grads = [p.grad for p in self.parameters() if p.requires_grad and p.grad is not None]
        finite = torch.as_tensor(self._loss_finite)
        if grads:
            norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
            finite = finite.to(norm.device) & torch.isfinite(norm)
        finite = bool(self.trainer.strategy.reduce_boolean_decision(bool(finite), all=True))
        self._loss_finite = True
        if finite:
            self._nonfinite_in_a_row = 0
            optimizer.step()
            return
        self._skipped_update = True
        self._step_tokens = 0
        optimizer.zero_grad(set_to_none=True)
        self._nonfinite_in_a_row += 1
        self._nonfinite_total += 1
        self.log("train/nonfinite_steps", float(self._nonfinite_total), rank_zero_only=True)
        log.warning(
            "step %d: non-finite loss or gradients, update skipped (%d in a row, %d in all)",
            self.global_step,
            self._nonfinite_in_a_row,
            self._nonfinite_total,
        )
        if self._nonfinite_in_a_row >= self.max_nonfinite_steps:
            raise FloatingPointError(
                f"{self._nonfinite_in_a_row} steps in a row had non-finite loss or gradients "
                f"(model.max_nonfinite_steps={self.max_nonfinite_steps}); lower the learning "
                "rate, check the data, or use bf16/fp32"
            )

    def lr_scheduler_step(self, scheduler: LRScheduler, metric: Any = None) -> None:
        """Lightning steps schedulers after every optimizer step; not after a skipped one."""
        if not self._skipped_update:
            super().lr_scheduler_step(scheduler, metric)

    def _sharded(self) -> bool:
        """Parameters sharded across ranks (FSDP, DeepSpeed ZeRO-3): every forward is a
        collective, so all ranks must decode the same number of steps."""
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return False
        name = type(trainer.strategy).__name__
        return "FSDP" in name or "DeepSpeed" in name

    def _decode(self, batch: dict[str, Any], **kwargs: Any) -> list[str]:
        if self._sharded():
            kwargs.setdefault("synced_gpus", True)
        return self.model.generate(
            batch, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, **kwargs
        )

    def _eval_step(self, batch: dict[str, Any], prefix: str) -> None:
        # pad batches (ranks evened out) are computed like the rest and then dropped, so that
        # sharded strategies see the same collectives on every rank
        pad = bool(batch.get("pad"))
        if pad and not self._sharded():
            return
        bs = len(batch["texts"])
        rates = self.model.rates
        encoded = self.model.encode(batch)  # once for the loss and the decoding
        if self.model.ctc is not None and "audio" in encoded and not pad:
            ctc = self.model.ctc_transcribe(batch, encoded)
            tasks = self.model._tasks(batch)
            self._ctc_outputs += [(r, h) for r, h, t in zip(batch["texts"], ctc, tasks, strict=True)
                                  if t in CTC_TASKS]  # fmt: skip
        if rates is None:
            loss = self.model(batch, encoded)
            hyps = self._decode(batch, encoded=encoded)
            if not pad:
                self.log(f"{prefix}/loss", loss, batch_size=bs, sync_dist=True)
                self._collect(batch, hyps, None)
            return
        default = self._default_rate()
        for r, loss in self.model.loss_per_rate(batch, rates, encoded).items():
            if pad:
                continue
            self.log(f"{prefix}/loss_r{r}", loss, batch_size=bs, sync_dist=True)
            if r == default:
                self.log(f"{prefix}/loss", loss, batch_size=bs, sync_dist=True)
        before = self.model.projector.rate
        try:
            for r in rates:
                self.model.set_rate(r)
                hyps = self._decode(batch, encoded=encoded)
                if not pad:
                    self._collect(batch, hyps, r)
        finally:
            self.model.set_rate(before)

    def _collect(self, batch: dict[str, Any], hyps: list[str], rate: int | None) -> None:
        tasks = self.model._tasks(batch)
        for key, ref, hyp, task in zip(batch["keys"], batch["texts"], hyps, tasks, strict=True):
            row = {"key": key, "task": task, "reference": ref, "hypothesis": hyp}
            self._outputs.append(row if rate is None else {**row, "rate": rate})

    def _task_metrics(self, prefix: str, outputs: list[dict[str, Any]]) -> dict[str, Any]:
        """``{prefix}/{task}/wer`` (and cer), or ``/bleu`` and ``/chrf`` for translation."""
        per_task: dict[str, Any] = {}
        for task in sorted({o["task"] for o in outputs}):
            rows = [o for o in outputs if o["task"] == task]
            refs, hyps = [o["reference"] for o in rows], [o["hypothesis"] for o in rows]
            if task in TRANSLATION_TASKS:
                m = translation_metrics(refs, hyps)
                names = ("bleu", "chrf")
            else:
                m = error_rates(refs, hyps, self.normalizer)
                names = ("wer", "cer")
            for name in names:
                self.log(f"{prefix}/{task}/{name}", m[name], rank_zero_only=True)
            if not self.trainer.sanity_checking:
                self.print(f"{prefix}/{task}/{names[0]} = {m[names[0]]:.4f} on {len(rows)}")
            per_task[task] = m
        return per_task

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, str]]:
        hyps = self._decode(batch)
        if batch.get("pad"):  # decoded all the same: sharded strategies need every forward
            return []
        return [{"key": k, "text": h} for k, h in zip(batch["keys"], hyps, strict=True)]

    def _gathered(self) -> list[dict[str, Any]]:
        outputs, self._outputs = self._outputs, []
        return _gather(outputs)

    def _eval_end(self, prefix: str) -> dict[str, float] | None:
        """Log per-rate, per-task and overall figures; ``{prefix}/wer`` is over the
        transcription tasks at the default rate (what checkpoints monitor). With a CTC head,
        ``{prefix}/ctc_wer`` is the WER of its best-path transcripts."""
        ctc, self._ctc_outputs = self._ctc_outputs, []
        if self.model.ctc is not None:  # every rank has the head: one collective on each
            ctc = _gather(ctc)
        if ctc:
            m = error_rates([r for r, _ in ctc], [h for _, h in ctc], self.normalizer)
            self.log(f"{prefix}/ctc_wer", m["wer"], rank_zero_only=True)
            if not self.trainer.sanity_checking:
                self.print(f"{prefix}/ctc_wer = {m['wer']:.4f} (CTC head, no LLM)")
        outputs = self._gathered()
        if not outputs:
            return None
        per_rate: dict[int, dict[str, float]] = {}
        by_rate = outputs
        if self.model.rates is not None:
            for r in self.model.rates:
                rows = [o for o in outputs if o["rate"] == r and o["task"] not in TRANSLATION_TASKS]
                if not rows:
                    continue
                per_rate[r] = error_rates(
                    [o["reference"] for o in rows], [o["hypothesis"] for o in rows], self.normalizer
                )
                self.log(f"{prefix}/wer_r{r}", per_rate[r]["wer"], rank_zero_only=True)
                self.log(f"{prefix}/cer_r{r}", per_rate[r]["cer"], rank_zero_only=True)
                if not self.trainer.sanity_checking:
                    self.print(f"{prefix}/wer_r{r} = {per_rate[r]['wer']:.4f}")
            outputs = [o for o in outputs if o["rate"] == self._default_rate()]
        per_task = self._task_metrics(prefix, outputs)
        transcribed = [o for o in outputs if o["task"] not in TRANSLATION_TASKS]
        rates: dict[str, float] | None = None
        if transcribed:
            rates = error_rates(
                [o["reference"] for o in transcribed],
                [o["hypothesis"] for o in transcribed],
                self.normalizer,
            )
            self.log(f"{prefix}/wer", rates["wer"], rank_zero_only=True)
            self.log(f"{prefix}/cer", rates["cer"], rank_zero_only=True)
            if not self.trainer.sanity_checking:
                for o in transcribed[: self.log_examples]:
                    self.print(example(o["reference"], o["hypothesis"]))
                self.print(f"{prefix}/wer = {rates['wer']:.4f} on {len(transcribed)} utterances")
        if prefix == "test" and self.trainer.is_global_zero:
            metrics: dict[str, Any] = {"normalizer": self.normalizer, **(rates or {})}
            if per_rate:
                metrics["rate"] = self._default_rate()
                metrics["rates"] = {str(r): v for r, v in per_rate.items()}
            metrics["tasks"] = per_task
            self._write_test(outputs, by_rate if per_rate else [], metrics)
        return rates

    def _write_test(
        self, outputs: list[dict[str, Any]], by_rate: list[dict[str, Any]], metrics: dict
    ) -> None:
        """utterances.jsonl (default rate), utterances_r{rate}.jsonl, test_metrics.json."""
        out_dir = Path(self.predictions_dir or self.trainer.log_dir or ".")
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "utterances.jsonl", "w") as f:
            for o in outputs:
                f.write(json.dumps(o) + "\n")
        for r in sorted({o["rate"] for o in by_rate}):
            with open(out_dir / f"utterances_r{r}.jsonl", "w") as f:
                for o in by_rate:
                    if o["rate"] == r:
                        f.write(json.dumps(o) + "\n")
        with open(out_dir / "test_metrics.json", "w") as f:
            json.dump(metrics, f, indent=2)
        self.print(f"test utterances and metrics written to {out_dir}")

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")
