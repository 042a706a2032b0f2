"""Adapters side by side: LoRA, DoRA, PiSSA, LoRA-GA, LoRA-One and VeRA, same data, seed, steps.

    python bench/adapters.py                       # 6 adapters, 100 steps, 60 test utterances
    python bench/adapters.py --steps 60 --only lora lora_one
    python bench/adapters.py --only lora_one --json bench/results/adapters_lora_one_gamma64.json \
        --set model.llm.init_args.adapter.init_args.lora_one_config.gamma=64

Real Whisper tiny.en (frozen) -> stack x4 + MLP projector -> SmolLM2-135M-Instruct (frozen), the
adapter from ``configs/adapters/<name>.yaml`` (the demo model with that adapter), trained on the
offline spoken-digit demo corpus (``runs/demo/shards/train`` from ``make demo``) for ``--steps``
steps with the same seed, batches and schedule, bf16-mixed on CPU. Data-driven initialisations
(LoRA-GA, LoRA-One) first run their calibration pass over ``adapter_init_batches`` training
batches (timed apart). Each model is scored on the first ``--test-utts`` utterances of the
held-out-voice test manifest (WER per digit, normaliser ``basic``). The claim under test:
gradient-aligned initialisation (LoRA-GA, LoRA-One) converges faster than LoRA's zero ``B``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from matryoshka import StepTimer, test_shards  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "bench_adapters"
ADAPTERS = ["lora", "dora", "pissa", "lora_ga", "lora_one", "vera"]


class LossLog(L.Callback):
    """Training loss per step (the convergence curve)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, *args: Any) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach().float()))


def run_one(name: str, args, test_dir: Path) -> dict[str, Any]:
    from mmalign.cli import cli_main

    label = " ".join([name, *args.set])
    out = WORK / "_".join([name, *args.set]).replace("/", "-")
    config = ROOT / "configs" / "adapters" / f"{name}.yaml"
    overrides = []
    for kv in args.set:
        key, _, value = kv.partition("=")
        overrides += ["--" + key, value]
    cli = cli_main(
        [
            "--config",
            str(config),
            "--data.test",
            str(test_dir),
            "--data.val",
            "null",
            "--data.train",
            str(args.train),
            "--model.predictions_dir",
            str(out),
            "--model.log_examples",
            "0",
            *overrides,
        ],
        run=False,
    )
    module, dm = cli.model, cli.datamodule
    timer, losses = StepTimer(), LossLog()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=args.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out),
        callbacks=[timer, losses],
    )
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.test(module, datamodule=dm, verbose=False)
    test_s = time.perf_counter() - t0
    metrics = json.loads((out / "test_metrics.json").read_text())
    k = max(1, args.steps // 5)
    row = {
        "adapter": label,
        "config": str(config.relative_to(ROOT)),
        "steps": trainer.global_step,
        "trainable_parameters": module.num_trainable_parameters(),
        "step_seconds_median": timer.median(),
        "init_seconds": fit_s - sum(timer.times),  # calibration + set-up, outside the steps
        "fit_seconds": fit_s,
        "test_seconds": test_s,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "wer": metrics["wer"],
        "loss_first": statistics.mean(losses.losses[:k]),
        "loss_last": statistics.mean(losses.losses[-k:]),
        "losses": losses.losses,
    }
    print(
        f"{label}: WER {row['wer']:.2%}, {row['step_seconds_median']:.2f} s/step, "
        f"init {row['init_seconds']:.0f} s, loss {row['loss_first']:.3f} -> {row['loss_last']:.3f}",
        flush=True,
    )
    return row


def table(result: dict[str, Any]) -> str:
    """The report printed after a run (``--print`` re-prints it from the JSON)."""
    st = result["settings"]
    lines = [
        f"WER (per digit, normaliser basic) on {st['test_utts']} held-out-voice test utterances "
        f"after {st['steps']} steps each (same data, seed, schedule); loss = mean training loss "
        f"of the first / last {max(1, st['steps'] // 5)} steps",
        "",
        "| adapter | WER | loss first | loss last | trainable params | median s/step | init s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        name = re.sub(r"[\w.]+\.(\w+=)", r"\1", r["adapter"])  # a --set key's last part
        lines.append(
            f"| {name} | {r['wer']:.2%} | {r['loss_first']:.3f} | {r['loss_last']:.3f} | "
            f"{r['trainable_parameters']:,} | {r['step_seconds_median']:.2f} | "
            f"{r['init_seconds']:.0f} |"
        )
    lines.append(f"\nbench wall {result['total_seconds']:.0f} s; {result['environment']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--test-utts", type=int, default=60)
    parser.add_argument("--only", nargs="+", choices=ADAPTERS, default=ADAPTERS)
    parser.add_argument("--train", type=Path, default=ROOT / "runs/demo/shards/train")
    parser.add_argument("--test-manifest", type=Path, default=ROOT / "runs/demo/corpus/test.jsonl")
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/adapters.json")
    parser.add_argument("--print", type=Path, help="only re-print the table of a results JSON")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every adapter run, e.g. "
        "model.llm.init_args.adapter.init_args.lora_one_config.gamma=64 (repeatable)",
    )
    args = parser.parse_args()
    for kv in args.set:
        if "=" not in kv:
            parser.error(f"--set {kv!r}: expected KEY=VALUE")
    if args.print:
        print(table(json.loads(args.print.read_text())))
        return
    if not (args.train / "index.json").is_file():
        raise SystemExit(f"{args.train} has no shards: run `make demo` first")
    torch.set_num_threads(os.cpu_count() or 1)
    test_dir = test_shards(args.test_manifest, args.test_utts)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for name in args.only:
        rows.append(run_one(name, args, test_dir))
        partial = {"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.with_suffix(".partial.json").write_text(json.dumps(partial, indent=2))
    result = {
        "command": " ".join(["python bench/adapters.py", *sys.argv[1:]]),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
        "total_seconds": time.perf_counter() - started,
        "date": time.strftime("%Y-%m-%d"),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "device": "cpu",
        },
    }
    print(table(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
