"""Training throughput: mmalign's defaults against Llama-AVSR's settings, and the feature cache.

    python bench/train_throughput.py                 # full run (about 10 min on 2 idle cores)
    python bench/train_throughput.py --quick         # smoke run (about 1 min; not a result)
    python bench/train_throughput.py --arms mmalign llama-avsr llama-avsr-buckets
    python bench/train_throughput.py --encoder small # a heavier encoder beside the same LLM
    python bench/train_throughput.py --print bench/results/train_throughput.json

One model for every arm: a Whisper-tiny encoder (frozen) -> stack x4 + MLP projector ->
SmolLM2-135M (frozen, LoRA r=8 on q/v), random-initialised from the released models' configs
written below (``--weights pinned`` loads the pinned real weights instead; ``--encoder``
picks Whisper base or small instead of tiny), AdamW over the trainable parts, gradient
clipping at 1.0, bf16 autocast (fp32 if bf16 autocast fails here; the same for every arm). One
corpus: English speech synthesised offline with espeak-ng (ASSETS.md), durations drawn
log-normally (median 6 s) within 1-15 s, like LibriSpeech's, with transcripts as long as the
speech (about 2.7 words a second), made once into shards by ``mmalign prepare``.

Arms (each in its own process, so its peak memory is its own, one after the other):

- ``mmalign`` (the defaults): ``ShardDataModule`` batches by duration (``max_batch_seconds``,
  sorted within a ``bucket_buffer`` of 200, batch order shuffled), log-mel computed in a
  DataLoader worker (``--workers``), Whisper run on a window as long as the batch's longest clip.
- ``llama-avsr`` (Llama-AVSR's settings as issue 9 lists them): a plain DataLoader with a fixed
  ``--batch-size``, shuffled, no bucketing, whose workers only decode audio and pad it to 30 s;
  inside the training step, in the main process, the 30 s waveforms become log-mel
  (WhisperFeatureExtractor, as Llama-AVSR's ``encode_audio`` does) and Whisper runs on the full
  30 s window (``WhisperEncoder(pad_to_30s=True)``); its output is cut to the batch's longest
  clip before the projector, as Llama-AVSR cuts it.
- ``cache``: the ``mmalign`` arm reading ``mmalign cache-features`` shards (fp16 encoder output,
  built once before any timing, with the same encoder weights): no log-mel, no encoder.
- ``llama-avsr-buckets`` (not run by default): the ``llama-avsr`` arm with the batching
  Llama-AVSR's own code uses (``CustomBucketDataset``: 50 equal-width length buckets, batches
  cut at ``--batch-seconds`` of summed, unpadded audio, batch order shuffled).

Every arm measures the same number of utterances (``--utterances``) after ``--warmup`` steps;
the clock runs from the first measured batch request to the last optimizer step, so waiting
for the loader and in-step feature extraction count. The training process uses ``cores -
workers`` torch threads (1 on a 2-core machine), the same in every arm, so a loader worker
computing features never oversubscribes the cores. Reported: audio seconds per wall second
(and the ratio to ``llama-avsr``), padding efficiency (valid / all) of the encoder's input
frames and of the LLM's input tokens in the measured batches, peak memory per sample, and, over
one whole epoch of the corpus (no training, exact LLM lengths from the tokenizer), the padding
efficiency of each batching rule. The JSON says how memory was measured.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "bench_train_throughput"
RESULTS = ROOT / "bench" / "results" / "train_throughput.json"
ARMS = ("mmalign", "llama-avsr", "cache", "llama-avsr-buckets")
DEFAULT_ARMS = ("mmalign", "llama-avsr", "cache")
BASELINE = "llama-avsr"
SAMPLE_RATE = 16000
WINDOW_SECONDS = 30
MEL_PER_SECOND = 100
RATE = 4  # projector compression (stack x4)

# the released openai/whisper-* encoders (transformers WhisperConfig fields); tiny by default
WHISPER = {
    "tiny": dict(d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536),
    "base": dict(d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048),
    "small": dict(d_model=768, encoder_layers=12, encoder_attention_heads=12,
                  encoder_ffn_dim=3072),
}  # fmt: skip
MEL = dict(num_mel_bins=80, max_source_positions=1500)
# HuggingFaceTB/SmolLM2-135M(-Instruct) (AutoConfig.for_model kwargs)
SMOLLM2_135M = dict(
    model_type="llama",
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    vocab_size=49152,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
PINNED = {"encoder": "pinned:whisper-tiny.en", "llm": "pinned:smollm2-135m-instruct"}

FULL = dict(corpus=320, utterances=128, warmup=2, batch_size=8, batch_seconds=60.0)
QUICK = dict(corpus=16, utterances=4, warmup=1, batch_size=4, batch_seconds=30.0)


# --------------------------------------------------------------------------- corpus


def target_seconds(rng: random.Random, low: float = 1.0, high: float = 15.0) -> float:
    """A LibriSpeech-like utterance length: log-normal, median 6 s, kept within [low, high]."""
    while True:
        s = rng.lognormvariate(math.log(6.0), 0.6)
        if low <= s <= high:
            return s


def make_corpus(n: int, seed: int, jobs: int) -> Path:
    """``n`` espeak-ng utterances of 1-15 s as shards (``mmalign prepare``); made once, reused."""
    out = WORK / f"corpus-n{n}-seed{seed}"
    shards = out / "shards"
    index = shards / "index.json"
    if index.is_file() and json.loads(index.read_text()).get("total_samples") == n:
        return shards
    from mmalign.data.shards import prepare
    from mmalign.data.synthetic.espeak import SENTENCES, check_tools, english_voices, sox_to_16k

    check_tools()
    rng = random.Random(seed)
    words = [w.strip(".,;:!?\"'").lower() for w in " ".join(SENTENCES).split()]
    voices = english_voices()
    plan = []
    for i in range(n):
        seconds = target_seconds(rng)
        speed = rng.randint(110, 150)  # espeak-ng speaks about 1.38 x `-s` words a minute
        count = max(1, round(seconds * speed * 1.38 / 60))
        start = rng.randrange(len(words))
        text = " ".join(words[(start + k) % len(words)] for k in range(count))
        plan.append((f"utt-{i:06d}", text, rng.choice(voices), speed, rng.randint(30, 70)))
    (out / "wav").mkdir(parents=True, exist_ok=True)

    def speak(item: tuple[str, str, str, int, int]) -> None:
        key, text, voice, speed, pitch = item
        raw = out / "wav" / f".{key}.espeak.wav"
        cmd = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(raw)]
        subprocess.run([*cmd, "--stdin"], input=text, text=True, check=True, capture_output=True)
        try:
            sox_to_16k([str(raw)], out / "wav" / f"{key}.wav", key)
        finally:
            raw.unlink(missing_ok=True)

    print(f"synthesising {n} utterances into {out} (once)", flush=True)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(speak, plan))
    manifest = out / "train.jsonl"
    with manifest.open("w") as f:
        for key, text, voice, speed, pitch in plan:
            line = dict(audio=f"wav/{key}.wav", text=text, key=key, task="asr", voice=voice)
            f.write(json.dumps({**line, "speed": speed, "pitch": pitch}) + "\n")
    prepare(manifest, shards, shard_max_count=max(8, n // 8), progress=False)
    return shards


def read_raw_samples(shards: Path) -> list[dict[str, Any]]:
    """Every sample of the shards as raw members (``{"__key__", "json": bytes, "flac": bytes}``),
    in shard order: compressed audio, so a whole corpus fits in memory."""
    samples: dict[str, dict[str, Any]] = {}
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for info in tar:
                if not info.isreg():
                    continue
                key, _, ext = Path(info.name).name.partition(".")
                member = tar.extractfile(info)
                assert member is not None
                samples.setdefault(key, {"__key__": key, "__url__": str(tar_path)})[ext] = (
                    member.read()
                )
    return list(samples.values())


def corpus_summary(raws: list[dict[str, Any]]) -> dict[str, Any]:
    seconds = sorted(float(json.loads(r["json"])["duration"]) for r in raws)
    words = [len(json.loads(r["json"])["text"].split()) for r in raws]

    def q(p: float) -> float:
        return seconds[min(len(seconds) - 1, int(p * len(seconds)))]

    return {
        "utterances": len(seconds),
        "hours": sum(seconds) / 3600,
        "seconds_min": seconds[0],
        "seconds_p10": q(0.1),
        "seconds_median": q(0.5),
        "seconds_mean": sum(seconds) / len(seconds),
        "seconds_p90": q(0.9),
        "seconds_max": seconds[-1],
        "words_per_second": sum(words) / sum(seconds),
    }


# --------------------------------------------------------------------------- model


def tokenizer_dir(texts: list[str]) -> str:
    """A byte-level BPE with a ChatML template (as SmolLM2-Instruct's), trained on the corpus,
    for the random-initialised LLM: whole words become single tokens, as in a 49k vocabulary."""
    from mmalign.llm.prompt import DEFAULT_PROMPTS
    from mmalign.llm.tokenizer import train_chatml_tokenizer

    prompts = [p.format(modality="", target_lang="German") for p in DEFAULT_PROMPTS.values()]
    texts = [*texts, *(prompts * 20), "user assistant system"] * 4
    out = tempfile.mkdtemp(prefix="bench_train_tok_")
    return str(train_chatml_tokenizer(texts, out, vocab_size=4096))


def build_model(args: argparse.Namespace, pad_to_30s: bool) -> Any:
    """The benchmark's one model (encoder built first after seeding: the cache arm's check
    sees the same encoder weights the cache was written with)."""
    from peft import LoraConfig

    from mmalign.encoders.whisper import WhisperEncoder
    from mmalign.llm.load import CausalLM
    from mmalign.model import SpeechLLM
    from mmalign.projectors.mlp import MLPProjector

    torch.manual_seed(args.seed)
    adapter = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])
    if args.weights == "pinned":
        encoder = WhisperEncoder(PINNED["encoder"], pad_to_30s=pad_to_30s)
        llm = CausalLM(PINNED["llm"], adapter=adapter)
    else:
        config = {**WHISPER[args.encoder], **MEL}
        encoder = WhisperEncoder("random", pad_to_30s=pad_to_30s, config=config)
        llm = CausalLM("random", adapter=adapter, tokenizer=args.tokenizer, config=SMOLLM2_135M)
    projector = MLPProjector(encoder.dim, llm.hidden_size, rate=RATE, mode="stack", hidden_dim=1024)
    return SpeechLLM(encoder, projector, llm, system_prompt="").to(args.device)


def cache_encoder(args: argparse.Namespace) -> Any:
    """The encoder of :func:`build_model`, alone (what ``cache-features`` runs)."""
    from mmalign.encoders.whisper import WhisperEncoder

    torch.manual_seed(args.seed)
    if args.weights == "pinned":
        return WhisperEncoder(PINNED["encoder"])
    return WhisperEncoder("random", config={**WHISPER[args.encoder], **MEL})


def pick_precision(requested: str, device: str) -> str:
    """``bf16`` when autocast to bfloat16 runs a forward and backward here, else ``fp32``."""
    if requested != "auto":
        return requested
    try:
        layer = torch.nn.Linear(64, 64).to(device)
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            out = layer(torch.randn(8, 64, device=device))
        out.float().sum().backward()
        return "bf16" if out.dtype == torch.bfloat16 else "fp32"
    except Exception:  # noqa: BLE001 - any failure means: not here
        return "fp32"


def autocast(precision: str, device: str) -> Any:
    if precision == "bf16":
        return torch.autocast(device.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- measuring


class PeakMemory:
    """Peak extra memory of one training step.

    CUDA: ``torch.cuda.max_memory_allocated()`` during the step minus the memory allocated
    before it. CPU on Linux: resident set size of this (the main) process: ``malloc_trim(0)``
    returns freed heap to the OS, ``/proc/self/clear_refs`` resets the high-water mark, and the
    step's peak is ``VmHWM`` after it minus ``VmRSS`` before it (DataLoader worker processes not
    included). Elsewhere: the process's lifetime peak (``ru_maxrss``) minus RSS before training.
    """

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.per_step = False
        self.libc = None
        if not self.cuda:
            try:
                self.libc = ctypes.CDLL("libc.so.6")
                Path("/proc/self/clear_refs").write_text("5")
                self.per_step = True
            except OSError:
                self.libc = None
        self.start_mb = self._rss_mb() if not self.cuda else 0.0
        self.before = 0.0

    @property
    def method(self) -> str:
        if self.cuda:
            return "torch.cuda.max_memory_allocated() during the step - memory_allocated() before"
        if self.per_step:
            return (
                "main-process RSS: VmHWM after the step (high-water mark reset through "
                "/proc/self/clear_refs after malloc_trim(0)) - VmRSS before it; DataLoader "
                "workers not included"
            )
        return "main-process ru_maxrss (lifetime) - RSS before the first step"

    @staticmethod
    def _status_mb(field: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        raise KeyError(field)

    def _rss_mb(self) -> float:
        try:
            return self._status_mb("VmRSS")
        except (OSError, KeyError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated() / 2**20
        elif self.per_step:
            assert self.libc is not None
            self.libc.malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
            self.before = self._status_mb("VmRSS")

    def stop(self) -> float:
        """MB above the memory before the step."""
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20 - self.before
        if self.per_step:
            return self._status_mb("VmHWM") - self.before
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - self.start_mb


class LLMTokens:
    """Counts the LLM's input positions and the valid ones (its 2D attention mask) per call."""

    def __init__(self, llm: torch.nn.Module) -> None:
        self.valid = self.total = 0
        self.handle = llm.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            self.valid += int(mask.sum())
            self.total += mask.numel()
        elif kwargs.get("inputs_embeds") is not None:  # no mask: every position is valid
            n = kwargs["inputs_embeds"].shape[0] * kwargs["inputs_embeds"].shape[1]
            self.valid += n
            self.total += n


def to_device(batch: dict[str, Any], device: str) -> dict[str, Any]:
    if device == "cpu":
        return batch
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


def forever(loader: Any) -> Iterator[dict[str, Any]]:
    """Batches of ``loader``, epoch after epoch."""
    while True:
        yield from loader


# --------------------------------------------------------------------------- arms' batches


def mmalign_datamodule(args: argparse.Namespace, shards: Path, cached: bool) -> Any:
    """mmalign's defaults: ``ShardDataModule`` duration buckets, features in a worker."""
    from mmalign.data.datamodule import ShardDataModule

    return ShardDataModule(
        train=str(shards),
        max_batch_seconds=args.batch_seconds,
        bucket_buffer=200,
        num_workers=args.workers,
        seed=args.seed,
        max_skip_rate=None,
        features="cached" if cached else "live",
    )


class Utterances(torch.utils.data.Dataset):
    """The corpus as a map-style dataset: raw members held in memory, decoded on access with
    mmalign's own ``decode_sample`` (what a DataLoader worker of the baseline does)."""

    def __init__(self, raws: list[dict[str, Any]]) -> None:
        self.raws = raws
        self.seconds = [float(json.loads(r["json"])["duration"]) for r in raws]

    def __len__(self) -> int:
        return len(self.raws)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from mmalign.data.decoding import decode_sample

        return decode_sample(self.raws[i], SAMPLE_RATE)


def pad_waveforms(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Baseline collate: waveforms zero-padded to 30 s, as Llama-AVSR's feature extractor pads."""
    window = WINDOW_SECONDS * SAMPLE_RATE
    audio = torch.zeros(len(samples), window)
    for row, s in enumerate(samples):
        wave = s["audio"][:window]
        audio[row, : wave.numel()] = wave
    lengths = torch.tensor([min(s["audio"].numel(), window) for s in samples])
    return {
        "audio": audio,
        "audio_sample_lengths": lengths,
        "texts": [s["text"] for s in samples],
        "task": [s["task"] for s in samples],
        "meta": [s["meta"] for s in samples],
        "durations": torch.tensor([s["duration"] for s in samples], dtype=torch.float32),
    }


def bucket_batches(seconds: list[float], budget: float, buckets: int = 50) -> list[list[int]]:
    """Llama-AVSR's ``CustomBucketDataset`` rule: samples sorted by length (longest first),
    grouped into ``buckets`` equal-width length buckets, cut greedily where the *summed*
    length would pass ``budget``."""
    lengths = torch.tensor(seconds)
    edges = torch.linspace(float(lengths.min()), float(lengths.max()), buckets)
    bucket = torch.bucketize(lengths, edges).tolist()
    order = sorted(range(len(seconds)), key=lambda i: -seconds[i])
    order = sorted(order, key=lambda i: bucket[i])  # stable: longest first within a bucket
    batches: list[list[int]] = []
    current: list[int] = []
    total = 0.0
    for i in order:
        if current and total + seconds[i] > budget:
            batches.append(current)
            current, total = [], 0.0
        current.append(i)
        total += seconds[i]
    if current:
        batches.append(current)
    return batches


class ShuffledBatches(torch.utils.data.Sampler):
    """A fixed list of batches in a new random order every epoch (a ``batch_sampler``)."""

    def __init__(self, batches: list[list[int]], seed: int) -> None:
        self.batches, self.rng = batches, random.Random(seed)

    def __iter__(self) -> Iterator[list[int]]:
        order = list(self.batches)
        self.rng.shuffle(order)
        return iter(order)

    def __len__(self) -> int:
        return len(self.batches)


def baseline_batches(args: argparse.Namespace, raws: list[dict[str, Any]], buckets: bool):
    """Llama-AVSR's loader: workers decode audio and pad it to 30 s; no features. Batches are
    ``--batch-size`` random utterances, or with ``buckets`` Llama-AVSR's length buckets."""
    data = Utterances(raws)
    common = dict(collate_fn=pad_waveforms, num_workers=args.workers)
    if buckets:
        sampler = ShuffledBatches(bucket_batches(data.seconds, args.batch_seconds), args.seed)
        loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, **common)
    else:
        generator = torch.Generator().manual_seed(args.seed)
        loader = torch.utils.data.DataLoader(
            data,
            batch_size=args.batch_size,
            shuffle=True,
            drop_last=True,
            generator=generator,
            **common,
        )
    return forever(loader)


def in_step_features(batch: dict[str, Any], mel: Any) -> dict[str, Any]:
    """Llama-AVSR's ``encode_audio`` front end, in the training step: log-mel of every 30 s
    window (3000 frames a row), cut to the batch's longest clip (the encoder pads it back to
    30 s and Llama-AVSR cuts its output there)."""
    feats, _ = mel(list(batch["audio"]))
    frames = (batch["audio_sample_lengths"] + mel.hop_length - 1) // mel.hop_length
    longest = int(frames.max())
    longest += longest % 2
    return {**batch, "audio_features": feats[..., :longest], "audio_lengths": frames}


# --------------------------------------------------------------------------- feature cache


def feature_cache(args: argparse.Namespace, shards: Path) -> Path | None:
    """``mmalign cache-features`` of the corpus with the arms' encoder (once, before timing);
    None when this checkout has no feature cache. Returns the cache's shard folder."""
    try:
        from mmalign.inference.cache import cache_features
        from mmalign.inference.encoder_identity import weights_sha256
    except ImportError:
        print("feature cache not available (mmalign.data.cache is missing)", flush=True)
        return None
    name = "tiny.en" if args.weights == "pinned" else args.encoder
    out = shards.parent / f"cache-{args.weights}-{name}-seed{args.seed}"
    encoder = cache_encoder(args)
    index = out / "index.json"
    if index.is_file():  # reused while it holds this encoder's features
        cached = json.loads(index.read_text()).get("cache") or {}
        if cached.get("weights_sha256") == weights_sha256(encoder):
            return out
    started = time.perf_counter()
    report = cache_features(shards, out, encoder, batch_size=16, progress=False)
    wall = time.perf_counter() - started
    (out / "build.json").write_text(
        json.dumps({"wall_seconds": wall, "audio_seconds": report.total_seconds})
    )
    return out


def cache_build_stats(cache: Path | None) -> dict[str, Any] | None:
    if cache is None or not (cache / "build.json").is_file():
        return None
    stats = json.loads((cache / "build.json").read_text())
    stats["audio_seconds_per_second"] = stats["audio_seconds"] / stats["wall_seconds"]
    return stats


def train_from_cache(args: argparse.Namespace) -> dict[str, Any]:
    """The feature-cache arm: mmalign's batches read from ``cache-features`` shards (encoder
    output, fp16), so the step runs no log-mel and no encoder. Compare with ``mmalign``."""
    try:
        from mmalign.inference.encoder_identity import check_model_cache  # noqa: F401
    except ImportError:
        print("feature cache not available (mmalign.data.cache is missing)", flush=True)
        return {"arm": "cache", "skipped": "feature cache not available"}
    cache = Path(args.cache_dir) if args.cache_dir else None
    if cache is None or not (cache / "index.json").is_file():
        return {"arm": "cache", "skipped": "no cache was built"}
    return train_arm("cache", args, shards=cache)


# --------------------------------------------------------------------------- one arm


def train_arm(arm: str, args: argparse.Namespace, shards: Path | None = None) -> dict[str, Any]:
    """Train ``args.warmup`` steps, then until ``args.utterances`` more were seen; measure."""
    from mmalign.data.features import WhisperFeatures

    torch.set_num_threads(args.threads)
    baseline = arm.startswith("llama-avsr")
    model = build_model(args, pad_to_30s=baseline)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    corpus = Path(args.corpus_dir)
    if arm in ("mmalign", "cache"):
        dm = mmalign_datamodule(args, shards or corpus, cached=arm == "cache")
        if arm == "cache":  # refuses a cache another encoder (or other weights) wrote
            from mmalign.inference.encoder_identity import check_model_cache

            check_model_cache(model, dm.caches, sample_rate=SAMPLE_RATE, n_mels=dm.n_mels)
        batches = forever(dm.train_dataloader())
    else:
        batches = baseline_batches(args, read_raw_samples(corpus), buckets=arm.endswith("buckets"))
    mel = WhisperFeatures()
    tokens = LLMTokens(model.llm.model.get_base_model().get_decoder())  # the decoder body
    memory = PeakMemory(args.device)
    amp = autocast(args.precision, args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    step = seen = 0
    fetch = feature_s = meter_s = audio_s = 0.0
    enc_valid = enc_total = 0.0
    steps: list[dict[str, Any]] = []
    losses: list[float] = []
    started = 0.0
    while step < args.warmup or seen < args.utterances:
        measuring = step >= args.warmup
        if measuring and not started:
            sync()
            started = time.perf_counter()
            tokens.valid = tokens.total = 0
        t0 = time.perf_counter()
        memory.start()
        t1 = time.perf_counter()
        batch = next(batches)
        t2 = time.perf_counter()
        if baseline:
            batch = in_step_features(batch, mel)
        t3 = time.perf_counter()
        batch = to_device(batch, args.device)
        with amp:
            loss = model(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        t4 = time.perf_counter()
        peak = memory.stop()
        t5 = time.perf_counter()
        n = len(batch["texts"])
        if measuring:
            meter_s += (t1 - t0) + (t5 - t4)
            fetch += t2 - t1
            feature_s += t3 - t2
            seen += n
            audio_s += float(batch["durations"].sum())
            if "audio_features" in batch:  # the cache arm's encoder never runs
                window = WINDOW_SECONDS * MEL_PER_SECOND if baseline else None
                enc_valid += float(batch["audio_lengths"].sum())
                enc_total += float((window or batch["audio_features"].shape[-1]) * n)
            steps.append({"utterances": n, "seconds": t4 - t1, "peak_mb": peak})
            losses.append(float(loss.detach()))
        step += 1
    sync()
    wall = time.perf_counter() - started - meter_s
    tokens.handle.remove()
    per_sample = sorted(s["peak_mb"] / s["utterances"] for s in steps)
    sizes = [s["utterances"] for s in steps]
    return {
        "arm": arm,
        "measured_steps": len(steps),
        "utterances": seen,
        "audio_seconds": audio_s,
        "wall_seconds": wall,
        "audio_seconds_per_second": audio_s / wall,
        "utterances_per_second": seen / wall,
        "mean_batch_size": sum(sizes) / len(sizes),
        "seconds_waiting_for_batches": fetch,
        "seconds_in_step_features": feature_s if baseline else 0.0,
        "padding_efficiency_encoder": enc_valid / enc_total if enc_total else None,
        "padding_efficiency_llm": tokens.valid / max(1, tokens.total),
        "llm_tokens_per_step": tokens.total / len(steps),
        "peak_mb_per_sample": per_sample[len(per_sample) // 2],
        "peak_mb_per_sample_max": per_sample[-1],
        "peak_step_mb": max(s["peak_mb"] for s in steps),
        "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "memory_measure": memory.method,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "trainable_parameters": sum(p.numel() for p in params),
        "steps": steps,
        "epoch_padding": epoch_padding(model, args) if arm == "mmalign" else None,
    }


def epoch_padding(model: Any, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Padding efficiency of each batching rule over one epoch of the whole corpus, without
    training: encoder input frames and exact LLM lengths (the model's prompt and tokenizer)."""
    from mmalign.data.batching import DurationBatcher

    samples = []
    head, tail = model.prompt.segments("asr")
    for r in read_raw_samples(Path(args.corpus_dir)):
        meta = json.loads(r["json"])
        frames = math.ceil(meta["duration"] * MEL_PER_SECOND)
        span = math.ceil(math.ceil(frames / 2) / RATE) + 2  # + begin/end embeddings
        llm = len(head) + span + len(tail) + len(model.prompt.target(meta["text"]))
        samples.append({"duration": meta["duration"], "frames": frames, "llm": llm})
    shuffled = random.Random(args.seed).sample(samples, len(samples))

    def efficiency(batches: list[list[dict[str, Any]]], window: int | None) -> dict[str, float]:
        enc_valid = sum(s["frames"] for b in batches for s in b)
        enc_total = sum(
            (window or max(s["frames"] + s["frames"] % 2 for s in b)) * len(b) for b in batches
        )
        llm_valid = sum(s["llm"] for b in batches for s in b)
        llm_total = sum(max(s["llm"] for s in b) * len(b) for b in batches)
        return {
            "encoder": enc_valid / enc_total,
            "llm": llm_valid / llm_total,
            "batches": len(batches),
            "mean_batch_size": sum(len(b) for b in batches) / len(batches),
        }

    batcher = DurationBatcher(args.batch_seconds, buffer_size=200, shuffle=True, seed=args.seed)
    buckets = list(batcher(iter(shuffled)))
    k = args.batch_size
    random_batches = [shuffled[i : i + k] for i in range(0, len(shuffled) - k + 1, k)]
    seconds = [s["duration"] for s in samples]
    avsr_buckets = [[samples[i] for i in b] for b in bucket_batches(seconds, args.batch_seconds)]
    window = WINDOW_SECONDS * MEL_PER_SECOND
    return {
        "duration buckets (mmalign)": efficiency(buckets, None),
        f"random batches of {k}, cropped window": efficiency(random_batches, None),
        f"random batches of {k}, 30 s window (llama-avsr)": efficiency(random_batches, window),
        "Llama-AVSR length buckets, 30 s window": efficiency(avsr_buckets, window),
    }


# --------------------------------------------------------------------------- report


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(result: dict[str, Any]) -> str:
    """The report printed after a run (``--print`` re-prints it from the JSON)."""
    st, env = result["settings"], result["environment"]
    rows = [r for r in result["rows"] if "skipped" not in r]
    base = next((r for r in rows if r["arm"] == BASELINE), None)
    lines = [
        f"Training throughput: {st['utterances']} utterances per arm after {st['warmup']} "
        f"warm-up step(s), {st['weights']} Whisper-{st['encoder']} + SmolLM2-135M (LoRA r=8), "
        f"{st['precision']}, {env['device_name']} ({env['cpus']} cores, {st['threads']} torch "
        f"thread(s), {st['workers']} loader worker(s)), {result['date']}",
        "",
        "| arm | audio s / wall s | x llama-avsr | utts / s | mean batch | pad. eff. encoder | "
        "pad. eff. LLM | peak MB / sample |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = r["audio_seconds_per_second"] / base["audio_seconds_per_second"] if base else None
        lines.append(
            f"| {r['arm']} | {r['audio_seconds_per_second']:.2f} | {_fmt(ratio, '.2f')} | "
            f"{r['utterances_per_second']:.2f} | {r['mean_batch_size']:.1f} | "
            f"{_fmt(r['padding_efficiency_encoder'], '.3f')} | "
            f"{r['padding_efficiency_llm']:.3f} | {r['peak_mb_per_sample']:.0f} |"
        )
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['arm']} | skipped: {r['skipped']} | | | | | | |")
    epoch = next((r["epoch_padding"] for r in rows if r.get("epoch_padding")), None)
    if epoch:
        lines += [
            "",
            f"Padding efficiency over one epoch of the corpus ({result['corpus']['utterances']} "
            "utterances, no training):",
            "",
            "| batching | batches | mean batch | encoder frames | LLM tokens |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, e in epoch.items():
            lines.append(
                f"| {name} | {e['batches']} | {e['mean_batch_size']:.1f} | {e['encoder']:.3f} | "
                f"{e['llm']:.3f} |"
            )
    cache = result.get("cache_build")
    if cache:
        lines += [
            "",
            f"Feature cache built once before timing: {cache['audio_seconds']:.0f} s of audio in "
            f"{cache['wall_seconds']:.0f} s ({cache['audio_seconds_per_second']:.0f} audio s / s).",
        ]
    lines += ["", f"Peak memory: {rows[0]['memory_measure'] if rows else 'n/a'}."]
    return "\n".join(lines)


def environment(device: str) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average_1min": os.getloadavg()[0],  # other work on the machine skews timings
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: small corpus, 1 step")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(DEFAULT_ARMS))
    parser.add_argument("--corpus", type=int, help="utterances synthesised (320; quick 16)")
    parser.add_argument("--utterances", type=int, help="measured per arm (128; quick 4)")
    parser.add_argument("--warmup", type=int, help="untimed steps per arm (2; quick 1)")
    parser.add_argument("--batch-size", type=int, help="llama-avsr's batch size (8; quick 4)")
    parser.add_argument(
        "--batch-seconds",
        type=float,
        help="mmalign's max_batch_seconds (60, ShardDataModule's default; quick 30), also the "
        "summed budget of llama-avsr-buckets",
    )
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers, every arm")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads of the training process (default: cores - workers, at least 1, "
        "so a worker computing features does not oversubscribe the cores)",
    )
    parser.add_argument("--encoder", choices=sorted(WHISPER), default="tiny")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--weights", choices=["random", "pinned"], default="random")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="espeak-ng processes (corpus)")
    parser.add_argument(
        "--json",
        type=Path,
        help="results file (default bench/results/train_throughput.json; with --quick "
        f"{WORK.relative_to(ROOT)}/quick.json: a smoke run is not a result)",
    )
    parser.add_argument("--print", type=Path, help="only re-print the table of a results JSON")
    for hidden in ("--arm", "--corpus-dir", "--cache-dir", "--tokenizer"):  # child processes
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) - args.workers)
    if args.weights == "pinned" and args.encoder != "tiny":
        parser.error("--weights pinned has Whisper tiny.en only")
    if args.json is None:
        args.json = WORK / "quick.json" if args.quick else RESULTS
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.print:
        print(table(json.loads(args.print.read_text())))
        return
    if args.arm:  # a child process: one arm
        row = train_from_cache(args) if args.arm == "cache" else train_arm(args.arm, args)
        print("RESULT " + json.dumps(row))
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    args.precision = pick_precision(args.precision, args.device)
    shards = make_corpus(args.corpus, args.seed, args.jobs)
    raws = read_raw_samples(shards)
    corpus = corpus_summary(raws)
    tok = tokenizer_dir([json.loads(r["json"])["text"] for r in raws])
    cache = feature_cache(args, shards) if "cache" in args.arms else None
    hidden = ["--corpus-dir", str(shards), "--tokenizer", tok, "--precision", args.precision]
    hidden += ["--cache-dir", str(cache)] if cache else []
    script = str(Path(__file__).resolve())
    rows = []
    for arm in args.arms:
        cmd = [sys.executable, script, *argv, *hidden, "--arm", arm]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        found = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not found:
            raise SystemExit(f"arm {arm} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
        rows.append(json.loads(found[-1].removeprefix("RESULT ")))
        r = rows[-1]
        speed = r.get("skipped") or f"{r['audio_seconds_per_second']:.2f} audio s / s"
        print(f"{arm}: {speed}", flush=True)
    settings = {
        k: str(v) if isinstance(v, Path) else v
        for k, v in vars(args).items()
        if k not in ("print", "arm", "corpus_dir", "cache_dir", "tokenizer")
    }
    result = {
        "benchmark": "train_throughput",
        "command": "python bench/train_throughput.py" + "".join(f" {a}" for a in argv),
        "date": time.strftime("%Y-%m-%d"),
        "settings": settings,
        "model": {
            "weights": args.weights,
            "encoder": PINNED["encoder"] if args.weights == "pinned" else WHISPER[args.encoder],
            "llm": PINNED["llm"] if args.weights == "pinned" else SMOLLM2_135M,
            "projector": {"class": "MLPProjector", "rate": RATE, "mode": "stack", "hidden": 1024},
            "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        },
        "corpus": {"shards": str(shards), **corpus},
        "cache_build": cache_build_stats(cache),
        "environment": environment(args.device),
        "rows": rows,
        "total_seconds": time.perf_counter() - started,
    }
    print(table(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
