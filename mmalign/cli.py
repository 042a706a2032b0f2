"""The ``mmalign`` command: Lightning's fit/validate/test/predict plus prepare, synth, export,
cache-features, curriculum, score, evaluate and transcribe.

``mmalign fit --config configs/asr/whisper-small_qwen2.5-0.5b.yaml`` is a LightningCLI run;
the extra subcommands are plain functions whose docstrings are their ``--help``.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, Literal


def cli_main(args: list[str] | None = None, run: bool = True, exit_on_error: bool = True) -> Any:
    """Run a Lightning subcommand (``fit``, ``validate``, ``test``, ``predict``); see
    :func:`mmalign.lightning_modules.cli.run_cli`. Imported lazily so that ``prepare``/``synth``/
    ``score`` start without loading Lightning."""
    from mmalign.lightning_modules.cli import run_cli

    return run_cli(args, run, exit_on_error)


def prepare(
    source: str,
    out_dir: str,
    shard_max_mb: float = 256.0,
    shard_max_count: int | None = None,
    sample_rate: int = 16000,
    prefix: str = "shard",
    video_fps: float = 25.0,
    crop: tuple[int, int, int, int] | None = None,
    format: str = "auto",
    split: str | None = None,
    source_lang: str | None = None,
    target_lang: str | None = None,
    clips: str | None = None,
    root: str | None = None,
    min_seconds: float = 0.1,
    max_seconds: float | None = 30.0,
    out_of_range: Literal["keep", "drop"] = "keep",
    jobs: int = 1,
    text_column: str | None = None,
    crops: str | None = None,
) -> None:
    """Write webdataset shards (16 kHz mono FLAC + JSON, lip video as uint8 .npy) and index.json.

    Args:
        source: a JSONL manifest (``audio``, ``text``, optional ``video`` (.npy uint8 T x H x W
            or a video file) and ``video_fps``, optional ``offset``/``duration`` in seconds to
            take one segment, other fields such as ``translation`` kept), a folder of audio
            files with same-named .txt transcripts, a CoVoST 2 TSV or a MuST-C pair folder.
        out_dir: output folder for ``{prefix}-NNNNNN.tar`` and ``index.json``.
        shard_max_mb: size cap per shard.
        shard_max_count: sample cap per shard.
        sample_rate: target sample rate.
        prefix: shard file name prefix.
        video_fps: frame rate of videos whose manifest line and container give none.
        crop: fixed mouth box ``[x, y, w, h]`` cut from every video (default: clips are
            already mouth regions).
        format: ``auto`` (``.tsv`` is CoVoST, a folder with ``data/*/txt/*.yaml`` MuST-C, one
            with ``clips/`` and TSVs Common Voice, one with ``speaker/chapter/*.trans.txt``
            LibriSpeech, ``pretrain``/``trainval``/``test`` of ``speaker/id.mp4`` LRS3, a
            ``save_to_disk`` folder or parquet files (or a glob) a Hugging Face dataset,
            ``*cuts*.jsonl[.gz]`` or recordings + supervisions lhotse, another folder
            audio+.txt, another file a manifest), ``manifest``, ``folder``, ``covost``,
            ``mustc``, ``librispeech``, ``common_voice``, ``hf``, ``lhotse`` or ``lrs3``.
        split: MuST-C split to read (``train``, ``dev``, ``tst-COMMON`` ...; needed when there
            are several), the rows of a combined CoVoST TSV, the Common Voice TSV (``train``,
            ``dev``, ``test`` ...) or LibriSpeech split folders under the root, comma-separated
            (``train-clean-100,train-clean-360,train-other-500``), the Hugging Face split, the
            lhotse manifests whose names hold it, or the LRS3 folders (``pretrain,trainval``).
        source_lang: source language when the CoVoST file or MuST-C folder name does not say.
        target_lang: target language, likewise.
        clips: folder of a CoVoST TSV's Common Voice clips (default ``<tsv folder>/clips``).
        root: folder that every audio/video path of the manifest must resolve inside (after
            ``..`` and symlinks), so a manifest from elsewhere cannot pull in other files;
            default the manifest's folder (CoVoST: the clips folder, MuST-C: its folder);
            ``/`` allows any path.
        min_seconds: clips shorter than this are listed in index.json (``out_of_range``).
        max_seconds: clips longer than this (Whisper's 30 s window) likewise; ``null``: none.
        out_of_range: ``keep`` such clips (training skips what its encoder cannot read,
            evaluate and transcribe chunk long audio) or ``drop`` them.
        jobs: worker processes that read and encode (the output is the same for any number).
        text_column: the Hugging Face dataset's text column (default: the first of ``text``,
            ``sentence``, ``transcription``).
        crops: LRS3 mouth crops: a folder of mouth-ROI mp4s mirroring the corpus (as
            auto-avsr's preprocessing writes them), ``detect`` (MTCNN landmarks, needs
            facenet-pytorch) or ``none`` (audio only). ``pretrain`` utterances longer than
            ``max_seconds`` are split at word boundaries.

    A killed run leaves the previous output whole; the same command then resumes it.
    """
    from mmalign.data.media import PathOutsideRootError
    from mmalign.data.shards import prepare as run_prepare

    try:
        report = run_prepare(
            source,
            out_dir,
            shard_max_bytes=int(shard_max_mb * 2**20),
            shard_max_count=shard_max_count,
            sample_rate=sample_rate,
            prefix=prefix,
            video_fps=video_fps,
            crop=tuple(crop) if crop is not None else None,
            format=format,
            split=split,
            source_lang=source_lang,
            target_lang=target_lang,
            clips=clips,
            root=root,
            min_seconds=min_seconds,
            max_seconds=max_seconds,
            out_of_range=out_of_range,
            jobs=jobs,
            text_column=text_column,
            crops=crops,
        )
    except PathOutsideRootError as exn:
        raise SystemExit(f"mmalign prepare: {exn}") from exn
    print(report.summary())
    if not report.ok:
        raise SystemExit(f"nothing could be written from {source}")


def synth(
    out_dir: str,
    kind: str = "digits",
    n_train: int = 2000,
    n_val: int = 64,
    n_test: int = 200,
    seed: int = 0,
    jobs: int = 2,
    video: bool = False,
    langs: list[str] = ["de", "fr"],  # noqa: B006 - read only; jsonargparse shows the default
) -> None:
    """Synthesise an offline English corpus (digits, sentences, harvard, mixed or translation).

    Test utterances use voices held out of training; writes train/val/test JSONL manifests.
    ``sentences`` is the open-vocabulary corpus: about 12,000 sentences of fortunes, gettext
    messages and package descriptions spoken by espeak-ng and flite, plus a ``test_synth`` split
    spoken by festival, a synthesiser never heard in training.
    ``translation`` is English speech with German/French targets from the system's gettext
    catalogs (about 1,700 sentences), split by sentence so val/test sentences are unseen.

    Args:
        out_dir: output folder (wav files and manifests).
        kind: ``digits``, ``sentences`` (open vocabulary, three synthesisers), ``harvard``
            (100 sentences), ``mixed`` (digits and harvard) or ``translation`` (manifest lines
            also carry ``translation`` {lang: text} and ``source_lang``).
        n_train: training utterances.
        n_val: validation utterances (training voices, unseen texts).
        n_test: test utterances (held-out voices).
        seed: random seed; the same seed gives the same corpus.
        jobs: parallel synthesis processes.
        video: also render a synthetic mouth video per utterance (audio-visual corpus).
        langs: target languages of ``kind=translation`` (each sentence has all of them).
    """
    if kind == "translation":
        if video:
            raise SystemExit("synth: --video is not available with kind=translation")
        from mmalign.data.synthetic.translation import synthesize_st

        manifests = synthesize_st(
            out_dir,
            n_train=n_train,
            n_val=n_val,
            n_test=n_test,
            langs=tuple(langs),
            seed=seed,
            jobs=jobs,
        )
        for split, path in manifests.items():
            print(f"{split}: {path}")
        return
    if kind == "sentences":
        if video:
            raise SystemExit("synth: --video is not available with kind=sentences")
        from mmalign.data.synthetic.sentences import synthesize_sentences

        manifests = synthesize_sentences(
            out_dir, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed, jobs=jobs
        )
        for split, path in manifests.items():
            print(f"{split}: {path}")
        return
    if video:
        from mmalign.data.synthetic.lips import synthesize_av as synthesize
    else:
        from mmalign.data.synthetic.espeak import synthesize

    manifests = synthesize(
        out_dir, kind=kind, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed, jobs=jobs
    )
    for split, path in manifests.items():
        print(f"{split}: {path}")


def curriculum(plan: str) -> None:
    """Train in stages, each starting from the previous stage's weights; rerun to resume.

    Args:
        plan: a curriculum YAML (``fit_config``, ``out_dir``, ``stages`` with ``name``,
            ``overrides`` and ``init_adapter``); see ``mmalign.lightning_modules.curriculum``.
    """
    from mmalign.lightning_modules.curriculum import run_curriculum

    for path in run_curriculum(plan):
        print(f"stage checkpoint: {path}")


def export(checkpoint: str, out_dir: str) -> None:
    """Export a checkpoint: peft adapter, projector safetensors and mmalign.json.

    Args:
        checkpoint: a ``.ckpt`` written by ``mmalign fit``.
        out_dir: output directory; loads with ``mmalign.inference.export.load_exported``.
    """
    from mmalign.inference.export import export as run_export

    out = run_export(checkpoint, out_dir)
    print(f"exported {checkpoint} to {Path(out).resolve()}")


def cache_features(
    shards: str,
    out_dir: str,
    fit_config: str,
    batch_size: int = 16,
    device: str = "cpu",
    dtype: str = "float16",
    keep_audio: bool = False,
    prefix: str = "shard",
) -> None:
    """Encode shards once with a fit config's frozen audio encoder, for training without it.

    Writes new shards whose samples keep their JSON and gain ``<key>.feats.npy`` ([frames, D]),
    which ``mmalign fit`` reads instead of running the encoder. Each sample is encoded on its
    own window (Whisper: its own length, or 30 s with ``pad_to_30s``), so its features never
    depend on what it was batched with. Training refuses the cache when the model's encoder,
    its weights, the window, mel bins, sample rate or dtype differ, or when the data asks for
    noise augmentation or waveforms.

    Args:
        shards: prepared shards (folder with index.json, index.json, .tar, glob or brace
            pattern).
        out_dir: output folder: ``{prefix}-NNNNNN.tar`` (one per input shard) and index.json
            with a ``cache`` block; give it as ``data.train`` (or val/test) to ``mmalign fit``.
        fit_config: the YAML given to ``mmalign fit --config``: ``model.encoder`` is built from
            it, ``data.sample_rate``/``data.n_mels`` are read (audio-only models).
        batch_size: most samples per encoder call (only samples with the same window share one).
        device: where the encoder runs: ``cpu``, ``cuda``, ``cuda:1`` ...
        dtype: storage dtype of the features, ``float16`` or ``float32``.
        keep_audio: also keep every original member (audio, video), so the shards still serve
            live training (``data.features: live``).
        prefix: output shard name prefix.
    """
    from mmalign.inference.cache import cache_features as run_cache
    from mmalign.inference.cache import encoder_from_fit_config

    try:
        encoder, data = encoder_from_fit_config(fit_config)
        report = run_cache(
            shards,
            out_dir,
            encoder,
            sample_rate=int(data.get("sample_rate", 16000)),
            n_mels=data.get("n_mels", 80),
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            keep_audio=keep_audio,
            prefix=prefix,
        )
    except (OSError, ValueError) as exn:
        raise SystemExit(f"mmalign cache-features: {exn}") from exn
    print(
        f"cached {report.written} samples ({report.total_seconds / 3600:.2f} h) in "
        f"{len(report.shards)} shard(s) to {out_dir} (window {report.cache['window']}, "
        f"{dtype}, encoder weights sha256 {report.cache['weights_sha256'][:12]}); "
        f"skipped {len(report.skipped)}"
    )
    if not report.written:
        raise SystemExit(f"mmalign cache-features: nothing could be written from {shards}")


def score(argv: list[str]) -> None:
    """Print WER/CER of utterances.jsonl files (``reference``/``hypothesis`` per line)."""
    import argparse
    import json

    from mmalign.eval.metrics import NORMALIZERS, error_rates, example

    parser = argparse.ArgumentParser(prog="mmalign score", description=score.__doc__)
    parser.add_argument("files", nargs="+", help="utterances.jsonl files, e.g. from mmalign test")
    parser.add_argument("--normalizer", default="english", choices=NORMALIZERS)
    parser.add_argument("--examples", type=int, default=0, help="pairs to show from the last file")
    args = parser.parse_args(argv)
    print(f"{'file':<50} {'utts':>6} {'WER':>8} {'CER':>8}")
    rows: list[dict] = []
    for name in args.files:
        try:
            rows = [json.loads(line) for line in Path(name).read_text().splitlines() if line]
            refs = [r["reference"] for r in rows]
            hyps = [r["hypothesis"] for r in rows]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise SystemExit(f"{name}: cannot read utterances ({e!r})") from e
        r = error_rates(refs, hyps, args.normalizer)
        print(f"{name:<50} {len(rows):>6} {r['wer']:>8.2%} {r['cer']:>8.2%}")
    for row in rows[: args.examples]:
        print(example(row["reference"], row["hypothesis"]))


def evaluate(argv: list[str]) -> None:
    """WER/CER/BLEU/chrF of a checkpoint or export on shards or a manifest, swept over rates,
    SNRs and tasks; writes metrics.json, report.md, plots and utterances.jsonl."""
    from mmalign.eval.evaluate import main as run_evaluate

    run_evaluate(argv)


def transcribe(argv: list[str]) -> None:
    """Transcribe files, folders, lists or manifests to JSONL, text, SRT and WebVTT (resumable)."""
    from mmalign.inference.transcribe import main as run_transcribe

    run_transcribe(argv)


EXTRA = {
    "prepare": prepare,
    "synth": synth,
    "export": export,
    "curriculum": curriculum,
    "cache-features": cache_features,
}
PLAIN = {  # argparse-based: variable numbers of positional files, lists of sweep values
    "score": score,
    "evaluate": evaluate,
    "transcribe": transcribe,
}


# What a user can cause and fix (a config value, a path, a file, their data): one line, no
# traceback. Anything else (AssertionError, a RuntimeError from torch...) is a bug: traceback.
USER_ERRORS = (ValueError, OSError, KeyError, ImportError)
USER_RUNTIME_ERRORS = {  # RuntimeErrors about the user's data, files or tools
    "mmalign.data.skips.DataQualityError",
    "mmalign.checkpoint_io.CheckpointLoadError",
    "mmalign.checkpoint_io.CheckpointSaveError",
    "mmalign.data.synthetic.espeak.MissingToolError",
    "mmalign.stack.StackError",
    "torch.OutOfMemoryError",
}


def is_user_error(exn: BaseException) -> bool:
    """Whether ``exn`` is about the user's input rather than a bug (see ``USER_ERRORS``)."""
    names = {f"{c.__module__}.{c.__qualname__}" for c in type(exn).__mro__}
    return isinstance(exn, USER_ERRORS) or bool(names & USER_RUNTIME_ERRORS)


SKIPPED = ("Given value", "Subtypes", "Errors:", "Does not validate")  # jsonargparse's


def one_line(message: str) -> str:
    """A jsonargparse message's innermost ``Parser key`` path and reason (its nesting spans many
    lines: class_path, Union subtypes...); other messages with their lines joined."""
    path: list[tuple[int, str]] = []
    best: tuple[int, int, str] = (0, 0, "")
    for line in filter(str.strip, message.splitlines()):
        text = line.strip().removeprefix("- ")
        indent = len(line) - len(line.lstrip(" -"))
        while path and path[-1][0] >= indent:
            path.pop()
        if key := re.search(r'(class: )?Parser key "(.+)":$', text):  # `class:`: a callable's
            path.append((indent, "init_args." * bool(key[1]) + key[2]))
        elif re.fullmatch(r"Problem with given class_path '.+':", text):
            path.append((indent, "init_args"))
        elif (len(path), indent) > best[:2] and not text.startswith(SKIPPED):
            reason = re.sub(r"\. Got value: Namespace\(.*", "", text)
            best = (len(path), indent, ".".join(k for _, k in path) + ": " + reason)
    return best[2] or " ".join(x.strip() for x in message.splitlines() if x.strip())


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``mmalign`` console script.

    An error the user can fix ends in one line naming the field, file or key, and exit status 1
    (2 for a command-line or config-parsing error); ``--debug`` anywhere in the arguments, or
    ``MMALIGN_DEBUG=1``, keeps the traceback and jsonargparse's full messages.
    """
    from mmalign.quiet import silence

    silence()
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MMALIGN_DEBUG", "") not in ("", "0")
    if "--debug" in argv:
        argv = [a for a in argv if a != "--debug"]
        if from_command_line:  # LightningCLI reads sys.argv; relaunched ranks read both
            sys.argv[1:] = argv
            os.environ["MMALIGN_DEBUG"] = "1"
    command = f"mmalign {argv[0]}" if argv and not argv[0].startswith("-") else "mmalign"
    from argparse import ArgumentError

    try:
        _dispatch(argv, from_command_line, debug)
    except ArgumentError as exn:  # jsonargparse's, raised rather than printed unless debugging
        hint = f"see {command} --help; --debug for the full message"
        print(f"{command}: error: {one_line(str(exn))} ({hint})", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as exn:
        if debug or not is_user_error(exn):
            raise
        text = str(exn.args[0]) if isinstance(exn, KeyError) and exn.args else str(exn)
        text = one_line(text) or type(exn).__name__
        raise SystemExit(f"{command}: {text} (--debug shows the traceback)") from None


def _dispatch(argv: list[str], from_command_line: bool, debug: bool) -> None:
    if argv and argv[0] in PLAIN:
        PLAIN[argv[0]](argv[1:])
        return
    if argv and argv[0] in EXTRA:
        from jsonargparse import CLI

        CLI(EXTRA[argv[0]], args=argv[1:], prog=f"mmalign {argv[0]}", exit_on_error=debug)
        return
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "mmalign subcommands: fit validate test predict | "
            + " ".join([*EXTRA, *PLAIN])
            + "\n(--debug anywhere, or MMALIGN_DEBUG=1: tracebacks instead of one-line errors)"
        )
    if argv and argv[0] in ("fit", "validate", "test", "predict"):
        from mmalign.lightning_modules.config_check import precheck

        precheck(argv[1:])  # before Lightning loads: a wrong value fails in seconds
    # LightningCLI reads sys.argv itself
    cli_main(None if from_command_line else argv, exit_on_error=debug)


if __name__ == "__main__":
    main()
