"""Whisper encoder time on short utterances: a window as long as the batch vs padding to 30 s.

    python bench/encoder_window.py                        # pinned real tiny.en, CPU, float32
    python bench/encoder_window.py --random-config small  # whisper-small-sized random encoder
    python bench/encoder_window.py --device cuda --dtype bfloat16

Utterances are 1-5 s of amplitude-modulated noise turned into log-mel by WhisperFeatureExtractor.
Both modes run the same model on the same batches; the table gives the median milliseconds per
batch after warm-up, the padded/cropped ratio, and how close the two modes' features are on the
valid frames (mean cosine similarity). The JSON keeps the settings and environment too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import WhisperFeatureExtractor

from mmalign.encoders.whisper import WhisperEncoder

RANDOM_CONFIGS: dict[str, dict[str, Any]] = {
    "small": dict(
        d_model=768,
        encoder_layers=12,
        encoder_attention_heads=12,
        encoder_ffn_dim=3072,
        decoder_layers=12,
        decoder_attention_heads=12,
        decoder_ffn_dim=3072,
        num_mel_bins=80,
    ),
}


def make_batch(
    batch_size: int, min_s: float, max_s: float, n_mels: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Log-mel [B, n_mels, T] padded to the longest utterance, valid frames [B], durations."""
    durations = rng.uniform(min_s, max_s, batch_size).round(2).tolist()
    audio = []
    for seconds in durations:
        t = np.arange(int(seconds * 16000)) / 16000
        envelope = 0.55 + 0.45 * np.sin(2 * np.pi * rng.uniform(2, 6) * t)  # syllable-ish rate
        audio.append((0.1 * envelope * rng.standard_normal(t.size)).astype(np.float32))
    extractor = WhisperFeatureExtractor(feature_size=n_mels)
    out = extractor(
        audio,
        sampling_rate=16000,
        padding="longest",
        return_attention_mask=True,
        return_tensors="pt",
    )
    return out.input_features, out.attention_mask.sum(-1), durations


def time_ms(encoder: WhisperEncoder, x: torch.Tensor, lengths: torch.Tensor, args) -> list[float]:
    def run() -> None:
        encoder(x, lengths)
        if x.device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        run()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--source", default="pinned:whisper-tiny.en", help="encoder source")
    parser.add_argument(
        "--random-config",
        choices=sorted(RANDOM_CONFIGS),
        default=None,
        help="ignore --source, build a random encoder of this size",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--max-seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/encoder_window.json"))
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.random_config:
        model_name = f"random:{args.random_config}"
        encoder = WhisperEncoder(
            "random", dtype=args.dtype, config=RANDOM_CONFIGS[args.random_config]
        )
    else:
        model_name = args.source
        encoder = WhisperEncoder(args.source, dtype=args.dtype)
    encoder = encoder.to(args.device)
    n_params = sum(p.numel() for p in encoder.parameters())

    rng = np.random.default_rng(args.seed)
    rows = []
    for batch_size in args.batch_sizes:
        x, lengths, durations = make_batch(
            batch_size, args.min_seconds, args.max_seconds, encoder.n_mels, rng
        )
        x, lengths = x.to(args.device), lengths.to(args.device)
        row: dict[str, Any] = {
            "batch_size": batch_size,
            "durations_s": durations,
            "window_frames": int(x.shape[-1]),
        }
        features = {}
        for mode, pad in (("cropped", False), ("padded_30s", True)):
            encoder.pad_to_30s = pad
            times = time_ms(encoder, x, lengths, args)
            row[f"{mode}_ms"] = statistics.median(times)
            row[f"{mode}_all_ms"] = times
            features[mode] = encoder(x, lengths)[0].float()
        row["ratio_padded_over_cropped"] = row["padded_30s_ms"] / row["cropped_ms"]
        out_lengths = (lengths + 1) // 2
        valid = torch.arange(features["cropped"].shape[1], device=x.device) < out_lengths[:, None]
        cos = torch.nn.functional.cosine_similarity(features["cropped"], features["padded_30s"], -1)
        row["cosine_valid_frames"] = float(cos[valid].mean())
        rows.append(row)

    header = (
        f"{'batch':>5} {'window s':>9} {'cropped ms':>11} {'padded ms':>10} {'ratio':>7} {'cos':>6}"
    )
    print(
        f"Whisper encoder {model_name} ({n_params / 1e6:.1f} M params), {args.device}, "
        f"{args.dtype}, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['batch_size']:>5} {r['window_frames'] / 100:>9.2f} {r['cropped_ms']:>11.1f} "
            f"{r['padded_30s_ms']:>10.1f} {r['ratio_padded_over_cropped']:>7.1f} "
            f"{r['cosine_valid_frames']:>6.3f}"
        )

    cpu_name = platform.processor() or platform.machine()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name
    result = {
        "benchmark": "encoder_window",
        "model": model_name,
        "parameters": n_params,
        "device": args.device,
        "device_name": device_name,
        "load_average_1min": os.getloadavg()[0],  # other work on the machine skews CPU timings
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "seed": args.seed,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
