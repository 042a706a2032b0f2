"""AlignmentModule: trains projector + adapters of a SpeechLLM; frozen parts never hit disk.

The module is assembled from one part per concept: :mod:`~mmalign.lightning_modules.training`
(the training step and its loss schedule), :mod:`~mmalign.lightning_modules.optimization` (the
optimizer step), :mod:`~mmalign.lightning_modules.evaluation` (validation, test, prediction)
and :mod:`~mmalign.lightning_modules.trainable` (checkpoints of the trainable weights); this
module builds the model, checks the settings and wires data and optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, SequentialLR

from mmalign.encoders.base import Encoder
from mmalign.eval.metrics import error_rates
from mmalign.lightning_modules.evaluation import Evaluation
from mmalign.lightning_modules.optimization import OptimizerStep
from mmalign.lightning_modules.trainable import TrainableWeights
from mmalign.lightning_modules.training import TrainingStep
from mmalign.llm.calibration import calibrate
from mmalign.llm.load import CausalLM
from mmalign.llm.tuners import check_strategy
from mmalign.model import SpeechLLM
from mmalign.projectors.base import Projector

ProjectorFactory = Callable[[int, int], Projector]
SchedulerFactory = Callable[[Optimizer, int], LRScheduler]


class AlignmentModule(TrainingStep, OptimizerStep, Evaluation, TrainableWeights, L.LightningModule):
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
            before the optimizer exists (see :mod:`mmalign.llm.calibration`); not when
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
            ``find_unused_parameters: true``. Each stage gets the whole ``scheduler`` (built
            once per stage over its own steps), so LoRA starts at the peak rate after warm-up.
        projector_warmup_steps: the first this many steps update the projector only (the
            adapter's gradients are dropped), so LoRA starts on inputs that already carry speech.
        ctc_shrink: the LLM reads only the audio frames at which the CTC head emits a token
            (about one per spoken token) instead of every frame; see :class:`SpeechLLM`. Train
            the head first (``ctc_only_steps``) and keep it learning (``ctc_weight``).
        ctc_embed: with ``ctc_shrink``, the LLM reads the token embeddings weighted by the CTC
            head's posterior at each kept frame (LegoSLM) instead of the projector's frame.

    The training step, its randomness and pad batches:
    :class:`~mmalign.lightning_modules.training.TrainingStep`; the optimizer step:
    :class:`~mmalign.lightning_modules.optimization.OptimizerStep`; validation and test (per
    rate with a multi-rate projector): :class:`~mmalign.lightning_modules.evaluation.Evaluation`;
    checkpoints: :class:`~mmalign.lightning_modules.trainable.TrainableWeights`.
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

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: every parameter is frozen")
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        stage = self.ctc_only_steps
        if 0 < stage < total:
            # each stage gets the whole schedule (warm-up, decay): one schedule over both would
            # start LoRA, which learns only in the LLM stage, at an already decayed rate
            stages = [self.scheduler_factory(optimizer, n) for n in (stage, total - stage)]
            scheduler = SequentialLR(optimizer, stages, milestones=[stage])
        else:
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
