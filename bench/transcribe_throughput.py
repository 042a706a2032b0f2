"""Transcription throughput: batched, length-sorted greedy decoding vs batch-1 beam-15 decoding.

    python bench/transcribe_throughput.py                    # runs/demo/export on its test shards
    python bench/transcribe_throughput.py --model runs/demo/checkpoints/last.ckpt --limit 48
    python bench/transcribe_throughput.py --device cuda --dtype bfloat16

Beam search with 15 beams, one utterance at a time, is the decoding Llama-AVSR publishes its
numbers with. mmalign decodes greedily by default, many utterances at a time, sorted by length so
little of each batch is padding. Both modes decode the same utterances with the same model,
end to end from waveforms (log-mel, encoder, projector, LLM), through the code path that
``mmalign evaluate`` and ``mmalign transcribe`` use (``mmalign.inference.decode``). The table
gives audio seconds decoded per wall-clock second, the speed-up, and each mode's WER, so the
speed is seen next to what it costs in accuracy. One warm-up batch runs first, untimed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from mmalign.eval.metrics import error_rates
from mmalign.eval.samples import read_samples
from mmalign.inference.decode import DecodeOptions, decode_samples, features_for, load_model

DEMO_MODEL = Path("runs/demo/export")
DEMO_DATA = Path("runs/demo/shards/test")


def run_mode(model, samples, options: DecodeOptions, features) -> dict[str, Any]:
    start = time.perf_counter()
    hyps = decode_samples(model, samples, options, features)
    wall = time.perf_counter() - start
    audio = sum(float(s["duration"]) for s in samples)
    rates = error_rates([s["text"] for s in samples], hyps)
    return {
        "num_beams": options.num_beams,
        "batch_size": options.batch_size,
        "utterances": len(samples),
        "audio_seconds": round(audio, 3),
        "wall_seconds": round(wall, 3),
        "audio_seconds_per_second": audio / wall,
        "wer": rates["wer"],
        "examples": [
            {"reference": s["text"], "hypothesis": h}
            for s, h in zip(samples[:3], hyps[:3], strict=True)
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", type=Path, help=f"checkpoint or export (default {DEMO_MODEL})")
    parser.add_argument("--data", type=Path, default=DEMO_DATA, help="shards or JSONL manifest")
    parser.add_argument("--limit", type=int, default=24, help="utterances (the same for both)")
    parser.add_argument("--batch-size", type=int, default=24, help="greedy batch size")
    parser.add_argument("--batch-seconds", type=float, default=240.0)
    parser.add_argument("--beams", type=int, default=15, help="beams of the batch-1 baseline")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--out", type=Path, default=Path("bench/results/transcribe_throughput.json")
    )
    args = parser.parse_args()

    model_path = args.model or DEMO_MODEL
    if not model_path.exists():
        raise SystemExit(f"{model_path} not found: run `make demo` or pass --model PATH")
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(model_path, args.device, args.dtype)
    model = loaded.model
    samples, skipped = read_samples(args.data, limit=args.limit)
    if not samples:
        raise SystemExit(f"no usable utterances in {args.data} ({len(skipped)} skipped)")
    features = features_for(model)
    common = {"device": args.device, "dtype": args.dtype, "batch_seconds": args.batch_seconds}
    greedy = DecodeOptions(num_beams=1, batch_size=args.batch_size, **common)
    beam = DecodeOptions(num_beams=args.beams, batch_size=1, **common)

    decode_samples(model, samples[:2], greedy, features)  # warm-up: allocations, kernels
    rows = {
        "greedy_batched_sorted": run_mode(model, samples, greedy, features),
        f"beam{args.beams}_batch1": run_mode(model, samples, beam, features),
    }
    base, fast = rows[f"beam{args.beams}_batch1"], rows["greedy_batched_sorted"]
    speedup = fast["audio_seconds_per_second"] / base["audio_seconds_per_second"]

    header = f"{'mode':<24} {'utts':>5} {'audio s':>8} {'wall s':>8} {'audio s/s':>10} {'WER %':>7}"
    print(
        f"{model_path} on {args.data}: {len(samples)} utterances, {args.device} {args.dtype}, "
        f"{torch.get_num_threads()} threads"
    )
    print(header)
    print("-" * len(header))
    for name, r in rows.items():
        print(
            f"{name:<24} {r['utterances']:>5} {r['audio_seconds']:>8.1f} {r['wall_seconds']:>8.1f} "
            f"{r['audio_seconds_per_second']:>10.2f} {100 * r['wer']:>7.2f}"
        )
    print(f"speed-up of batched greedy over batch-1 beam-{args.beams}: {speedup:.1f}x")

    result = {
        "benchmark": "transcribe_throughput",
        "model": str(model_path),
        "model_sha256": loaded.sha256,
        "data": str(args.data),
        "device": args.device,
        "device_name": torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else platform.processor() or platform.machine(),
        "load_average_1min": os.getloadavg()[0],  # other work on the machine skews CPU timings
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "rows": rows,
        "speedup": speedup,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
