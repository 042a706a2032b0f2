"""The training step: loss schedule (CTC alone, then LLM plus CTC), rates and modalities drawn.

Mixed into :class:`~mmalign.lightning_modules.alignment.AlignmentModule`, whose constructor sets
the settings read here (``ctc_only_steps``, ``ctc_weight``, ``rate_sampling``, ``rate_weights``,
``rate_seed``, ``modality_dropout``) and the running counts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class TrainingStep:
    """The loss of one training micro-batch, as a function of (seed, step, batch index, rank).

    Randomness inside a training step (LoRA and projector dropout) is seeded from
    (``rate_seed``, step, batch index, rank), so a resumed run repeats an uninterrupted one.
    Batches marked ``pad`` (ranks evened out at the end of an exact epoch) train with weight 0
    and are not evaluated.
    """

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        seed = [self.rate_seed, int(self.global_step), int(batch_idx), int(self.global_rank), 11]
        torch.manual_seed(int(np.random.SeedSequence(seed).generate_state(1, np.uint64)[0] >> 1))

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

    def training_rates(self, batch_idx: int) -> list[int]:
        """The rates this step trains: all of them, or one drawn from (seed, step, batch)."""
        rates = self.model.rates
        assert rates is not None and self.rate_weights is not None
        if self.rate_sampling == "all":
            return rates
        rng = np.random.default_rng([self.rate_seed, int(self.global_step), int(batch_idx)])
        p = np.asarray(self.rate_weights) / sum(self.rate_weights)
        return [rates[int(rng.choice(len(rates), p=p))]]

    def _log_skipped(self, batch: dict[str, Any]) -> None:
        # batches carry the samples dropped as corrupt since the previous batch of their worker
        self._skipped_total += int(batch.get("skipped", 0))
        self.log("data/skipped", float(self._skipped_total), batch_size=len(batch["texts"]))

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
