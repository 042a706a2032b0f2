"""How fast alignment converges: the plain recipe against each alignment technique.

    python bench/convergence.py --corpus runs/sent --arms plain default --steps 900 --every 150

Every arm trains ``configs/demo/sentences_whisper-tiny_smollm2-135m.yaml`` with its own
overrides on the same shards, seed and step budget (``mmalign fit`` in a subprocess, validation
off so the clock measures training only; ``TrainClock`` stores the training seconds in each
checkpoint). Then each checkpoint (every ``--every`` steps) decodes the first
``--eval-n`` utterances of val (held-out sentences, training voices: choose settings here),
test (held-out sentences and voices) and test_synth (a synthesiser never heard), greedy, scored
after Whisper's English normaliser (a checkpoint inside an arm's CTC stage scores its CTC head
only: its LoRA is untrained). Rows: WER per split at each checkpoint, the steps and CPU
minutes at which test WER first reaches 50/30/15%, and the final WER. An arm's rows are merged
into the JSON when it finishes, so arms can run in separate sessions; ``--print`` re-renders.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/demo/sentences_whisper-tiny_smollm2-135m.yaml"
SPLITS = ("val", "test", "test_synth")
TARGETS = (50, 30, 15)
PLAIN = {
    "model.ctc_only_steps": 0,
    "model.ctc_weight": 0.0,
    "model.ctc_shrink": False,
    "model.ctc_embed": False,
    "model.projector_warmup_steps": 0,
}
# each arm: the plain recipe plus its overrides ("default" is the config as shipped)
ARMS: dict[str, dict[str, Any]] = {
    "plain": PLAIN,
    "ctc_aux": {**PLAIN, "model.ctc_weight": 0.5},
    "ctc_stage": {**PLAIN, "model.ctc_only_steps": 400},
    "ctc_stage_aux": {**PLAIN, "model.ctc_only_steps": 400, "model.ctc_weight": 0.5},
    "ctc_shrink": {
        **PLAIN,
        "model.ctc_only_steps": 400,
        "model.ctc_weight": 0.5,
        "model.ctc_shrink": True,
    },
    "ctc_embed": {
        **PLAIN,
        "model.ctc_only_steps": 400,
        "model.ctc_weight": 0.5,
        "model.ctc_shrink": True,
        "model.ctc_embed": True,
    },
    # a long CTC stage (its steps run no LLM and cost a fifth of an LLM step), then the LLM
    # reads posterior-weighted token embeddings; each stage has its own LR schedule
    "ctc_long_embed": {
        **PLAIN,
        "model.ctc_only_steps": 2100,
        "model.ctc_weight": 0.5,
        "model.ctc_shrink": True,
        "model.ctc_embed": True,
    },
    "warmup": {**PLAIN, "model.projector_warmup_steps": 100},
    "pissa": {**PLAIN, "model.llm.init_args.adapter.init_args.init_lora_weights": "pissa"},
    "default": {},
}


def arm_config(name: str, args: argparse.Namespace) -> Path:
    """The arm's YAML: the shipped config, its overrides, our data, a checkpoint every ``every``
    steps with the training clock in it, no validation."""
    cfg = yaml.safe_load(CONFIG.read_text())
    for dotted, value in ARMS[name].items():
        node = cfg
        *path, last = dotted.split(".")
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    out = args.out_dir / name
    trainer = cfg["trainer"]
    trainer.update(max_steps=args.steps, limit_val_batches=0, default_root_dir=str(out))
    trainer["enable_progress_bar"] = False
    trainer["logger"] = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(out), "name": "logs"},
    }
    trainer["callbacks"] = [
        {"class_path": "mmalign.lightning_modules.callbacks.TrainClock"},
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "dirpath": str(out / "checkpoints"),
                "filename": "{step}",
                "save_top_k": -1,
                "every_n_train_steps": args.every,
                "save_last": True,
            },
        },
    ]
    shards = args.corpus / "shards"
    cfg["data"].update(train=str(shards / "train"), val=str(shards / "val"), test=None)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def train(name: str, args: argparse.Namespace) -> list[Path]:
    config = arm_config(name, args)
    if not (args.out_dir / name / "checkpoints" / f"step={args.steps}.ckpt").is_file():
        cmd = [sys.executable, "-m", "mmalign", "fit", "--config", str(config)]
        print(f"[{name}] {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    found = (args.out_dir / name / "checkpoints").glob("step=*.ckpt")
    return sorted(found, key=lambda p: int(p.stem.split("=")[1]))


def train_seconds(ckpt: dict[str, Any]) -> float:
    clock = next(v for k, v in ckpt["callbacks"].items() if k.startswith("TrainClock"))
    return float(clock["seconds"])


def ctc_stage(name: str) -> int:
    """The arm's ``ctc_only_steps``: until then LoRA is untrained and the LLM is not scored."""
    shipped = yaml.safe_load(CONFIG.read_text())["model"].get("ctc_only_steps", 0)
    return int(ARMS[name].get("model.ctc_only_steps", shipped))


def score(name: str, checkpoints: list[Path], args: argparse.Namespace) -> list[dict[str, Any]]:
    """WER per split at each checkpoint; the model is built once, then reloaded per step. In the
    CTC stage only the CTC head is scored: the untrained LLM loops to its token budget, which
    costs minutes per checkpoint and says nothing."""
    from mmalign.checkpoint_io import load_checkpoint_file
    from mmalign.data.reading import read_shard_samples
    from mmalign.eval.metrics import error_rates
    from mmalign.inference.decode import DecodeOptions, decode_samples
    from mmalign.inference.export import load_checkpoint
    from mmalign.llm.offsets import sync_base_offsets

    samples = {
        s: read_shard_samples(args.corpus / "shards" / s, limit=args.eval_n)[0] for s in SPLITS
    }
    model = load_checkpoint(checkpoints[0]).eval()
    stage, rows = ctc_stage(name), []
    for path in checkpoints:
        ckpt = load_checkpoint_file(path)
        state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
        model.load_state_dict(state, strict=False)
        sync_base_offsets(model.llm)
        row = {"step": int(ckpt["global_step"]), "train_minutes": train_seconds(ckpt) / 60}
        row["wer"], row["examples"] = {}, {}
        for split, data in samples.items():
            refs = [d["text"] for d in data]
            if row["step"] > stage:
                hyps = decode_samples(model, data, DecodeOptions(batch_size=16))
                row["wer"][split] = 100 * error_rates(refs, hyps, "english")["wer"]
                row["examples"][split] = [
                    {"ref": r, "hyp": h} for r, h in zip(refs[:3], hyps[:3], strict=True)
                ]
            if model.ctc is not None:  # the CTC head alone: what the projector carries
                ctc = ctc_hypotheses(model, data)
                row.setdefault("ctc_wer", {})[split] = (
                    100 * error_rates(refs, ctc, "english")["wer"]
                )
        ctc = ", ".join(f"{s} {w:.1f}%" for s, w in row.get("ctc_wer", {}).items())
        print(f"[{name}] step {row['step']}: " + ", ".join(
            f"{s} {w:.1f}%" for s, w in row["wer"].items()) + (f"; CTC head: {ctc}" if ctc else ""),
            flush=True)  # fmt: skip
        rows.append(row)
    return rows


def ctc_hypotheses(model: Any, samples: list[dict[str, Any]]) -> list[str]:
    """Best-path CTC transcripts of ``samples`` (batched as ``decode_samples`` batches them)."""
    from mmalign.data.collate import collate
    from mmalign.inference.decode import features_for, length_sorted_batches

    features, out = features_for(model), [""] * len(samples)
    for indices in length_sorted_batches(samples, 240.0, 16):
        batch = collate([samples[i] for i in indices], features)
        for i, text in zip(indices, model.ctc_transcribe(batch), strict=True):
            out[i] = text
    return out


def word_coverage(corpus: Path) -> dict[str, dict[str, float]]:
    """Per held-out split, the share of its words (after the English normaliser) that the
    training transcripts never hold, or hold fewer than 3 times: words a model cannot have
    learnt to spell from this corpus, a floor under any arm's WER."""
    from collections import Counter

    from mmalign.eval.metrics import normalize

    def words(split: str) -> list[str]:
        lines = (corpus / "corpus" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        return [w for t in normalize([json.loads(x)["text"] for x in lines]) for w in t.split()]

    seen = Counter(words("train"))
    out = {}
    for split in SPLITS:
        held = words(split)
        out[split] = {
            "unseen": round(100 * sum(seen[w] == 0 for w in held) / len(held), 1),
            "under_3": round(100 * sum(seen[w] < 3 for w in held) / len(held), 1),
        }
    return out


def reached(rows: list[dict[str, Any]], split: str) -> dict[str, Any]:
    """Steps and training minutes at which ``split`` WER first falls to each target."""
    out = {}
    for target in TARGETS:
        hit = next((r for r in rows if r["wer"].get(split, math.inf) <= target), None)
        out[str(target)] = (
            {"step": hit["step"], "minutes": round(hit["train_minutes"], 1)} if hit else None
        )
    return out


def table(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"{s['steps']} steps, WER (%) after Whisper's English normaliser on the first "
        f"{s['eval_n']} utterances of each split, every {s['every']} steps; training minutes on "
        f"{result['environment']['cpus']} CPU cores (validation off). test: unseen sentences and "
        "voices; test_synth: unseen sentences, festival (a synthesiser never heard in training).",
        "",
        "| arm | overrides | test WER 50% at | 30% at | 15% at | final val | final test "
        "| final test_synth | minutes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, arm in result["arms"].items():
        rows = arm["rows"]
        last = rows[-1]

        def at(hit: dict | None) -> str:
            return f"step {hit['step']} ({hit['minutes']} min)" if hit else "not reached"

        reach = arm["reached"]["test"]
        overrides = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in arm["overrides"].items())
        lines.append(
            f"| {name} | {overrides or '(config as shipped)'} | {at(reach['50'])} | "
            f"{at(reach['30'])} | {at(reach['15'])} | "
            + " | ".join(f"{last['wer'].get(k, math.nan):.1f}" for k in SPLITS)
            + f" | {last['train_minutes']:.1f} |"
        )
    if "coverage" in result:
        cov = ", ".join(
            f"{k} {v['unseen']}% unseen, {v['under_3']}% seen under 3 times"
            for k, v in result["coverage"].items()
        )
        lines += ["", f"Held-out words never or rarely in the training transcripts: {cov}."]
    lines += ["", "Test WER (%) at each checkpoint:", ""]
    steps = sorted({r["step"] for a in result["arms"].values() for r in a["rows"]})
    lines.append("| arm | " + " | ".join(str(s) for s in steps) + " |")
    lines.append("|---|" + "---|" * len(steps))
    for name, arm in result["arms"].items():
        for label, key in ((name, "wer"), (f"{name}, CTC head alone", "ctc_wer")):
            by = {r["step"]: r[key]["test"] for r in arm["rows"] if "test" in r.get(key, {})}
            if by:
                cells = " | ".join(f"{by[s]:.1f}" if s in by else "" for s in steps)
                lines.append(f"| {label} | {cells} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, split in zip(axes, ("test", "test_synth"), strict=True):
        for name, arm in result["arms"].items():
            rows = [r for r in arm["rows"] if split in r["wer"]]
            ax.plot([r["step"] for r in rows], [r["wer"][split] for r in rows], marker="o",
                    label=name)  # fmt: skip
        for target in TARGETS:
            ax.axhline(target, ls=":", c="grey", lw=0.8)
        ax.set_xlabel("optimizer step")
        ax.set_title(
            {"test": "unseen sentences and voices", "test_synth": "unseen synthesiser"}[split]
        )
        ax.set_ylim(0, 120)
    axes[0].set_ylabel("WER % (English normaliser)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=ROOT / "runs/sent", help="synth + shards")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--every", type=int, default=100, help="checkpoint and score interval")
    parser.add_argument("--eval-n", type=int, default=100, help="utterances scored per split")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs/convergence")
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/convergence.json")
    parser.add_argument("--print", type=Path, help="only re-print the table of a results JSON")
    args = parser.parse_args()
    if args.print:
        print(table(json.loads(args.print.read_text())))
        return
    torch.set_num_threads(os.cpu_count() or 1)
    from mmalign.quiet import silence

    silence()
    settings = {"steps": args.steps, "every": args.every, "eval_n": args.eval_n,
                "config": str(CONFIG.relative_to(ROOT))}  # fmt: skip
    for name in args.arms:
        rows = score(name, train(name, args), args)
        result = json.loads(args.json.read_text()) if args.json.is_file() else {"arms": {}}
        if result.get("settings", settings) != settings:
            raise SystemExit(f"{args.json} holds arms run with {result['settings']}; use --json")
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=ROOT).stdout.strip()  # fmt: skip
        result["settings"] = settings
        result["coverage"] = word_coverage(args.corpus)
        result["arms"][name] = {
            "overrides": ARMS[name],
            "rows": rows,
            "reached": {s: reached(rows, s) for s in SPLITS},
            "date": time.strftime("%Y-%m-%d"),
            "commit": commit,
        }
        result["command"] = "python bench/convergence.py " + " ".join(sys.argv[1:])
        result["date"] = time.strftime("%Y-%m-%d")
        result["environment"] = {"python": platform.python_version(), "torch": torch.__version__,
                                 "cpus": os.cpu_count(), "machine": platform.machine()}  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        plot(result, args.json.with_suffix(".png"))
    print(table(json.loads(args.json.read_text())))
    print(f"wrote {args.json} and {args.json.with_suffix('.png')}")


if __name__ == "__main__":
    main()
