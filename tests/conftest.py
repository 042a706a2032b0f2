"""Tiny model and tokenizer factories: every test builds its models here, nothing downloads."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mmalign.llm.tokenizer import CHATML
from mmalign.quiet import silence


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Every test, module-scoped fixtures included, sees what a user of the CLI sees: the same
    warning filters (pytest resets them per test) and no pytest arguments in sys.argv (tests call
    LightningCLI with args=..., which warns when sys.argv holds other arguments)."""
    silence()
    sys.argv[1:] = []


CORPUS = [
    "zero one two three four five six seven eight nine oh",
    "the quick brown fox jumps over the lazy dog",
    "transcribe the speech translate the speech into german french",
    "transcribe the lip movements and speech answer",
    "hello world this is a tiny tokenizer for tests",
]


def train_tokenizer(out_dir: Path, chat_template: bool = True) -> Path:
    """Train a byte-level BPE tokenizer with ChatML specials and save it as a HF directory."""
    specials = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        bos_token="<|endoftext|>",
    )
    if chat_template:
        fast.chat_template = CHATML
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def plain_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tok_plain"), chat_template=False)


def tiny_llm_config(vocab_size: int = 300) -> dict:
    return {
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "pad_token_id": 0,
        "bos_token_id": 3,
        "eos_token_id": 2,
    }


def tiny_whisper_config() -> dict:
    return {
        "d_model": 32,
        "encoder_layers": 2,
        "encoder_attention_heads": 2,
        "encoder_ffn_dim": 64,
        "decoder_layers": 1,
        "decoder_attention_heads": 2,
        "decoder_ffn_dim": 64,
        "num_mel_bins": 80,
        "vocab_size": 64,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "decoder_start_token_id": 1,
    }


def tiny_wavlm_config(layer_norm: bool = False) -> dict:
    """WavLM with its real conv strides (320 samples a frame, 50/s) but 16 channels and 2 layers.

    ``layer_norm=True`` is the wavlm-large variant (layer-norm feature extractor, pre-norm
    layers), which takes an attention mask; the default is the base/base-plus variant.
    """
    return {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "conv_dim": [16] * 7,
        "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 2,
        "num_buckets": 16,
        "max_bucket_distance": 40,
        "vocab_size": 32,
        "feat_extract_norm": "layer" if layer_norm else "group",
        "do_stable_layer_norm": layer_norm,
    }


def tiny_clip_config() -> dict:
    """An open_clip model config (ViT image tower, 32 px, 2 patches a side) for random weights."""
    return {
        "embed_dim": 24,
        "vision_cfg": {
            "image_size": 32,
            "layers": 1,
            "width": 32,
            "head_width": 16,
            "patch_size": 16,
        },
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }


@pytest.fixture
def tiny_parts(tokenizer_dir: Path):
    """(encoder, llm) pair: random tiny Whisper encoder and tiny Llama with LoRA r=4."""
    return make_tiny_parts(tokenizer_dir)


def make_tiny_parts(tokenizer_dir: Path):
    """What ``tiny_parts`` returns, for tests that need a fresh pair per call."""
    from peft import LoraConfig

    from mmalign.encoders.whisper import WhisperEncoder
    from mmalign.llm.load import CausalLM

    torch.manual_seed(0)
    encoder = WhisperEncoder(source="random", config=tiny_whisper_config())
    llm = CausalLM(
        "random",
        adapter=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        tokenizer=str(tokenizer_dir),
        config=tiny_llm_config(),
    )
    return encoder, llm


def tiny_batch(n: int = 3, t: int = 40, cuts: tuple[int, int, int] = (0, 11, 20)) -> dict:
    """A batch of ``n`` random log-mel rows of lengths ``t - cuts[i]`` with short transcripts."""
    lengths = torch.tensor([t - c for c in cuts[:n]])
    return {
        "audio_features": torch.randn(n, 80, t),
        "audio_lengths": lengths,
        "texts": ["one two", "three", "four five six"][:n],
        "task": ["asr"] * n,
        "durations": lengths / 100,
        "keys": [f"k{i}" for i in range(n)],
    }


def tiny_model_section(
    tokenizer_dir: Path,
    rate: int = 2,
    hidden_dim: int = 16,
    lora_r: int = 4,
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj"),
) -> dict:
    """The ``model.encoder/projector/llm`` part of a CLI config, with tiny random models."""
    return {
        "encoder": {
            "class_path": "mmalign.encoders.whisper.WhisperEncoder",
            "init_args": {"source": "random", "config": tiny_whisper_config()},
        },
        "projector": {
            "class_path": "mmalign.projectors.mlp.MLPProjector",
            "init_args": {"rate": rate, "hidden_dim": hidden_dim},
        },
        "llm": {
            "class_path": "mmalign.llm.load.CausalLM",
            "init_args": {
                "source": "random",
                "tokenizer": str(tokenizer_dir),
                "config": tiny_llm_config(),
                "adapter": {
                    "class_path": "peft.LoraConfig",
                    "init_args": {
                        "r": lora_r,
                        "lora_alpha": 2 * lora_r,
                        "target_modules": list(lora_targets),
                    },
                },
            },
        },
    }


def write_config(tmp: Path, tokenizer_dir: Path, shards: Path) -> Path:
    """A CLI fit config over ``shards``: tiny models (rate 2, width 16, LoRA r=4), 4 steps."""
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 4,
            "val_check_interval": 2,
            "check_val_every_n_epoch": None,
            "limit_val_batches": 1,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp / "run"),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp / "run"), "name": "logs"},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(tmp / "ckpt"), "save_last": True},
                }
            ],
        },
        "model": {
            **tiny_model_section(tokenizer_dir, 2, 16, 4),
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}},
            "scheduler": {
                "class_path": "mmalign.lightning_modules.schedules.WarmupCosine",
                "init_args": {"warmup_steps": 1},
            },
            "max_new_tokens": 4,
            "predictions_dir": str(tmp / "pred"),
        },
        "data": {
            "train": str(shards),
            "val": str(shards),
            "test": str(shards),
            "max_batch_seconds": 4.0,
        },
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


DIGITS = "zero one two three four five six seven eight nine".split()


def write_tone_corpus(root: Path, n: int, seed: int = 0) -> Path:
    """Write ``n`` short tone clips with digit-word transcripts and a JSONL manifest."""
    import json

    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    manifest = root / "manifest.jsonl"
    with open(manifest, "w") as f:
        for i in range(n):
            digits = [DIGITS[d] for d in rng.integers(0, 10, size=int(rng.integers(1, 4)))]
            t = np.arange(int(16000 * rng.uniform(0.3, 1.0))) / 16000
            wav = 0.3 * np.sin(2 * np.pi * (200 + 50 * len(digits)) * t).astype("float32")
            sf.write(root / f"utt{i:03d}.wav", wav, 16000)
            f.write(json.dumps({"audio": f"utt{i:03d}.wav", "text": " ".join(digits)}) + "\n")
    return manifest


@pytest.fixture(scope="session")
def tone_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared shard folder of 12 tone clips (train, val and test all read it)."""
    from mmalign.data.shards import prepare

    root = tmp_path_factory.mktemp("tones")
    manifest = write_tone_corpus(root / "raw", 12)
    report = prepare(manifest, root / "shards", progress=False)
    assert report.ok
    return root / "shards"


def write_translation_shards(root: Path, n: int) -> Path:
    """``n`` short tones with English "texts" and German/French translations (every fifth has
    none), prepared into ``root/shards``."""
    import json

    import numpy as np
    import soundfile as sf

    from mmalign.data.shards import prepare

    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        t = np.arange(int(16000 * (0.2 + 0.01 * i))) / 16000
        sf.write(root / f"u{i}.wav", (0.2 * np.sin(2 * np.pi * 300 * t)).astype("float32"), 16000)
        line = {"audio": f"u{i}.wav", "text": f"word {i}", "source_lang": "en"}
        if i % 5:  # every fifth sample has no German: skipped when asked for st into de
            line["translation"] = {"de": f"Wort {i}", "fr": f"mot {i}"}
        lines.append(line)
    (root / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert prepare(root / "m.jsonl", root / "shards", progress=False).ok
    return root / "shards"


def make_tiny_export(
    out: Path, tokenizer_dir: Path, window_seconds: float = 3.0, rate: int = 4
) -> Path:
    """An ``mmalign export`` folder of a random tiny model whose Whisper window is only
    ``window_seconds`` (so "longer than the window" costs seconds of audio, not minutes) and
    whose projector stacks ``rate`` frames a token (the shortest decodable clip is rate / 50 s)."""
    import json

    from peft import LoraConfig
    from safetensors.torch import save_file

    from mmalign.encoders.whisper import WhisperEncoder
    from mmalign.inference.export import CONFIG_NAME, describe
    from mmalign.llm.load import CausalLM
    from mmalign.model import SpeechLLM
    from mmalign.projectors.mlp import MLPProjector

    torch.manual_seed(0)
    config = {**tiny_whisper_config(), "max_source_positions": int(window_seconds * 50)}
    encoder = WhisperEncoder(source="random", config=config)
    llm = CausalLM(
        "random",
        adapter=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]),
        tokenizer=str(tokenizer_dir),
        config=tiny_llm_config(),
    )
    model = SpeechLLM(encoder, MLPProjector(encoder.dim, llm.hidden_size, rate=rate), llm)
    out.mkdir(parents=True, exist_ok=True)
    model.llm.model.save_pretrained(out / "adapter")
    save_file(
        {k: v.contiguous() for k, v in model.projector.state_dict().items()},
        out / "projector.safetensors",
    )
    (out / CONFIG_NAME).write_text(json.dumps(describe(model)))
    return out


def write_tone(path: Path, seconds: float, freq: float = 300.0, amplitude: float = 0.3) -> Path:
    """A 16 kHz mono tone (amplitude 0: silence) of ``seconds``."""
    import numpy as np
    import soundfile as sf

    t = np.arange(int(round(16000 * seconds))) / 16000
    sf.write(path, (amplitude * np.sin(2 * np.pi * freq * t)).astype("float32"), 16000)
    return path
