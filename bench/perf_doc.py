"""Write docs/PERFORMANCE.md from the benchmarks' JSON in bench/results/ (never typed by hand).

    python bench/perf_doc.py          # or: make perf-doc
    python bench/perf_doc.py --check  # exit 1 when docs/PERFORMANCE.md is out of date

Each section gives the result's date, device and command, then its table: rendered by the
benchmark's own ``table()`` where it has one (train_throughput, gpu_train,
matryoshka, adapters), else here from the JSON. A result file that does not exist yet says so;
the GPU benchmark's section says it has not been run until ``bench/results/gpu_train.json``
exists. Older result files that recorded no date get their last commit date (``git log``), or
the file's date when uncommitted, marked as such; one that recorded no command says so
instead of guessing one.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
OUT = ROOT / "docs" / "PERFORMANCE.md"


def _bench_table(script: str) -> Callable[[dict[str, Any]], str]:
    """The ``table()`` of ``bench/<script>.py`` (imported from its file when needed)."""

    def render(result: dict[str, Any]) -> str:
        path = ROOT / "bench" / f"{script}.py"
        if not path.is_file():
            return f"(`bench/{script}.py` is gone: the JSON is kept, its table is not rendered)"
        spec = importlib.util.spec_from_file_location(f"_bench_{script}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        added = str(path.parent) not in sys.path  # benches import each other (as scripts do)
        if added:
            sys.path.insert(0, str(path.parent))
        try:
            spec.loader.exec_module(module)
        finally:
            if added:
                sys.path.remove(str(path.parent))
        return module.table(result)

    return render


def encoder_window_table(result: dict[str, Any]) -> str:
    lines = [
        f"Whisper encoder `{result['model']}` ({result['parameters'] / 1e6:.1f} M parameters), "
        f"{result['dtype']}, {result['threads']} thread(s), median of {result['repeats']} runs",
        "",
        "| batch | window s | cropped ms | padded to 30 s ms | padded / cropped | cosine (valid "
        "frames) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['batch_size']} | {r['window_frames'] / 100:.2f} | {r['cropped_ms']:.1f} | "
            f"{r['padded_30s_ms']:.1f} | {r['ratio_padded_over_cropped']:.1f} | "
            f"{r['cosine_valid_frames']:.3f} |"
        )
    return "\n".join(lines)


def transcribe_table(result: dict[str, Any]) -> str:
    lines = [
        f"`{result['model']}` on `{result['data']}`, {result['dtype']}, {result['threads']} "
        f"thread(s)",
        "",
        "| mode | beams | batch | utterances | audio s | wall s | audio s / s | WER |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["rows"].items():
        lines.append(
            f"| {name} | {r['num_beams']} | {r['batch_size']} | {r['utterances']} | "
            f"{r['audio_seconds']:.1f} | {r['wall_seconds']:.1f} | "
            f"{r['audio_seconds_per_second']:.2f} | {r['wer']:.2%} |"
        )
    lines += ["", f"Speed-up of batched greedy decoding: {result['speedup']:.1f}x"]
    return "\n".join(lines)


# (JSON name, title, renderer, what it shows)
SECTIONS: list[tuple[str, str, Callable[[dict[str, Any]], str], str]] = [
    (
        "convergence",
        "Alignment convergence on open-vocabulary speech",
        _bench_table("convergence"),
        "Whisper tiny.en + SmolLM2-135M on the sentences corpus (`mmalign synth --kind "
        "sentences`): the plain recipe (LLM loss from step 0) against each alignment technique "
        "and the shipped default, same shards, seed and step budget; held-out WER after "
        "Whisper's English normaliser, steps and training minutes to 50/30/15%. "
        "![WER against steps](../bench/results/convergence.png)",
    ),
    (
        "convergence_long",
        "Alignment convergence: a long CTC stage, then the LLM",
        _bench_table("convergence"),
        "The same corpus, model and scoring as above with a longer budget: CTC steps (no LLM) "
        "cost about a fifth of an LLM step, so the alignment stage gets most of the steps; each "
        "stage has its own learning-rate schedule. ![WER against steps]"
        "(../bench/results/convergence_long.png)",
    ),
    (
        "train_throughput",
        "Training throughput: mmalign's defaults vs Llama-AVSR's settings",
        _bench_table("train_throughput"),
        "Audio seconds trained per wall second, padding efficiency and peak memory per sample "
        "of mmalign's defaults (duration buckets, features in DataLoader workers, Whisper on "
        "the batch's window) against Llama-AVSR's settings (30 s-padded Whisper, random "
        "fixed-size batches, log-mel in the training step) and training from the feature "
        "cache, one model and one corpus, measured in one run. The module docstring of "
        "`bench/train_throughput.py` says exactly what each arm does.",
    ),
    (
        "train_throughput_small",
        "Training throughput with a Whisper-small encoder",
        _bench_table("train_throughput"),
        "The same comparison with a heavier frozen encoder (Whisper-small, random weights) "
        "beside the same LLM: the encoder's share of the step grows, and with it what a 30 s "
        "window and in-step log-mel cost.",
    ),
    (
        "gpu_train",
        "GPU: real-size training and transcription",
        _bench_table("gpu_train"),
        "Random-initialised Whisper-small/-medium encoders with 0.5B/1B LLMs, bf16: training "
        "samples/s, model FLOPs utilisation (formulas in `bench/gpu_train.py`), peak memory "
        "and batched greedy transcription audio s/s.",
    ),
    (
        "step_profile",
        "Training step: `mmalign fit` against a bare loop",
        _bench_table("step_profile"),
        "The same model and batches trained by `mmalign fit`'s code (Lightning, hooks, logging, "
        "non-finite check, token-weighted gradients) and by a bare PyTorch loop; then one step at "
        "Whisper-small + Qwen2.5-0.5B shape: logits the loss holds, tensors made from Python data.",
    ),
    (
        "step_profile_before",
        "Training step, before issue 17's changes",
        _bench_table("step_profile"),
        "The gap part of the same benchmark run against mmalign at the commit before the "
        "exact-core changes (the benchmark script from this commit, the library from that one).",
    ),
    (
        "encoder_window",
        "Whisper on the batch's window vs padding to 30 s",
        encoder_window_table,
        "Encoder time alone, same model and batches.",
    ),
    (
        "transcribe_throughput",
        "Batched greedy transcription vs batch-1 beam search",
        transcribe_table,
        "End to end from waveforms through `mmalign.inference.decode`.",
    ),
    (
        "matryoshka",
        "Matryoshka (multi-rate) training cost",
        _bench_table("matryoshka"),
        "One multi-rate model against one single-rate model per rate.",
    ),
    (
        "adapters",
        "Adapters (LoRA variants) on the demo models",
        _bench_table("adapters"),
        "Same data, seed and steps for each peft tuner.",
    ),
    (
        "adapters_lora_one_gamma*",
        "LoRA-One's gamma",
        _bench_table("adapters"),
        "LoRA-One alone, one run per `lora_one_config.gamma` (its initial step's spectral norm is "
        "`scaling / gamma`), otherwise as the adapters benchmark above.",
    ),
]


def recorded_date(result: dict[str, Any], path: Path) -> str:
    if result.get("date"):
        return str(result["date"])
    try:
        out = subprocess.run(
            ["git", "log", "-1", "--format=%cs", "--", str(path.relative_to(ROOT))],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        ).stdout.strip()
    except (OSError, ValueError, subprocess.CalledProcessError):
        out = ""
    if out:
        return f"{out} (not recorded in the JSON: the file's last commit)"
    day = time.strftime("%Y-%m-%d", time.localtime(path.stat().st_mtime))
    return f"{day} (not recorded in the JSON: the file's date)"


def device(result: dict[str, Any]) -> str:
    env = result.get("environment") or {}
    name = env.get("device_name") or result.get("device_name") or env.get("processor")
    kind = env.get("device") or result.get("device")
    cpus = env.get("cpus") or result.get("cpu_count")
    parts = [str(p) for p in (kind, name) if p]
    if not name and env.get("machine"):
        parts.append(str(env["machine"]))
    if cpus:
        parts.append(f"{cpus} CPU cores")
    torch_version = env.get("torch") or result.get("torch")
    if torch_version:
        parts.append(f"torch {torch_version}")
    load = env.get("load_average_1min", result.get("load_average_1min"))
    if load is not None:
        parts.append(f"1-min load average {load:.1f} at the start")
    return ", ".join(parts) or "not recorded"


def render(results: Path = RESULTS) -> str:
    """The whole document, from the JSON files in ``results``."""
    parts = [
        "# Performance",
        "",
        "Generated by `python bench/perf_doc.py` (`make perf-doc`) from `bench/results/*.json`; "
        "do not edit by hand. Each section gives the date, device and command of its result. "
        "CPU timings come from a 2-core machine that may have been shared (see each load "
        "average); ratios measured in one run are the figures to compare.",
    ]
    for name, title, renderer, about in SECTIONS:
        parts += ["", f"## {title}", "", about, ""]
        # a name with "*" is a sweep: one block per matching result file
        paths = [
            p
            for p in sorted(results.glob(f"{name}.json"), key=_natural)
            if not p.name.endswith(".partial.json")  # a cut run's rows so far
        ]
        if not paths:
            if name == "gpu_train":
                parts.append(
                    "**The GPU benchmark has not been run**: no `bench/results/gpu_train.json` "
                    "yet. It needs one CUDA GPU: `python bench/gpu_train.py`."
                )
            else:
                parts.append(f"Not run yet: no `bench/results/{name}.json`.")
            continue
        for path in paths:
            parts += [*_block(path, renderer), ""]
        parts.pop()
    return "\n".join(parts) + "\n"


def _natural(path: Path) -> list[Any]:
    """Sort key that puts gamma16 before gamma128."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _block(path: Path, renderer: Callable[[dict[str, Any]], str]) -> list[str]:
    """Date, device, command and table of one result file."""
    result = json.loads(path.read_text())
    command = result.get("command")
    return [
        f"- date: {recorded_date(result, path)}",
        f"- device: {device(result)}",
        "- command: " + (f"`{command}`" if command else "not recorded in the JSON"),
        f"- results: `bench/results/{path.name}`",
        "",
        renderer(result),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the file is out of date")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    text = render()
    if args.check:
        if not args.out.is_file() or args.out.read_text() != text:
            sys.exit(f"{args.out} is out of date: run python bench/perf_doc.py")
        print(f"{args.out} is up to date")
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
