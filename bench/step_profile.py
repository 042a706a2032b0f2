"""Where a training step goes: ``mmalign fit``'s step against a bare loop, and what a step builds.

    python bench/step_profile.py             # both parts (a few minutes on 2 idle cores)
    python bench/step_profile.py --quick     # smoke run (not a result)
    python bench/step_profile.py --print bench/results/step_profile.json

Part 1, the gap. One model, random-initialised from the released configs (nothing downloaded):
Whisper-tiny encoder (frozen) -> stack x4 + MLP projector -> SmolLM2-135M-shaped LLM (frozen,
LoRA r=8 on q/v); one list of batches (``--batch-size`` clips of 2-8 s log-mel, spoken-digit
transcripts), the same in both arms, in the same order; AdamW over the trainable parts, gradient
clipping at 1.0, bf16 autocast, the same torch threads:

- ``fit``: :class:`AlignmentModule` under ``lightning.Trainer``, the code ``mmalign fit`` runs
  (its hooks, logging, non-finite check, token-weighted gradients), the batches handed over as
  they are (no data loading in either arm);
- ``bare``: ``loss = model(batch); loss.backward(); clip; optimizer.step(); zero_grad()`` over the
  same :class:`SpeechLLM`.

The arms alternate, ``--repeats`` times each (bare, fit, bare, fit): a shared 2-core machine has
slow spells of several percent, which should not land on one arm. Step time is pooled over each
arm's steps after ``--warmup`` (batch fetch excluded in both); gap = median fit / median bare - 1.

Part 2, one training step at Whisper-small + Qwen2.5-0.5B shape (its real config with
``--llm-layers`` decoder layers; 2 on CPU) at batch 16, measured three ways in one run:

- bytes of fp32 logits the loss holds, with the vocabulary projection at the labelled
  (row, position) pairs only (mmalign), at the union of labelled positions over the batch
  (``logits_to_keep``: the previous code, and still the path for LLM families that scale their
  logits), and at every position (a plain ``labels=`` forward);
- tensors built from Python data inside the step (``torch.tensor``/``as_tensor``/``asarray``
  calls, counted by a ``TorchFunctionMode``);
- on CUDA, calls that synchronise with the host (``torch.cuda.set_sync_debug_mode``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "step_profile.json"
sys.path.insert(0, str(ROOT / "bench"))

from gpu_train import LLMS  # noqa: E402  (the released models' configs, written once)
from gpu_train import WHISPER as WHISPER_LARGER  # noqa: E402
from matryoshka import StepTimer  # noqa: E402  (wall time from batch start to batch end)
from train_throughput import SMOLLM2_135M, WHISPER  # noqa: E402

ENCODERS = {"tiny": WHISPER["tiny"], "small": WHISPER_LARGER["whisper-small"]}

DIGITS = "zero one two three four five six seven eight nine".split()
FULL = dict(steps=20, warmup=4, batch_size=4, repeats=2, llm_layers=2, profile_batch=16)
QUICK = dict(steps=3, warmup=1, batch_size=2, repeats=1, llm_layers=1, profile_batch=2)


def tokenizer(out: str) -> str:
    from mmalign.llm.prompt import DEFAULT_PROMPTS
    from mmalign.llm.tokenizer import train_chatml_tokenizer

    prompts = [p.format(modality="", target_lang="German") for p in DEFAULT_PROMPTS.values()]
    texts = [" ".join(DIGITS)] * 50 + prompts * 20 + ["user assistant system"] * 4
    return str(train_chatml_tokenizer(texts, out, vocab_size=1024))


def batches(n: int, size: int, seed: int) -> list[dict[str, Any]]:
    """``n`` batches of ``size`` random log-mel clips of 2-8 s with digit transcripts."""
    rng = random.Random(seed)
    out = []
    for b in range(n):
        frames = [rng.randint(200, 800) for _ in range(size)]
        gen = torch.Generator().manual_seed(seed * 1000 + b)
        texts = [" ".join(rng.choice(DIGITS) for _ in range(max(1, f // 40))) for f in frames]
        out.append(
            {
                "audio_features": torch.randn(size, 80, max(frames), generator=gen),
                "audio_lengths": torch.tensor(frames),
                "texts": texts,
                "task": ["asr"] * size,
                "durations": torch.tensor(frames) / 100,
                "keys": [f"b{b}s{i}" for i in range(size)],
            }
        )
    return out


def build(encoder: str, llm: dict[str, Any], tok: str, seed: int = 0) -> Any:
    """The :class:`AlignmentModule` both arms train (the bare arm drives its ``.model``)."""
    from peft import LoraConfig

    from mmalign.encoders.whisper import WhisperEncoder
    from mmalign.lightning_modules.alignment import AlignmentModule
    from mmalign.llm.load import CausalLM
    from mmalign.projectors.mlp import MLPProjector

    torch.manual_seed(seed)
    config = {**ENCODERS[encoder], "num_mel_bins": 80, "max_source_positions": 1500}
    enc = WhisperEncoder("random", config=config)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])
    model = CausalLM("random", adapter=lora, tokenizer=tok, config=llm)
    return AlignmentModule(
        enc,
        functools.partial(MLPProjector, rate=4, mode="stack", hidden_dim=1024),
        model,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-4),
        system_prompt="",
    )


# --------------------------------------------------------------------------- part 1: the gap


def fit_arm(module: Any, data: list[dict[str, Any]], precision: str) -> list[float]:
    import lightning as L
    from torch.utils.data import DataLoader

    # the module has a validation_step; this arm gives it no validation data on purpose
    warnings.filterwarnings("ignore", message="You defined a `validation_step` but have no")
    clock = StepTimer(skip=0)  # the gap pools the steps after --warmup itself
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=len(data),
        precision=precision,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=None))
    return clock.times


def bare_arm(module: Any, data: list[dict[str, Any]], precision: str) -> list[float]:
    model = module.model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for batch in data:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            loss = model(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return times


def gap(args: argparse.Namespace, tok: str) -> dict[str, Any]:
    """Arms alternate (bare, fit, bare, fit, ...) so that a slow spell of a shared machine does
    not land on one arm only; each arm's steps after warm-up are pooled."""
    data = batches(args.steps, args.batch_size, args.seed)
    pooled: dict[str, list[float]] = {"bare": [], "fit": []}
    runs = []
    for _ in range(args.repeats):
        for arm, run in (("bare", bare_arm), ("fit", fit_arm)):
            times = run(build("tiny", SMOLLM2_135M, tok, args.seed), data, args.precision)
            measured = times[args.warmup :]
            pooled[arm] += measured
            runs.append({"arm": arm, "median_s": statistics.median(measured)})
            print(f"  {arm}: median step {runs[-1]['median_s']:.3f} s", flush=True)
    rows = {a: {"median_s": statistics.median(t), "steps": len(t)} for a, t in pooled.items()}
    return {
        "arms": rows,
        "runs": runs,
        "gap": rows["fit"]["median_s"] / rows["bare"]["median_s"] - 1,
    }


# --------------------------------------------------------------------------- part 2: one step


class PythonTensors(TorchFunctionMode):
    """Counts tensors made from Python data (each a host-to-device copy when on a GPU)."""

    FACTORIES = {torch.tensor, torch.as_tensor, torch.asarray}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func in self.FACTORIES:
            self.count += 1
        return func(*args, **(kwargs or {}))


def one_step(model: Any, batch: dict[str, Any], device: str) -> dict[str, Any]:
    """One forward + backward; fp32 bytes of the logits that reached the loss, Python-made
    tensors and (CUDA) synchronising calls."""
    head = model.llm.model.get_base_model().get_output_embeddings()
    logits: list[int] = []
    hook = head.register_forward_hook(lambda m, i, o: logits.append(o.numel() * 4))
    syncs = 0
    counter = PythonTensors()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device.startswith("cuda"):
                torch.cuda.set_sync_debug_mode("warn")
            with counter:
                model(batch).backward()
            if device.startswith("cuda"):
                torch.cuda.set_sync_debug_mode(0)
                torch.cuda.synchronize()
        syncs = sum("synchroniz" in str(w.message) for w in caught)
    finally:
        hook.remove()
    model.zero_grad(set_to_none=True)
    return {
        "logits_bytes": sum(logits),
        "python_tensors": counter.count,
        "sync_calls": syncs if device.startswith("cuda") else None,
    }


def full_logits_bytes(model: Any, batch: dict[str, Any]) -> int:
    """fp32 bytes of logits at every position (a plain ``labels=`` forward)."""
    s = model.splice_batch(batch, train=True)
    return int(
        s.inputs_embeds.shape[0] * s.inputs_embeds.shape[1] * model.llm.model.config.vocab_size * 4
    )


def profile(args: argparse.Namespace, tok: str) -> dict[str, Any]:
    from mmalign.llm import load

    llm = dict(LLMS["qwen2.5-0.5b"], num_hidden_layers=args.llm_layers)
    model = build("small", llm, tok, args.seed).model.to(args.device)
    batch = batches(1, args.profile_batch, args.seed + 1)[0]
    batch = {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    one_step(model, batch, args.device)  # warm-up
    pairs = one_step(model, batch, args.device)
    families = load.PLAIN_HEAD_FAMILIES
    load.PLAIN_HEAD_FAMILIES = ()  # the logits_to_keep path: the union of labelled positions
    try:
        union = one_step(model, batch, args.device)
    finally:
        load.PLAIN_HEAD_FAMILIES = families
    return {
        "batch": args.profile_batch,
        "target_tokens": model.target_tokens(batch),
        "llm_layers": args.llm_layers,
        "pairs": pairs,
        "union": union,
        "full_logits_bytes": full_logits_bytes(model, batch),
    }


# --------------------------------------------------------------------------- report


def table(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [f"step_profile ({result['date']}, {env['device']}, {env['threads']} threads)"]
    if "gap" in result:
        g = result["gap"]
        lines += ["| arm | median step s |", "|---|---:|"]
        lines += [f"| {r['arm']} | {r['median_s']:.3f} |" for r in g.get("runs", [])]
        lines += [f"| {a}, pooled | {r['median_s']:.3f} |" for a, r in g["arms"].items()]
        lines += [f"gap fit / bare - 1: {100 * g['gap']:+.1f}%", ""]
    if "profile" in result:
        p = result["profile"]
        mb = 1 / 2**20
        lines += [
            f"one step, batch {p['batch']}, {p['target_tokens']} target tokens:",
            "| logits at | fp32 MB | tensors from Python | sync calls |",
            "|---|---:|---:|---:|",
        ]
        for name in ("pairs", "union"):
            r = p[name]
            sync = "n/a" if r["sync_calls"] is None else str(r["sync_calls"])
            lines.append(
                f"| {name} | {r['logits_bytes'] * mb:.0f} | {r['python_tensors']} | {sync} |"
            )
        lines.append(f"| every position | {p['full_logits_bytes'] * mb:.0f} | | |")
    return "\n".join(lines)


def mmalign_version() -> str:
    """The commit of the mmalign that was measured (a "before" run imports another checkout)."""
    import subprocess

    import mmalign

    where = Path(mmalign.__file__).resolve().parent
    out = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=where, capture_output=True, text=True
    )
    return f"{where} at {out.stdout.strip() or 'unknown commit'}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--parts", nargs="+", default=["gap", "profile"], choices=["gap", "profile"]
    )
    parser.add_argument("--steps", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--repeats", type=int, help="bare/fit pairs, alternated")
    parser.add_argument("--llm-layers", type=int)
    parser.add_argument("--profile-batch", type=int)
    parser.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "32-true"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--print", type=Path)
    args = parser.parse_args(argv)
    if args.print:
        print(table(json.loads(args.print.read_text())))
        return
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    torch.set_num_threads(args.threads)
    try:
        from mmalign.quiet import silence
    except ImportError:  # an older checkout on PYTHONPATH (a "before" run of --parts gap)
        silence = None
    if silence is not None:
        silence()
    tok = tokenizer(tempfile.mkdtemp(prefix="bench_step_tok_"))
    cuda = args.device.startswith("cuda")
    result: dict[str, Any] = {
        "benchmark": "step_profile",
        "date": time.strftime("%Y-%m-%d"),
        "environment": {
            "device": args.device,
            "device_name": torch.cuda.get_device_name() if cuda else None,
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
            "load_average_1min": os.getloadavg()[0],
        },
        "mmalign": mmalign_version(),
        "command": "python bench/step_profile.py " + " ".join(argv or sys.argv[1:]),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    if "gap" in args.parts:
        print("part 1: fit against a bare loop", flush=True)
        result["gap"] = gap(args, tok)
    if "profile" in args.parts:
        print("part 2: one step at Whisper-small + Qwen2.5-0.5B shape", flush=True)
        result["profile"] = profile(args, tok)
    print(table(result))
    if not args.quick:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
