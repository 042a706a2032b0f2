"""``mmalign evaluate``: score a trained model on shards or a manifest, sweeping rates, SNRs, tasks.

One call loads the model once and the evaluation set once (:mod:`mmalign.eval.samples`), then
decodes and scores every condition (:mod:`mmalign.eval.sweep`); utterances too long or too short
for the model are chunked or skipped and named (:mod:`mmalign.eval.lengths`).

Outputs in ``--out``: ``metrics.json`` (every figure plus what produced it: model description and
sha256, normaliser, decoding options, noise, library versions), ``report.md``, PNG plots for
sweeps with more than one point, and ``utterances.jsonl`` (per utterance and condition, worst
first within each condition). See :mod:`mmalign.eval.report`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import logging
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmalign.data.noise import BABBLE, build_noise
from mmalign.data.tasks import TaskError, apply_task
from mmalign.eval.lengths import apply_length_policy, chunk_settings, sample_chunks
from mmalign.eval.metrics import NORMALIZERS
from mmalign.eval.samples import read_samples
from mmalign.eval.sweep import parse_snrs, run_sweep
from mmalign.inference.decode import (
    DecodeOptions,
    add_decoding_arguments,
    decode_options,
    features_for,
    load_model,
    min_seconds,
    select_rates,
    window_seconds,
)
from mmalign.model import SpeechLLM

log = logging.getLogger(__name__)


LIBRARIES = (
    "mmalign",
    "torch",
    "torchaudio",
    "transformers",
    "peft",
    "jiwer",
    "sacrebleu",
    "whisper-normalizer",
    "soundfile",
    "webdataset",
    "matplotlib",
)


@dataclass
class EvalResult:
    """What :func:`evaluate` wrote: the metrics dict, per-utterance rows, output files."""

    metrics: dict[str, Any]
    utterances: list[dict[str, Any]]
    files: list[Path]


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries whose behaviour shapes the numbers."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _describe(model: SpeechLLM) -> dict[str, Any]:
    from mmalign.inference.export import describe

    try:
        return describe(model)
    except Exception as exn:  # a component that cannot describe itself should not stop a report
        return {"error": f"cannot describe model: {exn}"}


def evaluate(
    model: str | Path | SpeechLLM,
    data: str | Path | list[dict[str, Any]],
    out_dir: str | Path,
    *,
    normalizer: str = "english",
    rates: Sequence[int] | None = None,
    snrs: Sequence[str | float | None] | None = None,
    noise: str | None = None,
    babble_speakers: int = 3,
    seed: int = 0,
    tasks: Sequence[str] | None = None,
    as_tasks: Sequence[str] | None = None,
    target_lang: str | None = None,
    limit: int | None = None,
    options: DecodeOptions | None = None,
    progress: bool = True,
    root: str | Path | None = None,
    chunk_seconds: float | None = None,
    overlap_seconds: float | None = None,
) -> EvalResult:
    """Decode ``data`` with ``model`` under every (rate, SNR) condition, score each task, and
    write metrics.json, report.md, plots and utterances.jsonl to ``out_dir``.

    ``model`` is a ``.ckpt``, an export directory or a :class:`SpeechLLM`; ``data`` a manifest,
    a shard spec or a list of decoded samples. ``noise`` defaults to ``babble`` when any SNR
    is a number. ``tasks`` keeps only samples of those tasks; ``as_tasks`` then decodes every
    sample as each of those tasks instead of its own (e.g. ``asr vsr avsr`` on audio-visual
    data scores one model with audio only, video only and both; ``st`` on a corpus whose
    samples carry translations scores translation). ``target_lang`` picks the translation
    target of ``st`` samples that have several. ``root`` is the folder a manifest's paths must
    resolve inside (default: the manifest's own). ``chunk_seconds``/``overlap_seconds`` cut
    utterances longer than the encoder's window; too-short ones and too-long ones with video are
    skipped and named (:mod:`mmalign.eval.lengths`, whose ``chunk_settings`` has the defaults).
    """
    options = options or DecodeOptions()
    if normalizer not in NORMALIZERS:
        raise ValueError(f"normaliser {normalizer!r} is not one of {NORMALIZERS}")
    snr_list = parse_snrs(snrs)
    noisy = any(s is not None for s in snr_list)
    if noise is not None and not noisy:
        log.warning("--noise %s given but every SNR is clean: no noise is added", noise)
    noise = (noise or BABBLE) if noisy else None

    loaded = load_model(model, options.device, options.dtype, options.llm)
    speech_llm = loaded.model
    model_info: dict[str, Any] = {
        "path": str(loaded.path) if loaded.path else None,
        "kind": loaded.kind,
        "sha256": loaded.sha256,
    }
    rate_list = select_rates(speech_llm, rates)  # fail before reading any audio
    window = window_seconds(speech_llm)
    chunk_seconds, overlap_seconds = chunk_settings(window, chunk_seconds, overlap_seconds)

    if isinstance(data, list):
        samples, skipped, data_spec = list(data)[:limit] if limit else list(data), [], "<samples>"
    else:
        samples, skipped = read_samples(data, limit=limit, root=root)
        data_spec = str(data)
    if tasks:
        present = sorted({s["task"] for s in samples})
        samples = [s for s in samples if s["task"] in set(tasks)]
        if not samples:
            raise ValueError(
                f"no samples with task(s) {list(tasks)} in {data_spec}; present: {present}"
            )
    for i, s in enumerate(samples):
        if s.get("__key__") is None:
            s["__key__"] = str(i)
    samples, dropped = apply_length_policy(speech_llm, samples)
    skipped += [f"{d['key']} ({d['duration']:g} s): {d['reason']}" for d in dropped]
    if not samples:
        reasons = "; ".join(skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
        raise ValueError(
            f"no usable samples in {data_spec} ({len(skipped)} skipped"
            + (f": {reasons})" if skipped else ")")
        )
    for i, s in enumerate(samples):
        s["noise_index"] = i  # babble never mixes in the utterance itself, whatever the task
    waves = [s["audio"] for s in samples]
    if as_tasks:
        for task in as_tasks:
            speech_llm.modalities_of(task)  # a task the model cannot serve fails here
    try:
        samples = [
            apply_task(s, t, target_lang)
            for t in (dict.fromkeys(as_tasks) if as_tasks else [None])
            for s in samples
        ]
    except TaskError as exn:
        raise ValueError(f"{data_spec}: {exn}") from exn
    task_names = sorted({s["task"] for s in samples})

    features = features_for(speech_llm)
    chunks = sample_chunks(
        samples,
        features.sample_rate,
        chunk_seconds,
        overlap_seconds,
        whole_clips="video" in speech_llm.modalities,
    )
    chunked = {
        str(s["__key__"]): {
            "key": str(s["__key__"]),
            "duration": round(float(s["duration"]), 3),
            "chunks": len(c),
        }
        for s, c in zip(samples, chunks, strict=True)
        if len(c) > 1
    }
    for key, c in chunked.items():
        log.info("%s (%.1f s) is decoded in %d chunks", key, c["duration"], c["chunks"])
    noise_source = (
        build_noise(noise, waves, babble_speakers, seed, features.sample_rate) if noise else None
    )
    results, utterances = run_sweep(
        speech_llm,
        samples,
        chunks,
        rate_list=rate_list,
        snr_list=snr_list,
        noise_source=noise_source,
        task_names=task_names,
        normalizer=normalizer,
        options=options,
        features=features,
        overlap_seconds=overlap_seconds,
        progress=progress,
    )

    metrics = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": {**model_info, "description": _describe(speech_llm)},
        "data": {
            "spec": data_spec,
            "utterances": len(waves),
            "audio_seconds": round(sum(w.numel() for w in waves) / features.sample_rate, 3),
            "tasks": {t: sum(s["task"] == t for s in samples) for t in task_names},
            "skipped": skipped,
            "lengths": {
                "window_seconds": window,
                "min_seconds": round(min_seconds(speech_llm), 4),
                "chunk_seconds": chunk_seconds,
                "overlap_seconds": overlap_seconds,
                "counts": {
                    "chunked": len(chunked),
                    "too_short": sum(d["reason"].startswith("too short") for d in dropped),
                    "too_long": sum(d["reason"].startswith("too long") for d in dropped),
                },
                "chunked": list(chunked.values()),
                "skipped": dropped,
            },
        },
        "normalizer": normalizer,
        "decoding": options.as_dict(),
        "sweep": {"rates": rate_list, "snrs": snr_list, "tasks": task_names},
        "noise": noise_source.describe() if noise_source is not None else None,
        "results": results,
        "versions": library_versions(),
    }
    from mmalign.eval.report import write_outputs

    files = write_outputs(out_dir, metrics, utterances)
    return EvalResult(metrics, utterances, files)


# -- command line ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmalign evaluate",
        description=(
            "Score a checkpoint (.ckpt from `mmalign fit`) or an export directory on shards or "
            "a JSONL manifest: WER/CER for transcription, BLEU/chrF for translation (task 'st'), "
            "swept over compression rates, SNRs and the tasks present. Writes metrics.json, "
            "report.md, PNG plots and utterances.jsonl to --out."
        ),
    )
    parser.add_argument("model", help="a .ckpt from `mmalign fit` or an `mmalign export` folder")
    parser.add_argument(
        "data", help="shards (folder, index.json, .tar, glob) or a JSONL manifest (audio, text)"
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--normalizer",
        default="english",
        choices=NORMALIZERS,
        help="text normaliser before WER/CER: Whisper's English one, 'basic' (any language)",
    )
    parser.add_argument(
        "--no-normalize", action="store_true", help="score raw text (same as --normalizer none)"
    )
    parser.add_argument(
        "--rates", type=int, nargs="+", help="compression rates to sweep (default: all it has)"
    )
    parser.add_argument(
        "--snr", nargs="+", help="SNRs in dB to sweep; 'clean' for no noise (e.g. clean 20 10 0)"
    )
    parser.add_argument(
        "--noise",
        help="noise: 'babble' (default), a folder of audio files, or shards",
    )
    parser.add_argument("--babble-speakers", type=int, default=3, help="utterances per babble")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise draws")
    parser.add_argument("--tasks", nargs="+", help="only these tasks (default: all present)")
    parser.add_argument(
        "--as-tasks",
        nargs="+",
        help="decode every sample as each of these tasks (e.g. asr vsr avsr on audio-visual data)",
    )
    parser.add_argument(
        "--target-lang", help="translation target (st) when samples have several, e.g. de"
    )
    parser.add_argument("--limit", type=int, help="first N usable utterances only")
    parser.add_argument(
        "--chunk-seconds",
        type=float,
        help="utterances longer than this are decoded in chunks and the texts joined (default: "
        "the encoder's window, at most 30 s)",
    )
    parser.add_argument(
        "--overlap-seconds",
        type=float,
        help="overlap between chunks (default: a tenth of a chunk, at most 2 s)",
    )
    parser.add_argument(
        "--root",
        help="folder that a manifest's audio/video paths must resolve inside (after .. and "
        "symlinks); default: the manifest's folder; / allows any",
    )
    add_decoding_arguments(parser, batch_size=16)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> EvalResult:
    """``mmalign evaluate`` entry point; prints the results table and where files went."""
    args = build_parser().parse_args(argv)
    try:
        result = evaluate(
            args.model,
            args.data,
            args.out,
            normalizer="none" if args.no_normalize else args.normalizer,
            rates=args.rates,
            snrs=args.snr,
            noise=args.noise,
            babble_speakers=args.babble_speakers,
            seed=args.seed,
            tasks=args.tasks,
            as_tasks=args.as_tasks,
            target_lang=args.target_lang,
            limit=args.limit,
            options=decode_options(args),
            progress=not args.no_progress,
            root=args.root,
            chunk_seconds=args.chunk_seconds,
            overlap_seconds=args.overlap_seconds,
        )
    except (FileNotFoundError, ValueError, KeyError) as exn:
        raise SystemExit(f"mmalign evaluate: {exn}") from exn
    from mmalign.eval.report import results_table

    print(results_table(result.metrics["results"]), file=sys.stdout)
    print(f"wrote {', '.join(p.name for p in result.files)} to {Path(args.out).resolve()}")
    return result
