"""One Matryoshka (multi-rate) model against single-rate models, same steps and data, one run.

    python bench/matryoshka.py                          # rates 4 8 16, 120 steps, 40 test utts
    python bench/matryoshka.py --rates 4 8 --steps 150 --test-utts 60

Real Whisper tiny.en (frozen) + SmolLM2-135M-Instruct (frozen, LoRA r=8 on q/v), trained on the
offline spoken-digit demo corpus (``runs/demo/shards/train``, from ``make demo``). For each rate
a single-rate model (stack + MLP, as configs/demo/whisper-tiny_smollm2-135m.yaml) trains for
``--steps`` steps; then one MatryoshkaProjector model (one MLP per rate, shared LoRA, loss
averaged over all rates each step, configs/demo/whisper-tiny_smollm2-135m_matryoshka.yaml)
trains for the same steps on the same batches (same seed). All are scored on the first
``--test-utts`` utterances of the held-out-voice test manifest (WER per digit, normaliser
``basic``), the multi-rate model at every rate. Also reported: LLM audio tokens per second of
audio (compressed frames + 2 boundary vectors) and training wall time. bf16-mixed on CPU.
The machine may be shared: the 1-minute load average before and after each fit is recorded.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import soundfile as sf
import torch
from peft import LoraConfig

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "bench_matryoshka"  # bench-owned (git-ignored): test shards, runs


def test_shards(manifest: Path, n: int) -> Path:
    """Prepare the first ``n`` utterances of ``manifest`` into bench-owned shards (once)."""
    from mmalign.data.shards import prepare

    out = WORK / f"test{n}"
    if (out / "index.json").is_file():
        return out
    WORK.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(x) for x in manifest.read_text().splitlines()[:n]]
    small = WORK / f"test{n}.jsonl"
    with open(small, "w") as f:
        for r in rows:
            f.write(
                json.dumps({**r, "audio": str((manifest.parent / r["audio"]).resolve())}) + "\n"
            )
    report = prepare(small, out, progress=False, root=manifest.parent)
    if not report.ok:
        raise SystemExit(f"could not prepare {small}")
    return out


def audio_tokens_per_second(manifest: Path, n: int, rate: int, frame_rate: float) -> float:
    """LLM input tokens the audio costs per second: ceil(frames / rate) + begin/end vectors."""
    tokens = seconds = 0.0
    for line in manifest.read_text().splitlines()[:n]:
        info = sf.info(str(manifest.parent / json.loads(line)["audio"]))
        frames = int(info.frames / info.samplerate * frame_rate)
        tokens += math.ceil(frames / rate) + 2
        seconds += info.duration
    return tokens / seconds


class StepTimer(L.Callback):
    """Seconds inside training steps (forward, backward, optimizer), data loading excluded;
    the first ``skip`` steps (one-off warm-up) are left out of the median."""

    def __init__(self, skip: int = 3) -> None:
        self.skip = skip
        self.times: list[float] = []
        self._t = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter() - self._t)

    def median(self) -> float:
        return statistics.median(self.times[self.skip :] or self.times)


def build(projector: Any, **module_kwargs: Any):
    from mmalign.encoders.whisper import WhisperEncoder
    from mmalign.lightning_modules.alignment import AlignmentModule
    from mmalign.lightning_modules.schedules import WarmupCosine
    from mmalign.llm.load import CausalLM

    L.seed_everything(0, verbose=False)
    encoder = WhisperEncoder(source="pinned:whisper-tiny.en")
    adapter = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])
    llm = CausalLM("pinned:smollm2-135m-instruct", adapter=adapter)
    return AlignmentModule(
        encoder,
        projector,
        llm,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.01),
        scheduler=functools.partial(WarmupCosine, warmup_steps=15),
        normalizer="basic",
        system_prompt="",
        log_examples=0,
        **module_kwargs,
    )


def run_one(name: str, module, args, test_dir: Path, out: Path) -> dict[str, Any]:
    from mmalign.data.datamodule import ShardDataModule

    dm = ShardDataModule(
        train=str(args.train),
        test=str(test_dir),
        max_batch_seconds=args.batch_seconds,
        max_batch_size=args.batch_size,
        num_workers=0,
        shuffle_buffer=200,
        seed=0,
    )
    timer = StepTimer()
    module.predictions_dir = str(out / name)
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
        default_root_dir=str(out / name),
        callbacks=[timer],
    )
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    fit_s = time.perf_counter() - t0
    load_after = os.getloadavg()[0]
    t0 = time.perf_counter()
    trainer.test(module, datamodule=dm, verbose=False)
    test_s = time.perf_counter() - t0
    metrics = json.loads((out / name / "test_metrics.json").read_text())
    row = {
        "model": name,
        "steps": trainer.global_step,
        "fit_seconds": fit_s,
        "step_seconds_median": timer.median(),
        "step_seconds_sum": sum(timer.times),
        "test_seconds": test_s,
        "load_before": load_before,
        "load_after": load_after,
        "trainable_parameters": module.num_trainable_parameters(),
        "wer": {str(module.model.projector.rate): metrics["wer"]},
    }
    if "rates" in metrics:
        row["wer"] = {r: m["wer"] for r, m in metrics["rates"].items()}
    print(
        f"{name}: fit {fit_s:.0f} s, {timer.median():.2f} s/step, test {test_s:.0f} s, "
        f"WER {row['wer']}",
        flush=True,
    )
    return row


def table(result: dict[str, Any]) -> str:
    """The report printed after a run (``--print`` re-prints it from the JSON)."""
    st, rows, tps = result["settings"], result["rows"], result["audio_tokens_per_second"]
    singles, mt = rows[:-1], rows[-1]
    lines = [
        f"WER (per digit, normaliser basic) on {st['test_utts']} held-out-voice test utterances; "
        f"{st['steps']} steps each, batches <= {st['batch_size']} utts / {st['batch_seconds']:g} s",
        "",
        "| rate | audio tokens / s (LLM input) | single-rate WER | matryoshka WER |",
        "|---:|---:|---:|---:|",
    ]
    for r, single in zip(st["rates"], singles, strict=True):
        lines.append(
            f"| {r} | {tps[str(r)]:.1f} | {single['wer'][str(r)]:.2%} | {mt['wer'][str(r)]:.2%} |"
        )
    lines += [
        "",
        "| model | trainable params | median s/step | fit wall s | 1-min load before/after |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['trainable_parameters']:,} | "
            f"{row['step_seconds_median']:.2f} | {row['fit_seconds']:.0f} | "
            f"{row['load_before']:.2f}/{row['load_after']:.2f} |"
        )
    lines += [
        "",
        f"matryoshka training cost (median step): {result['matryoshka_cost_vs_one_single']:.2f}x "
        f"a single-rate model, {result['matryoshka_cost_vs_all_singles']:.2f}x all "
        f"{len(singles)} single-rate models together; bench wall {result['total_seconds']:.0f} s",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--test-utts", type=int, default=40)
    parser.add_argument("--batch-seconds", type=float, default=16.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train", type=Path, default=ROOT / "runs/demo/shards/train")
    parser.add_argument("--test-manifest", type=Path, default=ROOT / "runs/demo/corpus/test.jsonl")
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/matryoshka.json")
    parser.add_argument("--print", type=Path, help="only re-print the table of a results JSON")
    args = parser.parse_args()
    if args.print:
        print(table(json.loads(args.print.read_text())))
        return
    torch.set_num_threads(os.cpu_count() or 1)

    from mmalign.projectors.matryoshka import MatryoshkaProjector
    from mmalign.projectors.mlp import MLPProjector

    test_dir = test_shards(args.test_manifest, args.test_utts)
    out = WORK / "runs"
    started = time.perf_counter()
    rows = []
    for rate in args.rates:
        projector = functools.partial(MLPProjector, rate=rate, mode="stack", hidden_dim=1024)
        rows.append(run_one(f"single r{rate}", build(projector), args, test_dir, out))
    multi = functools.partial(MatryoshkaProjector, rates=args.rates, mode="stack", hidden_dim=1024)
    module = build(multi, lora_strategy="shared", rate_sampling="all")
    rows.append(run_one("matryoshka", module, args, test_dir, out))
    total = time.perf_counter() - started

    tps = {
        r: audio_tokens_per_second(args.test_manifest, args.test_utts, r, 50.0) for r in args.rates
    }
    singles, mt = rows[:-1], rows[-1]
    mean_single = statistics.mean(r["step_seconds_median"] for r in singles)
    result = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "audio_tokens_per_second": {str(r): v for r, v in tps.items()},
        "rows": rows,
        "matryoshka_cost_vs_one_single": mt["step_seconds_median"] / mean_single,
        "matryoshka_cost_vs_all_singles": mt["step_seconds_median"] / (mean_single * len(singles)),
        "total_seconds": total,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
        },
    }
    print(table(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
