"""Training throughput: mmalign's defaults against Llama-AVSR's settings and the feature cache.

    python bench/train_speed.py                  # 3 arms x 24 measured steps (+4 warm-up)
    python bench/train_speed.py --steps 8 --warmup 2

One model for every arm: Whisper tiny.en (frozen, pinned real weights) -> stack x4 + MLP
projector -> SmolLM2-135M-Instruct (frozen, pinned) with LoRA r=8 on q/v, AdamW over the
trainable parts, bf16 autocast on CPU; the demo corpus's training shards
(``runs/demo/shards/train``, from ``make demo``). Each arm runs in its own process (so its peak
memory is its own) and measures forward + backward + optimizer step *and* getting the batch,
after ``--warmup`` steps:

- ``mmalign``: duration-bucketed batches (``max_batch_seconds``), log-mel computed in a DataLoader
  worker (overlapped with the step), Whisper on a window cropped to the batch's longest clip.
- ``llama-avsr``: Llama-AVSR's recipe: count-based batches of ``--batch-size`` utterances in
  random order (no bucketing), each waveform padded to 30 s and its log-mel computed inside the
  training step in the main process, Whisper on the full 30 s window. The time its loader
  takes to hand over a batch (reading and decoding) is left out, which favours this arm.
- ``cache``: mmalign's batches read from ``mmalign cache-features`` shards (fp16 encoder
  output): no mel, no encoder in the step. The cache is built once, before timing.

Reported: audio seconds trained per wall second (and the ratio to ``llama-avsr``), padding
efficiency (valid / all) of the encoder input frames and of the LLM input tokens, and peak
resident memory of the arm's process per sample of a batch (``ru_maxrss``; CPU, so model
weights are included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "bench_train_speed"
ARMS = ("mmalign", "llama-avsr", "cache")
WINDOW_SAMPLES = 30 * 16000


def build_model(pad_to_30s: bool):
    from peft import LoraConfig

    from mmalign.encoders.whisper import WhisperEncoder
    from mmalign.llm.load import CausalLM
    from mmalign.model import SpeechLLM
    from mmalign.projectors.mlp import MLPProjector

    torch.manual_seed(0)
    encoder = WhisperEncoder(source="pinned:whisper-tiny.en", pad_to_30s=pad_to_30s)
    adapter = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    llm = CausalLM("pinned:smollm2-135m-instruct", adapter=adapter)
    projector = MLPProjector(encoder.dim, llm.hidden_size, rate=4, mode="stack", hidden_dim=1024)
    return SpeechLLM(encoder, projector, llm, system_prompt="")


def cache_dir(train: Path) -> Path:
    """``mmalign cache-features`` of the training shards, with the arm's encoder (once)."""
    from mmalign.data.cache import cache_features
    from mmalign.encoders.whisper import WhisperEncoder

    out = WORK / "cache"
    if not (out / "index.json").is_file():
        encoder = WhisperEncoder(source="pinned:whisper-tiny.en")
        cache_features(train, out, encoder, batch_size=16, progress=False)
    return out


def run_arm(arm: str, args) -> dict[str, Any]:
    """Train ``args.warmup + args.steps`` steps in this process; return its measurements."""
    from mmalign.data.datamodule import ShardDataModule
    from mmalign.data.features import WhisperFeatures
    from mmalign.llm.prompt import padding_efficiency

    torch.set_num_threads(args.threads)
    model = build_model(pad_to_30s=arm == "llama-avsr")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    common = dict(seed=0, shuffle_buffer=500, max_skip_rate=None)
    if arm == "llama-avsr":
        dm = ShardDataModule(
            train=str(args.train),
            max_batch_seconds=1e9,  # count-based: batch size only
            max_batch_size=args.batch_size,
            bucket_buffer=args.batch_size,  # no bucketing: each batch is the next n shuffled
            keep_waveform=True,
            num_workers=0,
            **common,
        )
    else:
        dm = ShardDataModule(
            train=str(cache_dir(args.train)) if arm == "cache" else str(args.train),
            max_batch_seconds=args.batch_seconds,
            bucket_buffer=200,
            num_workers=1,
            features="cached" if arm == "cache" else "live",
            **common,
        )
    mel = WhisperFeatures()
    loader = iter(dm.train_dataloader())
    audio_s = valid_frames = all_frames = fetch = 0.0
    llm_eff, sizes = [], []
    start = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            start = time.perf_counter()
            audio_s = valid_frames = all_frames = fetch = 0.0
            llm_eff, sizes = [], []
        t_fetch = time.perf_counter()
        batch = next(loader)
        if arm == "llama-avsr":  # its loader's time is left out: conservative for it
            fetch += time.perf_counter() - t_fetch
        n = len(batch["texts"])
        if arm == "llama-avsr":  # each waveform padded to 30 s, log-mel in the step
            waves = [
                torch.nn.functional.pad(w[: int(k)], (0, WINDOW_SAMPLES - int(k)))
                for w, k in zip(batch["audio"], batch["audio_sample_lengths"], strict=True)
            ]
            feats, _ = mel(waves)
            batch = {**batch, "audio_features": feats}
            frames = batch["audio_lengths"].float()
            valid_frames += float(frames.sum())
            all_frames += 3000.0 * n
        elif arm == "mmalign":
            frames = batch["audio_lengths"].float()
            valid_frames += float(frames.sum())
            all_frames += float(batch["audio_features"].shape[-1]) * n
        else:
            frames = batch["encoder_lengths"].float()
            valid_frames += float(frames.sum())
            all_frames += float(batch["encoder_features"].shape[1]) * n
        audio_s += float(batch["durations"].sum())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(batch)
            with torch.no_grad():
                llm_eff.append(padding_efficiency(model.splice_batch(batch, train=True)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sizes.append(n)
    wall = time.perf_counter() - start - fetch
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mean_batch = sum(sizes) / len(sizes)
    return {
        "arm": arm,
        "steps": args.steps,
        "wall_seconds": wall,
        "audio_seconds": audio_s,
        "audio_seconds_per_second": audio_s / wall,
        "utterances_per_second": sum(sizes) / wall,
        "mean_batch_size": mean_batch,
        "padding_efficiency_encoder": valid_frames / max(1.0, all_frames),
        "padding_efficiency_llm": sum(llm_eff) / len(llm_eff),
        "peak_rss_mb": peak_mb,
        "peak_rss_mb_per_sample": peak_mb / mean_batch,
    }


def table(result: dict[str, Any]) -> str:
    """The report printed after a run (``--print`` re-prints it from the JSON)."""
    st = result["settings"]
    rows = {r["arm"]: r for r in result["rows"]}
    base = rows["llama-avsr"]["audio_seconds_per_second"]
    lines = [
        f"Training throughput, {st['steps']} steps per arm after {st['warmup']} warm-up, "
        f"{result['environment']['cpus']}-core CPU, bf16 autocast, {result['date']}",
        "",
        "| arm | audio s / wall s | x llama-avsr | utts / s | batch | pad. eff. encoder | "
        "pad. eff. LLM | peak RSS MB / sample |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm in ARMS:
        r = rows.get(arm)
        if r is None:
            continue
        lines.append(
            f"| {arm} | {r['audio_seconds_per_second']:.2f} | "
            f"{r['audio_seconds_per_second'] / base:.2f} | {r['utterances_per_second']:.2f} | "
            f"{r['mean_batch_size']:.1f} | {r['padding_efficiency_encoder']:.3f} | "
            f"{r['padding_efficiency_llm']:.3f} | {r['peak_rss_mb_per_sample']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8, help="llama-avsr's batch size")
    parser.add_argument("--batch-seconds", type=float, default=20.0, help="mmalign's budget")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--train", type=Path, default=ROOT / "runs/demo/shards/train")
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/train_speed.json")
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # child process
    parser.add_argument("--print", type=Path, help="only re-print the table of a results JSON")
    args = parser.parse_args()
    if args.print:
        print(table(json.loads(args.print.read_text())))
        return
    if args.arm:
        print("RESULT " + json.dumps(run_arm(args.arm, args)), flush=True)
        return
    if not (args.train / "index.json").is_file():
        raise SystemExit(f"{args.train} has no shards: run `make demo` first")
    if "cache" in args.arms:
        cache_dir(args.train)  # built before any timing
    rows = []
    started = time.perf_counter()
    for arm in args.arms:
        cmd = [sys.executable, __file__, "--arm", arm, *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not lines:
            raise SystemExit(f"arm {arm} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        rows.append(json.loads(lines[-1].removeprefix("RESULT ")))
        print(f"{arm}: {rows[-1]['audio_seconds_per_second']:.2f} audio s / s", flush=True)
    result = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "command": "python bench/train_speed.py " + " ".join(sys.argv[1:]),
        "rows": rows,
        "total_seconds": time.perf_counter() - started,
        "date": time.strftime("%Y-%m-%d"),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "device": "cpu",
            "load_average_1min": os.getloadavg()[0],
        },
    }
    if "llama-avsr" in args.arms:
        print(table(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
