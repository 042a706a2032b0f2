"""GPU benchmark at real sizes: bf16 training throughput, model FLOPs utilisation, transcription.

    python bench/gpu_train.py                        # one CUDA GPU: 2 encoders x 2 LLMs
    python bench/gpu_train.py --encoders whisper-small --llms qwen2.5-0.5b --steps 20
    python bench/gpu_train.py --device cpu --tiny    # code-path smoke run on CPU (not a result)

Random-initialised models from the released models' configs written below, nothing downloaded:
Whisper-small and Whisper-medium encoders (frozen) -> stack x4 + MLP projector (trainable) ->
Qwen2.5-0.5B- and Llama-3.2-1B-shaped LLMs (frozen, bf16, SDPA) with LoRA r=16 on q/k/v/o
(trainable); AdamW on the trainable parts, gradient clipping at 1.0, bf16 autocast. Utterances
are 1-15 s (log-normal, median 6 s, like LibriSpeech) with transcripts of about 2.7 words a
second; training batches are cut as mmalign's defaults cut them (sorted by duration within
200 utterances, at most ``--batch-seconds`` of padded audio, Whisper on the batch's window) and
hand the step log-mel in pinned memory, copied without blocking, as DataLoader workers would.

Reported for every encoder x LLM pair:

- training samples/s and audio s/s, and peak GPU memory (``torch.cuda.max_memory_allocated``);
- model FLOPs utilisation (MFU) of the training step: analytic FLOPs per step / step time / the
  GPU's dense bf16 peak (looked up from its name: H100/H200 SXM 989 TFLOP/s; ``--peak-tflops``
  overrides). FLOPs, P being parameter counts, every matrix product counting 2 FLOPs per
  weight per position:

  * encoder (frozen, forward only): ``2 x P_conv1 x mel frames + 2 x (P_enc - P_conv1 -
    positions) x encoder frames``, plus attention ``4 x layers x width x T^2`` per clip;
  * projector (trainable; its input needs no gradient): forward 2 + weight gradients 2 =
    ``4 x P_proj x projector rows``;
  * LLM frozen weights: forward 2 + backward 2 (activation gradients flow through every frozen
    layer down to the audio embeddings; frozen weights get no weight gradient) = ``4 x P_llm x
    tokens``; the tied output layer runs only at target positions: ``4 x vocab x width x
    targets``; LoRA (trainable): forward 2 + activation gradients 2 + weight gradients 2 =
    ``6 x P_lora x tokens``; causal attention ``2 x layers x width x L^2`` per row forward
    (half the score matrix) and twice that backward;
  * ``mfu`` counts valid frames and tokens only (the useful work); ``mfu_padded`` counts the
    padded shapes the kernels ran (full attention matrices), so the gap is padding.

- batched greedy transcription audio s/s, end to end from 16 kHz waveforms as ``mmalign
  transcribe`` runs it: utterances sorted by duration, batches of at most ``--decode-batch-size``
  utterances and 240 s padded audio, log-mel on the CPU (``mmalign.data.collate``), then
  ``SpeechLLM.generate`` (left-padded, greedy, KV cache). A random LLM never emits EOS, so each
  batch is made to generate exactly its longest reference transcript's token count
  (``min_new_tokens = max_new_tokens``): what a trained model reading the references would take.

Runs with only what the lent GPU machines have (torch, transformers, peft, tokenizers, numpy):
the mmalign modules imported here pull in neither webdataset, soundfile, jiwer nor open_clip, and
the repository root is put on ``sys.path``, so ``python bench/gpu_train.py`` works from a plain
checkout without installing mmalign.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the GPU machine runs a copy of the tree, mmalign not installed
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "gpu_train.json"

WHISPER = {  # transformers WhisperConfig fields of the released models' encoders
    "whisper-small": dict(d_model=768, encoder_layers=12, encoder_attention_heads=12,
                          encoder_ffn_dim=3072),
    "whisper-medium": dict(d_model=1024, encoder_layers=24, encoder_attention_heads=16,
                           encoder_ffn_dim=4096),
    "tiny": dict(d_model=64, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=128),
}  # fmt: skip
LLMS = {  # AutoConfig.for_model kwargs of the released models
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, max_position_embeddings=32768),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64, vocab_size=128256, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, max_position_embeddings=131072,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                          "factor": 32.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}),
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=2048),
}  # fmt: skip
ENCODERS = ("whisper-small", "whisper-medium")
LLM_NAMES = ("qwen2.5-0.5b", "llama-3.2-1b")
RATE = 4
# dense bf16 tensor-core peaks (datasheets); the first name contained in the device's wins
PEAK_BF16 = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("GH200", 989e12),
    ("H100", 989e12),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
]
SAMPLE_RATE = 16000
TINY = dict(
    batch_seconds=30.0,
    steps=2,
    warmup=1,
    decode_utterances=4,
    decode_batch_size=2,
    max_seconds=4.0,
)


# --------------------------------------------------------------------------- data


def words() -> list[str]:
    from mmalign.data.synthetic.espeak import SENTENCES

    return [w.strip(".,;:!?\"'").lower() for w in " ".join(SENTENCES).split()]


def utterances(n: int, rng: random.Random, max_seconds: float) -> list[dict[str, Any]]:
    """``n`` LibriSpeech-like utterances: duration (log-normal, median 6 s, 1 to
    ``max_seconds``) and a transcript of about 2.7 words a second."""
    vocab = words()
    out = []
    for _ in range(n):
        while True:
            s = rng.lognormvariate(math.log(6.0), 0.6)
            if 1.0 <= s <= max_seconds:
                break
        start = rng.randrange(len(vocab))
        count = max(1, round(2.7 * s))
        text = " ".join(vocab[(start + k) % len(vocab)] for k in range(count))
        out.append({"duration": s, "text": text})
    return out


def training_batches(args: argparse.Namespace, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` batches as mmalign's data module makes them (buffers of 200 sorted by duration, cut
    at ``--batch-seconds``, batch order shuffled), with random log-mel in pinned memory."""
    from mmalign.data.batching import pack_sorted

    rng = random.Random(seed)
    batches: list[list[dict[str, Any]]] = []
    while len(batches) < n:
        buffer = sorted(utterances(200, rng, args.max_seconds), key=lambda u: u["duration"])
        cut = pack_sorted(buffer, args.batch_seconds, None)
        rng.shuffle(cut)
        batches += cut
    pin = args.device.startswith("cuda")
    out = []
    for utts in batches[:n]:
        frames = torch.tensor([math.ceil(u["duration"] * 100) for u in utts])
        t = int(frames.max()) + int(frames.max()) % 2
        feats = torch.randn(len(utts), 80, t)
        out.append(
            {
                "audio_features": feats.pin_memory() if pin else feats,
                "audio_lengths": frames,
                "texts": [u["text"] for u in utts],
                "task": ["asr"] * len(utts),
                "durations": torch.tensor([u["duration"] for u in utts]),
            }
        )
    return out


def waveform(seconds: float, gen: torch.Generator) -> torch.Tensor:
    """Amplitude-modulated noise at 16 kHz (speech-like energy envelope)."""
    t = torch.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    rate = 2 + 4 * torch.rand(1, generator=gen)
    envelope = 0.55 + 0.45 * torch.sin(2 * math.pi * rate * t)
    return 0.1 * envelope * torch.randn(t.numel(), generator=gen)


# --------------------------------------------------------------------------- model


def tokenizer_dir() -> str:
    """A byte-level BPE with a ChatML template, trained on the word list (token ids only
    matter for cost; whole words become single tokens, as in the real 128-152k vocabularies)."""
    from mmalign.llm.tokenizer import train_chatml_tokenizer

    text = " ".join(words())
    texts = [text, "Transcribe the speech: user assistant system"] * 20
    out = tempfile.mkdtemp(prefix="gpu_bench_tok_")
    return str(train_chatml_tokenizer(texts, out, vocab_size=2048))


def build(encoder_name: str, llm_name: str, args: argparse.Namespace, tok: str) -> Any:
    """The SpeechLLM, built directly on the device (random init of a 1B model on the CPU is
    slow); frozen weights in bf16, trainable ones in fp32 (bf16 autocast)."""
    from peft import LoraConfig

    from mmalign.encoders.whisper import WhisperEncoder
    from mmalign.llm.load import CausalLM
    from mmalign.model import SpeechLLM
    from mmalign.projectors.mlp import MLPProjector

    torch.manual_seed(0)
    config = dict(num_mel_bins=80, max_source_positions=1500, **WHISPER[encoder_name])
    adapter = LoraConfig(
        r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    with torch.device(args.device):
        encoder = WhisperEncoder("random", config=config, dtype="bfloat16")
        llm = CausalLM(
            "random",
            adapter=adapter,
            tokenizer=tok,
            config=LLMS[llm_name],
            dtype="bfloat16",
            attn_implementation=args.attn,
            compile=args.compile,
        )
        projector = MLPProjector(encoder.dim, llm.hidden_size, rate=RATE, hidden_dim=2048)
        model = SpeechLLM(encoder, projector, llm, system_prompt="")
    return model.to(args.device)


# --------------------------------------------------------------------------- FLOPs


def parameter_counts(model: Any) -> dict[str, int]:
    """Parameter counts the FLOP formulas use (see the module docstring)."""
    enc = model.encoder.model
    base = model.llm.model
    embed = base.get_input_embeddings().weight
    lora = sum(p.numel() for n, p in base.named_parameters() if "lora_" in n)
    llm_all = sum(p.numel() for p in base.parameters())
    out_emb = base.get_output_embeddings()
    untied_head = 0 if out_emb is None or out_emb.weight is embed else out_emb.weight.numel()
    lcfg = base.config
    head_dim = getattr(lcfg, "head_dim", None) or lcfg.hidden_size // lcfg.num_attention_heads
    return {
        "encoder": sum(p.numel() for p in enc.parameters()),
        "encoder_conv1": sum(p.numel() for p in enc.conv1.parameters()),
        "encoder_positions": enc.embed_positions.weight.numel(),
        "encoder_layers": enc.config.encoder_layers,
        "encoder_width": enc.config.d_model,
        "projector": sum(p.numel() for p in model.projector.parameters()),
        "llm_frozen_body": llm_all - lora - embed.numel() - untied_head,
        "llm_lora": lora,
        "llm_vocab": embed.shape[0],
        "llm_width": embed.shape[1],
        "llm_layers": lcfg.num_hidden_layers,
        "llm_attention_width": lcfg.num_attention_heads * head_dim,
    }


def step_flops(p: dict[str, int], shape: dict[str, Any], padded: bool) -> float:
    """FLOPs of one training step (formulas in the module docstring). ``shape``: ``mel``
    (valid mel frames per clip) and ``mel_window`` (the batch's mel frames), ``llm`` (valid LLM
    tokens per row) and ``llm_row`` (the padded row length), ``targets`` (valid target
    positions) and ``logit_rows`` (positions the output layer ran at). ``padded`` counts the
    padded shapes (full attention matrices) instead of the valid ones (causal half)."""
    mel = [shape["mel_window"]] * len(shape["mel"]) if padded else shape["mel"]
    enc = [(m + 1) // 2 for m in mel]
    rows = [math.ceil(t / RATE) for t in enc]
    body = p["encoder"] - p["encoder_conv1"] - p["encoder_positions"]
    flops = sum(2 * p["encoder_conv1"] * m + 2 * body * t for m, t in zip(mel, enc, strict=True))
    flops += sum(4 * p["encoder_layers"] * p["encoder_width"] * t * t for t in enc)
    flops += 4 * p["projector"] * sum(rows)
    llm = [shape["llm_row"]] * len(shape["llm"]) if padded else shape["llm"]
    flops += (4 * p["llm_frozen_body"] + 6 * p["llm_lora"]) * sum(llm)
    positions = shape["logit_rows"] if padded else shape["targets"]
    flops += 4 * p["llm_vocab"] * p["llm_width"] * positions
    causal = 1.0 if padded else 0.5  # masked SDPA computes the whole matrix
    attention = sum(4 * causal * p["llm_layers"] * p["llm_attention_width"] * n * n for n in llm)
    return flops + 3 * attention  # backward: twice the forward


class LLMShapes:
    """Records the LLM's padded shape and valid tokens (decoder body) and the rows its output
    layer projects (forward hooks): mmalign projects only the labelled positions."""

    def __init__(self, llm: torch.nn.Module) -> None:
        self.last: dict[str, Any] = {}
        base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
        self.handles = [
            base.get_decoder().register_forward_pre_hook(self._body, with_kwargs=True),
            base.get_output_embeddings().register_forward_hook(self._head),
        ]

    def _body(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None or mask.dim() != 2:
            return
        self.last.update(llm=mask.sum(1).tolist(), llm_row=int(mask.shape[1]))

    def _head(self, module: Any, args: Any, out: torch.Tensor) -> None:
        self.last["logit_rows"] = out.numel() // out.shape[-1]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# --------------------------------------------------------------------------- one pair


def peak_flops(name: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    return next((v for k, v in PEAK_BF16 if k in name), None)


def run_pair(encoder_name: str, llm_name: str, args: argparse.Namespace, tok: str) -> dict:
    from mmalign.data.batching import pack_sorted
    from mmalign.data.collate import collate
    from mmalign.data.features import WhisperFeatures

    device, cuda = args.device, args.device.startswith("cuda")
    model = build(encoder_name, llm_name, args, tok)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    counts = parameter_counts(model)
    shapes = LLMShapes(model.llm.model)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    amp = torch.autocast(device.split(":")[0], dtype=torch.bfloat16)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    batches = training_batches(args, args.warmup + args.steps, seed=1)
    useful = padded = samples = audio = elapsed = 0.0
    tokens = valid_tokens = 0
    for i, cpu_batch in enumerate(batches):
        sync()
        t0 = time.perf_counter()
        batch = {
            k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in cpu_batch.items()
        }
        with amp:
            loss = model(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if i < args.warmup:
            continue
        elapsed += time.perf_counter() - t0
        n = len(cpu_batch["texts"])
        samples += n
        audio += float(cpu_batch["durations"].sum())
        shape = {
            **shapes.last,
            "mel": cpu_batch["audio_lengths"].tolist(),
            "mel_window": int(cpu_batch["audio_features"].shape[-1]),
            "targets": sum(len(model.prompt.target(t)) for t in cpu_batch["texts"]),
        }
        useful += step_flops(counts, shape, padded=False)
        padded += step_flops(counts, shape, padded=True)
        tokens += shape["llm_row"] * n
        valid_tokens += sum(shape["llm"])
    shapes.remove()
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    name = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    peak = peak_flops(name, args.peak_tflops)

    # batched greedy transcription, end to end from waveforms
    model.eval()
    gen = torch.Generator().manual_seed(2)
    utts = utterances(args.decode_utterances, random.Random(2), args.max_seconds)
    for u in utts:
        u["audio"] = waveform(u["duration"], gen)
    features = WhisperFeatures()
    groups = pack_sorted(sorted(utts, key=lambda u: -u["duration"]), 240.0, args.decode_batch_size)
    new_tokens = 0
    t0 = 0.0
    for k, group in enumerate([groups[0], *groups]):  # the first batch once more, untimed
        if k == 1:
            sync()
            t0 = time.perf_counter()
        batch = collate(group, features)
        batch = {key: v.to(device) if torch.is_tensor(v) else v for key, v in batch.items()}
        n = max(len(model.prompt.target(u["text"])) for u in group)
        with amp:
            model.generate(batch, max_new_tokens=n, min_new_tokens=n)
        if k:
            new_tokens += n * len(group)
    sync()
    decode_wall = time.perf_counter() - t0
    decode_audio = sum(u["duration"] for u in utts)
    return {
        "encoder": encoder_name,
        "llm": llm_name,
        "parameters": counts,
        "trainable_parameters": sum(p.numel() for p in params),
        "steps": args.steps,
        "train_samples": samples,
        "train_samples_per_second": samples / elapsed,
        "train_audio_seconds_per_second": audio / elapsed,
        "step_seconds": elapsed / args.steps,
        "llm_padding_efficiency": valid_tokens / max(1, tokens),
        "achieved_tflops": useful / elapsed / 1e12,
        "achieved_tflops_padded": padded / elapsed / 1e12,
        "peak_tflops": None if peak is None else peak / 1e12,
        "mfu": None if peak is None else useful / elapsed / peak,
        "mfu_padded": None if peak is None else padded / elapsed / peak,
        "peak_memory_gib": peak_mem,
        "loss_last": float(loss.detach()),
        "transcribe_utterances": len(utts),
        "transcribe_audio_seconds": decode_audio,
        "transcribe_wall_seconds": decode_wall,
        "transcribe_audio_seconds_per_second": decode_audio / decode_wall,
        "transcribe_tokens_per_second": new_tokens / decode_wall,
        "device_name": name,
    }


# --------------------------------------------------------------------------- report


def table(result: dict[str, Any]) -> str:
    """The report printed after a run (``bench/perf_doc.py`` renders it too)."""
    st = result["settings"]
    lines = [
        f"bf16 training (batches <= {st['batch_seconds']:.0f} s padded audio, {st['steps']} "
        f"steps after {st['warmup']} warm-up) and batched greedy transcription (batches of "
        f"<= {st['decode_batch_size']}) on {result['device_name']}, {result['date']}",
        "",
        "| encoder | LLM | train samples/s | train audio s/s | TFLOP/s | MFU | MFU padded | "
        "peak GiB | transcribe audio s/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        mfu_p = "n/a" if r["mfu_padded"] is None else f"{r['mfu_padded']:.1%}"
        mem = "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
        lines.append(
            f"| {r['encoder']} | {r['llm']} | {r['train_samples_per_second']:.1f} | "
            f"{r['train_audio_seconds_per_second']:.0f} | {r['achieved_tflops']:.1f} | {mfu} | "
            f"{mfu_p} | {mem} | {r['transcribe_audio_seconds_per_second']:.0f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny configs: a CPU smoke run")
    parser.add_argument("--encoders", nargs="+", choices=ENCODERS, default=list(ENCODERS))
    parser.add_argument("--llms", nargs="+", choices=LLM_NAMES, default=list(LLM_NAMES))
    parser.add_argument("--batch-seconds", type=float, default=240.0, help="padded audio/batch")
    parser.add_argument("--max-seconds", type=float, default=15.0, help="longest utterance")
    parser.add_argument("--steps", type=int, default=10, help="measured training steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--decode-utterances", type=int, default=256)
    parser.add_argument("--decode-batch-size", type=int, default=16, help="as mmalign evaluate")
    parser.add_argument("--attn", default="sdpa", help="sdpa, eager or flash_attention_2")
    parser.add_argument("--compile", action="store_true", help="torch.compile the LLM layers")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak")
    parser.add_argument("--json", type=Path, help=f"results (default {RESULTS.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(
            "bench/gpu_train.py needs a CUDA GPU (torch sees none); for a CPU smoke run of its "
            "code path: python bench/gpu_train.py --device cpu --tiny"
        )
    if not args.device.startswith("cuda") and not args.tiny:
        raise SystemExit("real-size models need a CUDA GPU; on the CPU add --tiny")
    if not args.device.startswith("cuda"):
        torch.set_num_threads(1)  # a smoke run; a busy small machine is slower with more
    pairs = [("tiny", "tiny")] if args.tiny else [(e, m) for e in args.encoders for m in args.llms]
    tok = tokenizer_dir()
    rows = []
    for encoder_name, llm_name in pairs:
        rows.append(run_pair(encoder_name, llm_name, args, tok))
        print(
            f"{encoder_name} + {llm_name}: {rows[-1]['train_samples_per_second']:.1f} samples/s",
            flush=True,
        )
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    import peft
    import transformers

    result = {
        "benchmark": "gpu_train",
        "command": "python bench/gpu_train.py" + "".join(f" {a}" for a in argv),
        "date": time.strftime("%Y-%m-%d"),
        "device": args.device,
        "device_name": rows[0]["device_name"],
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "cpus": os.cpu_count(),
        },
        "rows": rows,
    }
    print(table(result))
    out = args.json or (ROOT / "runs" / "bench_gpu_train" / "tiny.json" if args.tiny else RESULTS)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}" + (" (a smoke run, not a result)" if args.tiny else ""))


if __name__ == "__main__":
    main()
