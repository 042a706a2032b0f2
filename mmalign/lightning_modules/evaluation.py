"""Validation, test and prediction: decoding, per-rate and per-task metrics, test outputs.

Mixed into :class:`~mmalign.lightning_modules.alignment.AlignmentModule`, whose constructor sets
the decoding and reporting settings read here (``normalizer``, ``num_beams``,
``max_new_tokens``, ``predictions_dir``, ``log_examples``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mmalign.data.tasks import TRANSLATION_TASKS
from mmalign.eval.metrics import error_rates, example, translation_metrics
from mmalign.model import CTC_TASKS


def _gather(items: list[Any]) -> list[Any]:
    """Every rank's ``items``, rank by rank (the list itself without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, items)
        return [o for part in parts for o in part]
    return items


class Evaluation:
    """Decodes every validation and test batch and reports word error rates (or BLEU).

    With a multi-rate projector, validation and test decode at every rate and log
    ``val/wer_r{rate}`` (and ``cer``/``loss``) per rate, with ``val/wer`` at the default rate.
    """

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

    def _default_rate(self) -> int:
        """The rate ``val/wer`` is reported at: the projector's ``default_rate``, else its first."""
        rates = self.model.rates or [0]
        return int(getattr(self.model.projector, "default_rate", rates[0]))

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
