"""ASR-only against audio-visual (AVSR) under babble noise: same data, same steps, one run.

    python bench/avsr_noise.py                       # 300 steps each, 200 test utterances
    python bench/avsr_noise.py --steps 150 --test-utts 100

The published finding to check (Llama-AVSR, Auto-AVSR): a model that also sees the lips
degrades less as noise rises. Corpus: the synthetic lips corpus (``mmalign synth --video true``:
espeak-ng digit strings with a rendered mouth video carrying the phoneme timings; test voices
held out), made and sharded under runs/bench_avsr on first use. Both models are
configs/demo/avsr_whisper-tiny+vit-lips_smollm2-135m.yaml built in code: real Whisper tiny.en
(frozen, stack x4 + MLP) and SmolLM2-135M-Instruct (frozen, LoRA r=8 on q/v); the AVSR model adds
a small ViT video tower trained from scratch (stack x2 + MLP). Both train on the same batches
(same seed) with the same babble augmentation (SNR drawn per sample from clean/10/5/0/-5 dB;
babble = 3 other utterances of the batch), then are scored on the test set at clean, 10, 5, 0 and
-5 dB babble (3 other test utterances, seeded; the same noise for both models) with WER per
digit (normaliser ``basic``). The AVSR model is also scored reading lips only (``vsr``, clean).
Writes a table, JSON and a PNG plot. bf16-mixed on CPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from peft import LoraConfig

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "bench_avsr"  # bench-owned (git-ignored): corpus, shards, runs
SNRS: list[float | None] = [None, 10.0, 5.0, 0.0, -5.0]
VIT = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 44, "patch_size": 11, "width": 128, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


def corpus(args: argparse.Namespace) -> dict[str, Path]:
    """Synthesise and shard the lips corpus once; split -> shard folder."""
    from mmalign.data.shards import prepare
    from mmalign.data.synthetic.lips import synthesize_av

    raw = WORK / "corpus"
    if not (raw / "test.jsonl").is_file():
        t0 = time.perf_counter()
        synthesize_av(raw, kind="digits", n_train=args.train_utts, n_val=16,
                      n_test=args.test_utts, seed=0, jobs=os.cpu_count() or 2)  # fmt: skip
        print(f"synthesised the corpus in {time.perf_counter() - t0:.0f} s", flush=True)
    shards = {}
    for split in ("train", "test"):
        out = WORK / "shards" / split
        if not (out / "index.json").is_file():
            if not prepare(raw / f"{split}.jsonl", out, progress=False).ok:
                raise SystemExit(f"could not prepare {raw / split}.jsonl")
        shards[split] = out
    return shards


def build(video: bool, modality_dropout: float):
    from mmalign.encoders.clip_video import CLIPVideoEncoder
    from mmalign.encoders.whisper import WhisperEncoder
    from mmalign.lightning_modules.alignment import AlignmentModule
    from mmalign.lightning_modules.schedules import WarmupCosine
    from mmalign.llm.load import CausalLM
    from mmalign.projectors.mlp import MLPProjector

    L.seed_everything(0, verbose=False)
    adapter = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])
    extra: dict[str, Any] = {}
    if video:
        extra = {
            "video_encoder": CLIPVideoEncoder("vit-lips", config=VIT, freeze=False),
            "video_projector": functools.partial(MLPProjector, rate=2, hidden_dim=1024),
        }
        if modality_dropout > 0:
            extra["modality_dropout"] = {"asr": modality_dropout, "vsr": modality_dropout}
    return AlignmentModule(
        WhisperEncoder(source="pinned:whisper-tiny.en"),
        functools.partial(MLPProjector, rate=4, mode="stack", hidden_dim=1024),
        CausalLM("pinned:smollm2-135m-instruct", adapter=adapter),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.01),
        scheduler=functools.partial(WarmupCosine, warmup_steps=30),
        normalizer="basic",
        system_prompt="",
        log_examples=0,
        **extra,
    )


def train(name: str, module, task: str, shards: dict[str, Path], args) -> dict[str, Any]:
    from mmalign.data.datamodule import ShardDataModule

    dm = ShardDataModule(
        train=str(shards["train"]),
        max_batch_seconds=args.batch_seconds,
        max_batch_size=args.batch_size,
        shuffle_buffer=200,
        seed=0,
        task=task,
        require_video=True,
        video_crop=88,
        video_flip=0.5,
        video_time_masks=1,
        video_time_mask_frames=5,
        noise_snrs=SNRS,
        noise_source="babble",
    )
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
        default_root_dir=str(WORK / "runs" / name),
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - t0
    print(f"{name}: {trainer.global_step} steps in {seconds:.0f} s", flush=True)
    return {
        "steps": trainer.global_step,
        "fit_seconds": seconds,
        "trainable_parameters": module.num_trainable_parameters(),
        "skipped": dm.skipped,
    }


def score(name: str, module, task: str, snrs: list, test: Path, args) -> dict[str, float]:
    """WER (%) per SNR ("clean" or dB) of ``module`` decoding ``test`` as ``task``."""
    from mmalign.eval.evaluate import evaluate
    from mmalign.inference.decode import DecodeOptions

    result = evaluate(
        module.model,
        test,
        WORK / "eval" / f"{name}-{task}",
        normalizer="basic",
        snrs=snrs,
        noise="babble" if any(s is not None for s in snrs) else None,
        babble_speakers=3,
        seed=0,
        as_tasks=[task],
        options=DecodeOptions(batch_size=16, batch_seconds=60.0, video_crop=88),
        progress=False,
    )
    return {
        ("clean" if r["snr"] is None else f"{r['snr']:g}"): 100 * r["wer"]
        for r in result.metrics["results"]
    }


def table(result: dict[str, Any]) -> str:
    st, wer = result["settings"], result["wer"]
    conds = list(wer["asr"])
    head = " | ".join(f"{c} dB" if c != "clean" else "clean" for c in conds)
    lines = [
        f"WER % (per digit) on {st['test_utts']} held-out-voice test utterances of the synthetic "
        f"lips corpus, babble noise; {st['steps']} training steps each; AVSR modality dropout "
        f"{st.get('modality_dropout', 0.0):g} per asr/vsr",
        "",
        f"| model | {head} |",
        "|---|" + "---:|" * len(conds),
        "| ASR-only (audio) | " + " | ".join(f"{wer['asr'][c]:.1f}" for c in conds) + " |",
        "| AVSR (audio + lips) | " + " | ".join(f"{wer['avsr'][c]:.1f}" for c in conds) + " |",
        "| AVSR - ASR | "
        + " | ".join(f"{wer['avsr'][c] - wer['asr'][c]:+.1f}" for c in conds)
        + " |",
        "",
        f"AVSR model reading lips only (vsr, clean): {wer['vsr']['clean']:.1f}% WER",
        f"degradation clean -> {conds[-1]} dB: ASR {result['degradation']['asr']:+.1f} points, "
        f"AVSR {result['degradation']['avsr']:+.1f} points; bench wall "
        f"{result['total_seconds']:.0f} s",
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = list(result["wer"]["asr"])
    x = range(len(conds))
    fig, ax = plt.subplots(figsize=(6, 4))
    for task, label in (("asr", "ASR-only (audio)"), ("avsr", "AVSR (audio + lips)")):
        ax.plot(x, [result["wer"][task][c] for c in conds], marker="o", label=label)
    ax.axhline(result["wer"]["vsr"]["clean"], ls="--", c="grey", label="VSR (lips only)")
    ax.set_xticks(list(x), [c if c == "clean" else f"{c} dB" for c in conds])
    ax.set_xlabel("babble SNR")
    ax.set_ylabel("WER % (per digit)")
    ax.set_title("Synthetic lips corpus: noise robustness")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--train-utts", type=int, default=2000)
    parser.add_argument("--test-utts", type=int, default=200)
    parser.add_argument("--batch-seconds", type=float, default=20.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--modality-dropout", type=float, default=0.0, help="per asr/vsr")
    parser.add_argument(
        "--reuse-asr",
        type=Path,
        help="take the ASR-only row from this earlier results JSON (same settings) instead of "
        "training it again",
    )
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/avsr_noise.json")
    parser.add_argument("--print", type=Path, help="only re-print the table of a results JSON")
    args = parser.parse_args()
    if args.print:
        print(table(json.loads(args.print.read_text())))
        return
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    shards = corpus(args)
    runs, wer = {}, {}
    if args.reuse_asr:
        earlier = json.loads(args.reuse_asr.read_text())
        keys = ("steps", "train_utts", "test_utts", "batch_seconds", "batch_size")
        differ = [k for k in keys if earlier["settings"][k] != getattr(args, k)]
        if differ:
            raise SystemExit(f"{args.reuse_asr} was run with other settings: {differ}")
        runs["asr"] = {**earlier["runs"]["asr"], "reused_from": str(args.reuse_asr)}
        wer["asr"] = earlier["wer"]["asr"]
    else:
        asr = build(video=False, modality_dropout=0.0)
        runs["asr"] = train("asr", asr, "asr", shards, args)
        wer["asr"] = score("asr", asr, "asr", SNRS, shards["test"], args)
        del asr
    avsr = build(video=True, modality_dropout=args.modality_dropout)
    runs["avsr"] = train("avsr", avsr, "avsr", shards, args)
    wer["avsr"] = score("avsr", avsr, "avsr", SNRS, shards["test"], args)
    wer["vsr"] = score("avsr", avsr, "vsr", [None], shards["test"], args)
    last = list(wer["asr"])[-1]
    result = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "wer": wer,
        "degradation": {t: wer[t][last] - wer[t]["clean"] for t in ("asr", "avsr")},
        "runs": runs,
        "total_seconds": time.perf_counter() - started,
        "environment": {
            "date": time.strftime("%Y-%m-%d"),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
        },
    }
    print(table(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    png = args.json.with_suffix(".png")
    plot(result, png)
    print(f"wrote {args.json} and {png}")


if __name__ == "__main__":
    main()
