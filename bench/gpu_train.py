"""GPU benchmark at real sizes: bf16 training throughput, model FLOPs utilisation, transcription.

    python bench/gpu_train.py                          # on a CUDA GPU: 2 model pairs
    python bench/gpu_train.py --device cpu --tiny      # code-path smoke run on CPU

Random-initialised models from real configs written below (nothing downloaded): Whisper-small and
Whisper-medium encoders (frozen) -> stack x4 + MLP projector -> Qwen2.5-0.5B- and Llama-3.2-1B-
shaped LLMs (frozen, bf16 weights) with LoRA r=16 on q/k/v/o; AdamW on the trainable parts, bf16
autocast. Batches are synthetic log-mel of 2-15 s utterances (uniform) with 12-word transcripts and
a byte-level BPE tokenizer trained on the fly (token ids only matter for cost).

Reported per pair: training samples/s and audio s/s, model FLOPs utilisation of the training step
(analytic FLOPs: encoder forward 2 x params x frames; LLM forward 2 x params x tokens plus backward
through the frozen layers 2 x params x tokens (weight gradients only for LoRA, negligible);
attention's quadratic term left out, so MFU is a lower bound), peak GPU memory, and batched greedy
transcription audio s/s. MFU is against the device's dense bf16 peak (H100/H200 SXM 989 TFLOP/s).

On a lent GPU machine the image lacks soundfile and webdataset, which mmalign imports; carry their
wheels (see /work/.library/device/README.md) and install them first.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]

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
                         vocab_size=151936, rope_theta=1e6, tie_word_embeddings=True,
                         max_position_embeddings=32768),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         vocab_size=128256, rope_theta=5e5, tie_word_embeddings=True,
                         max_position_embeddings=131072),
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
}  # fmt: skip
PAIRS = [("whisper-small", "qwen2.5-0.5b"), ("whisper-medium", "llama-3.2-1b")]
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
WORDS = "zero one two three four five six seven eight nine oh and the speech".split()


def tokenizer_dir() -> str:
    """A byte-level BPE tokenizer with ChatML specials, trained on the fly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([" ".join(WORDS)] * 50 + ["transcribe the audio"] * 50, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>", bos_token="<|endoftext|>"
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    out = Path(tempfile.mkdtemp(prefix="gpu_bench_tok_"))
    fast.save_pretrained(out)
    return str(out)


def build(whisper: str, llm: str, device: str, tok: str):
    from peft import LoraConfig

    from mmalign.encoders.whisper import WhisperEncoder
    from mmalign.llm.load import CausalLM
    from mmalign.model import SpeechLLM
    from mmalign.projectors.mlp import MLPProjector

    torch.manual_seed(0)
    dtype = "bfloat16" if device != "cpu" else "float32"
    enc_cfg = dict(num_mel_bins=80, max_source_positions=1500, **WHISPER[whisper])
    encoder = WhisperEncoder(source="random", config=enc_cfg, dtype=dtype)
    adapter = LoraConfig(
        r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    lm = CausalLM("random", adapter=adapter, tokenizer=tok, config=LLMS[llm], dtype=dtype)
    projector = MLPProjector(encoder.dim, lm.hidden_size, rate=4, mode="stack", hidden_dim=2048)
    return SpeechLLM(encoder, projector, lm, system_prompt="").to(device)


def batch(n: int, rng: random.Random, device: str, max_s: float) -> dict[str, Any]:
    secs = [rng.uniform(2.0, max_s) for _ in range(n)]
    frames = [2 * int(s * 50) for s in secs]  # 100 mel frames per second, even
    t = max(frames)
    return {
        "audio_features": torch.randn(n, 80, t, device=device),
        "audio_lengths": torch.tensor(frames, device=device),
        "texts": [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(n)],
        "task": ["asr"] * n,
        "durations": torch.tensor(secs),
    }


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def step_flops(model, b: dict[str, Any]) -> float:
    """Analytic FLOPs of one training step (see the module docstring)."""
    enc_frames = float((b["audio_lengths"] // 2).sum())
    spliced = model.splice_batch(b, train=True)
    tokens = float(spliced.attention_mask.sum())
    embed = model.llm.model.get_input_embeddings().weight.numel()
    llm_params = count(model.llm.model) - embed  # the tied lm_head runs only at targets
    targets = float((spliced.labels != -100).sum())
    return 2 * count(model.encoder) * enc_frames + 4 * llm_params * tokens + 4 * embed * targets


def run_pair(whisper: str, llm: str, args, tok: str) -> dict[str, Any]:
    device = args.device
    model = build(whisper, llm, device, tok)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    rng = random.Random(0)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    amp = torch.autocast(device.split(":")[0], dtype=torch.bfloat16)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    flops = samples = audio = 0.0
    elapsed = 0.0
    for step in range(args.warmup + args.steps):
        b = batch(args.batch_size, rng, device, args.max_seconds)
        if step >= args.warmup:
            with torch.no_grad(), amp:
                flops += step_flops(model, b)
        sync()
        t0 = time.perf_counter()
        with amp:
            loss = model(b)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if step >= args.warmup:
            elapsed += time.perf_counter() - t0
            samples += args.batch_size
            audio += float(b["durations"].sum())
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    model.eval()
    decode_audio = decode_wall = 0.0
    for _ in range(args.decode_batches):
        b = batch(args.decode_batch_size, rng, device, args.max_seconds)
        sync()
        t0 = time.perf_counter()
        with amp:
            model.generate(b, max_new_tokens=args.max_new_tokens)
        sync()
        decode_wall += time.perf_counter() - t0
        decode_audio += float(b["durations"].sum())
    achieved = flops / elapsed
    return {
        "encoder": whisper,
        "llm": llm,
        "encoder_parameters": count(model.encoder),
        "llm_parameters": count(model.llm.model),
        "trainable_parameters": sum(p.numel() for p in params),
        "batch_size": args.batch_size,
        "train_samples_per_second": samples / elapsed,
        "train_audio_seconds_per_second": audio / elapsed,
        "achieved_tflops": achieved / 1e12,
        "mfu": None if peak is None else achieved / peak,
        "peak_memory_gib": peak_mem,
        "transcribe_audio_seconds_per_second": decode_audio / decode_wall,
        "device_name": name,
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"bf16 training and greedy transcription on {result['device_name']}, {result['date']}",
        "",
        "| encoder | LLM | train samples/s | train audio s/s | TFLOP/s | MFU | peak GiB | "
        "transcribe audio s/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        mem = "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
        lines.append(
            f"| {r['encoder']} | {r['llm']} | {r['train_samples_per_second']:.1f} | "
            f"{r['train_audio_seconds_per_second']:.0f} | {r['achieved_tflops']:.1f} | {mfu} | "
            f"{mem} | {r['transcribe_audio_seconds_per_second']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke run)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-seconds", type=float, default=15.0)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--decode-batches", type=int, default=3)
    parser.add_argument("--decode-batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/gpu_train.json")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(
            "bench/gpu_train.py needs a CUDA GPU (or --device cpu --tiny to smoke-test)"
        )
    pairs = [("tiny", "tiny")] if args.tiny else PAIRS
    if args.tiny:
        args.batch_size, args.steps, args.warmup, args.decode_batch_size = 2, 2, 1, 2
        args.decode_batches, args.max_new_tokens, args.max_seconds = 1, 4, 4.0
    tok = tokenizer_dir()
    rows = [run_pair(w, m, args, tok) for w, m in pairs]
    result = {
        "command": "python bench/gpu_train.py" + (" --device cpu --tiny" if args.tiny else ""),
        "date": time.strftime("%Y-%m-%d"),
        "device_name": rows[0]["device_name"],
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": {"torch": torch.__version__, "python": platform.python_version()},
        "rows": rows,
    }
    print(table(result))
    if not args.tiny:  # a smoke run is not a result
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
