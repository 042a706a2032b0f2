"""``mmalign evaluate``: score a trained model on shards or a manifest, sweeping rates, SNRs, tasks.

One call loads the model once and the evaluation set once (held in memory as 16 kHz float32,
about 230 MB per hour of audio), then decodes every condition: each compression rate the model
offers (or those asked for) times each SNR (``clean`` meaning no noise). Every condition is scored
per task found in the data: transcription tasks (``asr``, ``vsr``, ``avsr`` ...) by WER and CER
after a text normaliser, translation (``st``, whose reference is the sample's ``text``) by
sacrebleu's corpus BLEU and chrF, their signatures recorded so that numbers can be compared.

Outputs in ``--out``: ``metrics.json`` (every figure plus what produced it: model description and
sha256, normaliser, decoding options, noise, library versions), ``report.md``, PNG plots for
sweeps with more than one point, and ``utterances.jsonl`` (per utterance and condition, worst
first within each condition). See :mod:`mmalign.eval.report`.

Lengths: an utterance longer than the encoder's window (Whisper: 30 s) is cut into chunks and
decoded as ``mmalign transcribe`` decodes a long file (:func:`decode_chunked`), its hypothesis
being the joined chunk transcripts; one that carries video is skipped instead (clips are not
chunked), and so is one shorter than the audio of one LLM token (:func:`min_seconds`). Each is
named with its key, duration and reason in ``metrics.json`` (``data.lengths``) and the report.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import logging
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sacrebleu.metrics import BLEU
from tqdm.auto import tqdm

from mmalign.data.collate import DEFAULT_TASK
from mmalign.data.media import (
    AudioReadError,
    PathOutsideRootError,
    read_audio,
    read_video,
    resolve_path,
    with_video,
)
from mmalign.data.noise import BABBLE, build_noise, mix
from mmalign.data.reading import read_shard_samples
from mmalign.data.tasks import TRANSLATION_TASKS, TaskError, apply_task
from mmalign.eval.metrics import NORMALIZERS, error_rates, translation_metrics
from mmalign.inference.chunking import Chunk, chunk_bounds
from mmalign.inference.decode import (
    DecodeOptions,
    add_decoding_arguments,
    decode_chunked,
    decode_options,
    features_for,
    load_model,
    min_seconds,
    select_rates,
    too_short,
    use_rate,
    window_seconds,
)
from mmalign.model import SpeechLLM

log = logging.getLogger(__name__)


CLEAN = ("clean", "inf", "none")
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


# -- data ------------------------------------------------------------------------------------


def read_manifest_samples(
    manifest: str | Path,
    sample_rate: int = 16000,
    limit: int | None = None,
    root: str | Path | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Samples of a JSONL manifest (``audio`` path relative to the manifest, ``text``, optional
    ``task``, ``key``/``id`` and prompt fields); bad lines are skipped with a reason, but a path
    resolving outside ``root`` (default: the manifest's folder) raises
    :class:`PathOutsideRootError`."""
    manifest = Path(manifest)
    samples: list[dict[str, Any]] = []
    skipped: list[str] = []
    with open(manifest, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{manifest}:{lineno}"
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("line is not a JSON object")
                audio, text = obj.get("audio"), obj.get("text")
                if not isinstance(audio, str) or not audio:
                    raise ValueError("missing 'audio' path")
                if not isinstance(text, str) or not text.strip():
                    raise ValueError("missing 'text'")
                at = {"source": manifest, "line": lineno}
                path = resolve_path(manifest.parent, audio, root, field="audio", **at)
                video = obj.get("video")
                video_path = None
                if video:
                    if not isinstance(video, str):
                        raise ValueError(f"bad 'video' path: {video!r}")
                    video_path = resolve_path(manifest.parent, video, root, field="video", **at)
                wave = read_audio(path, sample_rate)
                sample = {
                    "__key__": str(obj.get("key", obj.get("id", Path(audio).with_suffix("")))),
                    "audio": wave,
                    "text": text,
                    "task": str(obj.get("task") or DEFAULT_TASK),
                    "duration": wave.numel() / sample_rate,
                    "meta": obj,
                }
                if video_path is not None:
                    frames, fps = read_video(video_path, obj.get("video_fps"))
                    sample = with_video(sample, frames, fps, sample_rate)
            except PathOutsideRootError:
                raise
            except (ValueError, AudioReadError) as exn:
                log.warning("skipping %s: %s", where, exn)
                skipped.append(f"{where}: {exn}")
                continue
            samples.append(sample)
            if limit is not None and len(samples) >= limit:
                break
    return samples, skipped


def read_samples(
    spec: str | Path,
    sample_rate: int = 16000,
    limit: int | None = None,
    root: str | Path | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Samples from a ``.jsonl`` manifest (paths inside ``root``, see
    :func:`read_manifest_samples`) or shards (folder, ``index.json``, ``.tar``, glob)."""
    if str(spec).endswith(".jsonl"):
        if not Path(spec).is_file():
            raise FileNotFoundError(f"manifest {spec} not found")
        return read_manifest_samples(spec, sample_rate, limit, root)
    return read_shard_samples(spec, sample_rate, limit)


# -- metrics ---------------------------------------------------------------------------------


def transcription_scores(
    refs: Sequence[str], hyps: Sequence[str], normalizer: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Corpus WER/CER with counts, and the same counts per utterance (which sum to the corpus's:
    jiwer aligns each pair on its own)."""
    corpus = error_rates(refs, hyps, normalizer)
    per = []
    for ref, hyp in zip(refs, hyps, strict=True):
        r = error_rates([ref], [hyp], normalizer)
        per.append(
            {
                "wer": r["wer"],
                "cer": r["cer"],
                "substitutions": r["substitutions"],
                "deletions": r["deletions"],
                "insertions": r["insertions"],
                "ref_words": r["ref_words"],
            }
        )
    return corpus, per


def translation_scores(
    refs: Sequence[str], hyps: Sequence[str]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """sacrebleu corpus BLEU and chrF on raw (detokenised) text with their signatures, and
    per-sentence BLEU (effective order, as sacrebleu recommends for single sentences)."""
    refs, hyps = list(refs), list(hyps)
    corpus = translation_metrics(refs, hyps)
    sentence = BLEU(effective_order=True)
    per = [{"bleu": sentence.sentence_score(h, [r]).score} for r, h in zip(refs, hyps, strict=True)]
    return corpus, per


def worst_first(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Highest WER (then most errors) first; for translation, lowest sentence BLEU first."""

    def key(row: dict[str, Any]) -> tuple:
        if "bleu" in row:
            return (row["bleu"], str(row["key"]))
        errors = row["substitutions"] + row["deletions"] + row["insertions"]
        return (-row["wer"], -errors, str(row["key"]))

    return sorted(rows, key=key)


# -- sweeps ----------------------------------------------------------------------------------


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


def chunk_settings(
    window: float | None, chunk_seconds: float | None, overlap_seconds: float | None
) -> tuple[float | None, float]:
    """Chunk length and overlap for long utterances: by default the encoder's window (at most
    30 s, like ``transcribe``) and a tenth of it (at most 2 s); None chunk when nothing bounds
    the length. Values the window cannot take are refused."""
    if chunk_seconds is None:
        chunk_seconds = None if window is None else min(30.0, window)
    elif window is not None and chunk_seconds > window:
        raise ValueError(
            f"chunk_seconds={chunk_seconds} exceeds the encoder window of {window:g} s"
        )
    if chunk_seconds is None:
        return None, 0.0
    if overlap_seconds is None:
        overlap_seconds = min(2.0, chunk_seconds / 10)
    chunk_bounds(1, 16000, chunk_seconds, overlap_seconds)  # bad values fail here
    return chunk_seconds, overlap_seconds


def apply_length_policy(
    model: SpeechLLM, samples: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The samples to decode, and one ``{key, duration, reason}`` for each left out: shorter
    than one LLM token's audio, or longer than the encoder's window with video that the model
    reads (a clip is decoded whole). Other long samples stay: they are chunked."""
    window = window_seconds(model)
    video = "video" in model.modalities
    kept, dropped = [], []
    for s in samples:
        duration = float(s["duration"])
        reason = too_short(model, duration)
        if reason is None and window is not None and duration > window and video and "video" in s:
            reason = (
                f"too long: {duration:.1f} s > the encoder's {window:g} s window, and clips "
                "with video are not chunked"
            )
        if reason is None:
            kept.append(s)
        else:
            log.warning("skipping %s (%.3f s): %s", s["__key__"], duration, reason)
            dropped.append(
                {"key": str(s["__key__"]), "duration": round(duration, 3), "reason": reason}
            )
    return kept, dropped


def sample_chunks(
    samples: Sequence[dict[str, Any]],
    sample_rate: int,
    chunk_seconds: float | None,
    overlap_seconds: float,
    whole_clips: bool = False,
) -> list[list[Chunk]]:
    """Chunks of each sample: one covering it all unless it is longer than ``chunk_seconds``
    (or, with ``whole_clips``, a model that reads video, carries a clip: decoded whole)."""
    out = []
    for s in samples:
        n = int(s["audio"].numel())
        long = chunk_seconds is not None and n > round(chunk_seconds * sample_rate)
        if not long or (whole_clips and "video" in s):
            out.append([Chunk(0, n, 0.0, n / sample_rate)])
        else:
            assert chunk_seconds is not None
            out.append(chunk_bounds(n, sample_rate, chunk_seconds, overlap_seconds))
    return out


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
    utterances longer than the encoder's window (see :func:`chunk_settings` for the defaults);
    too-short ones and too-long ones with video are skipped and named (module docstring).
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
