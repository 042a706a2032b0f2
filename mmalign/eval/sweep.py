"""The conditions ``mmalign evaluate`` decodes and how each is scored: :func:`run_sweep`.

Every condition is each compression rate the model offers (or those asked for) times each SNR
(``clean`` meaning no noise, :func:`parse_snrs`). Every condition is scored per task found in the
data: transcription tasks (``asr``, ``vsr``, ``avsr`` ...) by WER and CER after a text
normaliser, translation (``st``, whose reference is the sample's ``text``) by sacrebleu's corpus
BLEU and chrF, their signatures recorded so that numbers can be compared
(:mod:`mmalign.eval.metrics`). Per-utterance rows come worst first within each condition.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from mmalign.data.features import WhisperFeatures
from mmalign.data.noise import NoiseSource, mix
from mmalign.data.tasks import TRANSLATION_TASKS
from mmalign.eval.metrics import transcription_scores, translation_scores
from mmalign.inference.chunking import Chunk
from mmalign.inference.decode import DecodeOptions, decode_chunked, use_rate
from mmalign.model import SpeechLLM

CLEAN = ("clean", "inf", "none")


def parse_snrs(values: Sequence[str | float | None] | None) -> list[float | None]:
    """SNR values in dB; ``clean``/``inf``/``none`` (or None) mean no added noise."""
    out: list[float | None] = []
    for v in values or [None]:
        if v is None or (isinstance(v, str) and v.strip().lower() in CLEAN):
            out.append(None)
            continue
        try:
            out.append(float(v))
        except ValueError:
            raise ValueError(f"SNR {v!r} is neither a number of dB nor 'clean'") from None
    return list(dict.fromkeys(out))


def worst_first(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Highest WER (then most errors) first; for translation, lowest sentence BLEU first."""

    def key(row: dict[str, Any]) -> tuple:
        if "bleu" in row:
            return (row["bleu"], str(row["key"]))
        errors = row["substitutions"] + row["deletions"] + row["insertions"]
        return (-row["wer"], -errors, str(row["key"]))

    return sorted(rows, key=key)


def run_sweep(
    speech_llm: SpeechLLM,
    samples: list[dict[str, Any]],
    chunks: Sequence[Sequence[Chunk]],
    *,
    rate_list: list[int],
    snr_list: list[float | None],
    noise_source: NoiseSource | None,
    task_names: list[str],
    normalizer: str,
    options: DecodeOptions,
    features: WhisperFeatures,
    overlap_seconds: float,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Decode ``samples`` (cut into ``chunks``) under every (rate, SNR) condition and score each
    task: one result row per condition and task, and the per-utterance rows. The model's rate
    is set back afterwards."""
    conditions = [(r, s) for r in rate_list for s in snr_list]
    results: list[dict[str, Any]] = []
    utterances: list[dict[str, Any]] = []
    bar = tqdm(
        total=len(samples) * len(conditions), unit="utt", disable=not progress, desc="evaluate"
    )
    original_rate = getattr(speech_llm.projector, "rate", None)
    try:
        for rate, snr in conditions:
            use_rate(speech_llm, rate)
            bar.set_postfix(rate=rate, snr="clean" if snr is None else snr)
            batch = samples
            if snr is not None:
                assert noise_source is not None
                batch = [
                    {
                        **s,
                        "audio": mix(
                            s["audio"],
                            noise_source.noise_for(
                                str(s["__key__"]), s["noise_index"], s["audio"].numel()
                            ),
                            snr,
                        ),
                    }
                    for s in samples
                ]
            start = time.perf_counter()
            decoded = decode_chunked(
                speech_llm,
                batch,
                chunks,
                options,
                features,
                overlap_seconds,
                on_batch=lambda pieces, _texts: bar.update(sum(p["chunk"] == 0 for p in pieces)),
            )
            hyps = [d.text for d in decoded]
            seconds = time.perf_counter() - start
            audio_seconds = sum(float(s["duration"]) for s in samples)
            for task in task_names:
                idx = [i for i, s in enumerate(samples) if s["task"] == task]
                refs = [samples[i]["text"] for i in idx]
                task_hyps = [hyps[i] for i in idx]
                if task in TRANSLATION_TASKS:
                    corpus, per = translation_scores(refs, task_hyps)
                else:
                    corpus, per = transcription_scores(refs, task_hyps, normalizer)
                results.append(
                    {
                        "task": task,
                        "rate": rate,
                        "snr": snr,
                        **corpus,
                        "audio_seconds": round(sum(samples[i]["duration"] for i in idx), 3),
                        "decode_seconds": round(seconds, 3),
                        "audio_seconds_per_second": round(audio_seconds / max(seconds, 1e-9), 3),
                    }
                )
                rows = [
                    {
                        "key": str(samples[i]["__key__"]),
                        "task": task,
                        "rate": rate,
                        "snr": snr,
                        "duration": round(float(samples[i]["duration"]), 3),
                        "reference": samples[i]["text"],
                        "hypothesis": hyps[i],
                        **({"chunks": len(chunks[i])} if len(chunks[i]) > 1 else {}),
                        **scores,
                    }
                    for i, scores in zip(idx, per, strict=True)
                ]
                utterances.extend(worst_first(rows))
    finally:
        bar.close()
        if original_rate is not None and rate_list != [original_rate]:
            use_rate(speech_llm, original_rate)
    return results, utterances
