"""Trainable parameters and output tokens per second of audio for each projector design.

    python bench/projectors.py              # print the table, write bench/results/projectors.json
    python bench/projectors.py --readme README.md   # also refresh the README table

Input: a Whisper-small-sized encoder (768 channels, 50 frames per second); output: a 1B-sized LLM
(width 2048). Each projector is built with the settings of its configs/asr file (or the design's
published defaults) and run on 30 s of frames, so tokens per second are measured, not derived.
Parameter counts include the two learned boundary vectors (begin/end of the modality span).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mmalign.projectors.base import Projector
from mmalign.projectors.conv import ConvProjector
from mmalign.projectors.linear import LinearProjector
from mmalign.projectors.mlp import MLPProjector
from mmalign.projectors.qformer import WindowQFormerProjector
from mmalign.projectors.swiglu import SwiGLUProjector

IN_DIM, FRAME_RATE, LLM_WIDTH, SECONDS = 768, 50, 2048, 30
BEGIN, END = "<!-- bench/projectors.py:begin -->", "<!-- bench/projectors.py:end -->"

# (name, design, class, settings, config that uses it)
PROJECTORS: list[tuple[str, str, Callable[..., Projector], dict[str, Any], str]] = [
    ("linear", "baseline", LinearProjector, {"rate": 5}, "-"),
    (
        "mlp (stack)",
        "SLAM-ASR-style",
        MLPProjector,
        {"rate": 5, "mode": "stack", "hidden_dim": 2048},
        "whisper-small_qwen2.5-0.5b",
    ),
    (
        "mlp (avgpool)",
        "Llama-AVSR",
        MLPProjector,
        {"rate": 4, "mode": "avgpool", "hidden_dim": 2048, "activation": "relu"},
        "wavlm-base-plus_qwen2.5-0.5b",
    ),
    (
        "swiglu",
        "Ultravox",
        SwiGLUProjector,
        {"rate": 8, "hidden_dim": 4096},
        "whisper-small_qwen2.5-0.5b_swiglu",
    ),
    (
        "conv",
        "WavLLM-style",
        ConvProjector,
        {"rate": 4, "kernel_size": 4, "hidden_dim": 2048},
        "whisper-small+wavlm-base-plus_qwen2.5-0.5b (there on 1536 channels)",
    ),
    (
        "window Q-Former",
        "SALMONN",
        WindowQFormerProjector,
        {"window": 17, "num_queries": 1, "hidden_size": 768, "num_layers": 2, "num_heads": 12},
        "whisper-small_qwen2.5-0.5b_qformer",
    ),
]


def measure() -> list[dict[str, Any]]:
    rows = []
    frames = SECONDS * FRAME_RATE
    x = torch.randn(1, frames, IN_DIM, generator=torch.Generator().manual_seed(0))
    for name, design, cls, settings, config in PROJECTORS:
        torch.manual_seed(0)
        proj = cls(IN_DIM, LLM_WIDTH, **settings).eval()
        with torch.no_grad():
            y, lengths = proj(x, torch.tensor([frames]))
        assert y.shape == (1, int(lengths[0]), LLM_WIDTH)
        rows.append(
            {
                "projector": name,
                "design": design,
                "class_path": f"{cls.__module__}.{cls.__qualname__}",
                "settings": settings,
                "config": config,
                "trainable_parameters": sum(p.numel() for p in proj.parameters()),
                "tokens_per_30s": int(lengths[0]),
                "tokens_per_second": int(lengths[0]) / SECONDS,
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"Input {IN_DIM} channels at {FRAME_RATE} frames/s (Whisper-small), output width "
        f"{LLM_WIDTH} (1B-sized LLM), measured on {SECONDS} s of frames.\n\n"
        "| projector | design | settings | trainable params | tokens/s | tokens per 30 s |\n"
        "|---|---|---|---:|---:|---:|\n"
    )
    lines = [
        f"| {r['projector']} | {r['design']} | "
        + ", ".join(f"{k}={v}" for k, v in r["settings"].items())
        + f" | {r['trainable_parameters'] / 1e6:.2f} M | {r['tokens_per_second']:.2f} | "
        f"{r['tokens_per_30s']} |"
        for r in rows
    ]
    return head + "\n".join(lines)


def update_readme(path: Path, text: str) -> None:
    readme = path.read_text()
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} block to refresh")
    block = f"{BEGIN}\n{text}\n{END}"
    path.write_text(
        re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, readme, flags=re.S)
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/projectors.json")
    parser.add_argument("--readme", type=Path, help="refresh the table between the markers")
    args = parser.parse_args(argv)
    rows = measure()
    text = table(rows)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "in_dim": IN_DIM,
        "frame_rate": FRAME_RATE,
        "llm_width": LLM_WIDTH,
        "seconds": SECONDS,
        "rows": rows,
        "env": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.readme:
        update_readme(args.readme, text)


if __name__ == "__main__":
    main()
