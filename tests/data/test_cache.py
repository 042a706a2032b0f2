"""Encoder feature cache: cache-features writes it, training reads it, mismatches are refused."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_llm_config, tiny_model_section, tiny_whisper_config

from mmalign.cli import cli_main, main
from mmalign.data.cache import CACHE_FORMAT, CacheMismatchError
from mmalign.data.datamodule import ShardDataModule
from mmalign.encoders.whisper import WhisperEncoder
from mmalign.inference.cache import cache_features
from mmalign.inference.encoder_identity import check_model_cache, weights_sha256


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory) -> Path:
    """A tiny random Whisper encoder saved as a transformers folder: fixed weights that the
    cache and every model below load alike."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("whisper")
    HFWhisperEncoder(WhisperConfig(**tiny_whisper_config())).save_pretrained(out)
    return out


def model_section(tokenizer_dir: Path, whisper_dir: Path, **encoder_args) -> dict:
    section = tiny_model_section(tokenizer_dir)
    section["encoder"]["init_args"] = {"source": str(whisper_dir), **encoder_args}
    return section


def write_fit_config(tmp: Path, tokenizer_dir: Path, whisper_dir: Path, data: dict, **enc) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 2,
            "val_check_interval": 2,
            "check_val_every_n_epoch": None,
            "limit_val_batches": 1,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "logger": False,
            "default_root_dir": str(tmp / "run"),
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(tmp / "ckpt"), "save_last": True},
                }
            ],
        },
        "model": {
            **model_section(tokenizer_dir, whisper_dir, **enc),
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}},
            "max_new_tokens": 2,
            "predictions_dir": str(tmp / "pred"),
        },
        "data": {"max_batch_seconds": 4.0, **data},
    }
    path = tmp / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tokenizer_dir, whisper_dir, tone_shards) -> dict[str, Path]:
    """The tone shards cached through the CLI (fp16, the default) and in fp32 (the API)."""
    tmp = tmp_path_factory.mktemp("cache")
    config = write_fit_config(tmp, tokenizer_dir, whisper_dir, {"train": str(tone_shards)})
    main(["cache-features", str(tone_shards), str(tmp / "fp16"), str(config), "--batch_size", "4"])
    encoder = WhisperEncoder(source=str(whisper_dir))
    report = cache_features(tone_shards, tmp / "fp32", encoder, dtype="float32", progress=False)
    assert report.written == 12 and not report.skipped
    return {"float16": tmp / "fp16", "float32": tmp / "fp32", "config": config}


def tiny_model(tokenizer_dir: Path, whisper_dir: Path, **encoder_args):
    from peft import LoraConfig

    from mmalign.llm.load import CausalLM
    from mmalign.model import SpeechLLM
    from mmalign.projectors.mlp import MLPProjector

    torch.manual_seed(0)
    encoder = WhisperEncoder(source=str(whisper_dir), **encoder_args)
    llm = CausalLM(
        "random",
        adapter=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        tokenizer=str(tokenizer_dir),
        config=tiny_llm_config(),
    )
    return SpeechLLM(encoder, MLPProjector(encoder.dim, llm.hidden_size, rate=2), llm).eval()


def batches(shards: Path, **kwargs) -> list[dict]:
    dm = ShardDataModule(val=str(shards), max_batch_seconds=60.0, **kwargs)
    return list(dm.val_dataloader())


def test_cache_features_writes_shards_and_index(caches, tone_shards):
    index = json.loads((caches["float16"] / "index.json").read_text())
    source = json.loads((tone_shards / "index.json").read_text())
    assert index["format"] == source["format"] and index["total_samples"] == 12
    assert [s["samples"] for s in index["shards"]] == [s["samples"] for s in source["shards"]]
    cache = index["cache"]
    assert cache["format"] == CACHE_FORMAT
    assert cache["encoder"]["class_path"] == "mmalign.encoders.whisper.WhisperEncoder"
    assert cache["encoder"]["init_args"]["pad_to_30s"] is False
    assert cache["weights_sha256"] == weights_sha256(
        WhisperEncoder(source=cache["encoder"]["init_args"]["source"])
    )
    assert (cache["window"], cache["n_mels"], cache["sample_rate"]) == ("per_sample", 80, 16000)
    assert (cache["dtype"], cache["encoder_dtype"], cache["dim"]) == ("float16", "float32", 32)
    assert cache["audio_kept"] is False
    members = tar_members(caches["float16"] / index["shards"][0]["path"])
    keys = {name.split(".", 1)[0] for name in members}
    assert set(members) == {f"{k}.{ext}" for k in keys for ext in ("json", "feats.npy")}
    key = sorted(keys)[0]
    feats = np.load(io.BytesIO(members[f"{key}.feats.npy"]))
    meta = json.loads(members[f"{key}.json"])
    frames = -(-round(meta["duration"] * 16000) // 160)  # valid mel frames
    assert feats.dtype == np.float16 and feats.shape == ((frames + 1) // 2, 32)
    assert {"text", "duration", "sample_rate", "source"} <= set(meta)


def test_batches_from_cache_carry_encoder_features(caches):
    (batch,) = batches(caches["float16"])
    assert "audio_features" not in batch and "audio_lengths" not in batch
    feats, lengths = batch["encoder_features"], batch["encoder_lengths"]
    assert feats.dtype == torch.float32 and feats.shape == (12, int(lengths.max()), 32)
    for row, n in enumerate(lengths.tolist()):
        assert feats[row, n:].abs().sum() == 0  # zero-padded in time
    assert len(batch["texts"]) == len(batch["keys"]) == 12


def test_cached_loss_equals_live_loss(caches, tone_shards, tokenizer_dir, whisper_dir):
    """fp32 cache: each sample's loss from the cache equals live encoding (batches of one, so
    the live window is the sample's own, as the cache's)."""
    model = tiny_model(tokenizer_dir, whisper_dir)
    live = {b["keys"][0]: b for b in batches(tone_shards, max_batch_size=1)}
    cached = {b["keys"][0]: b for b in batches(caches["float32"], max_batch_size=1)}
    assert set(live) == set(cached) and len(live) == 12
    with torch.no_grad():
        for key, batch in live.items():
            torch.testing.assert_close(model(cached[key]), model(batch), rtol=1e-5, atol=1e-6)


def test_fp16_cache_batch_loss_equals_live_rounded(caches, tone_shards, tokenizer_dir, whisper_dir):
    """fp16 cache, several samples per batch: the loss equals that of live features (each
    sample encoded alone) rounded to fp16 and padded like collate pads them."""
    model = tiny_model(tokenizer_dir, whisper_dir)
    live = {b["keys"][0]: b for b in batches(tone_shards, max_batch_size=1)}
    with torch.no_grad():
        for batch in batches(caches["float16"], max_batch_size=5):
            encoded = [model.encode(live[k])["audio"] for k in batch["keys"]]
            lengths = torch.cat([n for _, n in encoded])
            feats = torch.zeros(len(encoded), int(lengths.max()), 32)
            for row, (f, n) in enumerate(encoded):
                feats[row, : int(n)] = f[0, : int(n)].half().float()
            torch.testing.assert_close(batch["encoder_lengths"], lengths)
            torch.testing.assert_close(batch["encoder_features"], feats)
            expected = model(batch, encoded={"audio": (feats, lengths)})
            torch.testing.assert_close(model(batch), expected, rtol=1e-6, atol=1e-6)


def test_pad_to_30s_cache_equals_live_batches(tmp_path, tone_shards, tokenizer_dir, whisper_dir):
    """With 30 s windows the encoder's output does not depend on the batch: live batches of
    several samples give the cached batches' features and losses. Only the last frame may
    differ a little: the log-mel of a batch's longest clip sees the STFT's end-of-row
    reflection (as when alone, which is what the cache computes), the others zero padding."""
    model = tiny_model(tokenizer_dir, whisper_dir, pad_to_30s=True)
    cache_features(tone_shards, tmp_path, model.encoder, dtype="float32", progress=False)
    cached = {tuple(b["keys"]): b for b in batches(tmp_path, max_batch_size=5)}
    live = batches(tone_shards, max_batch_size=5)
    assert len(live) == len(cached) == 3
    with torch.no_grad():
        for batch in live:
            hit = cached[tuple(batch["keys"])]
            feats, lengths = model.encode(batch)["audio"]
            torch.testing.assert_close(hit["encoder_lengths"], lengths)
            for row, n in enumerate(lengths.tolist()):
                torch.testing.assert_close(
                    hit["encoder_features"][row, : n - 1], feats[row, : n - 1], rtol=0, atol=1e-4
                )
                torch.testing.assert_close(
                    hit["encoder_features"][row, n - 1], feats[row, n - 1], rtol=0, atol=0.05
                )
            torch.testing.assert_close(model(hit), model(batch), rtol=1e-5, atol=1e-6)


def test_cache_does_not_depend_on_batch_size(tmp_path, tone_shards, whisper_dir):
    """Samples are encoded on their own window, so batch size changes no byte; with
    pad_to_30s (one window for all) likewise."""
    for pad in (False, True):
        encoder = WhisperEncoder(source=str(whisper_dir), pad_to_30s=pad)
        outs = []
        for bs in (1, 12):
            out = tmp_path / f"pad{pad}-bs{bs}"
            cache_features(tone_shards, out, encoder, batch_size=bs, progress=False)
            assert json.loads((out / "index.json").read_text())["cache"]["window"] == (
                "pad_to_30s" if pad else "per_sample"
            )
            outs.append([tar_members(p) for p in sorted(out.glob("*.tar"))])
        assert outs[0] == outs[1]


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def check(model, shards: Path, **data) -> None:
    dm = ShardDataModule(train=str(shards), **data)
    check_model_cache(model, dm.caches, sample_rate=dm.sample_rate, n_mels=dm.n_mels)


@pytest.mark.parametrize(
    ("encoder_args", "field"),
    [
        ({"pad_to_30s": True}, "window"),
        ({"dtype": "bfloat16"}, "encoder_dtype"),
        ({"source": "random", "config": tiny_whisper_config()}, "encoder.init_args.config"),
        ({"freeze": False}, "trainable"),
    ],
)
def test_cache_refuses_other_encoder_config(caches, whisper_dir, encoder_args, field):
    encoder = WhisperEncoder(**{"source": str(whisper_dir), **encoder_args})
    with pytest.raises(CacheMismatchError, match=field) as info:
        check(SimpleNamespace(encoder=encoder, video_encoder=None), caches["float16"])
    assert "data.train" in str(info.value)


def test_cache_refuses_other_weights(caches, whisper_dir):
    encoder = WhisperEncoder(source=str(whisper_dir))
    model = SimpleNamespace(encoder=encoder, video_encoder=None)
    check(model, caches["float16"])  # the same weights pass
    with torch.no_grad():
        encoder.model.layer_norm.bias.add_(1e-3)
    with pytest.raises(CacheMismatchError, match="weights_sha256"):
        check(model, caches["float16"])


# one of the other settings is a mel count its filterbank cannot fill (transformers says so)
@pytest.mark.filterwarnings("ignore:At least one mel filter has all zero values")
def test_cache_refuses_other_data_settings(caches, whisper_dir):
    model = SimpleNamespace(encoder=WhisperEncoder(source=str(whisper_dir)), video_encoder=None)
    with pytest.raises(CacheMismatchError, match="sample_rate"):
        check(model, caches["float16"], sample_rate=8000)
    with pytest.raises(CacheMismatchError, match="video_encoder"):
        check(SimpleNamespace(encoder=model.encoder, video_encoder=object()), caches["float16"])


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"noise_snrs": [None, 10, 0]}, "noise_snrs"),
        ({"keep_waveform": True}, "keep_waveform"),
        ({"require_video": True}, "require_video"),
    ],
)
def test_cache_refuses_waveform_augmentation(caches, data, field):
    with pytest.raises(ValueError, match=f"feature cache.*{field}"):
        ShardDataModule(train=str(caches["float16"]), **data)


def test_features_setting(caches, tone_shards):
    assert ShardDataModule(train=str(caches["float16"])).caches.keys() == {"train"}
    assert not ShardDataModule(train=str(tone_shards)).caches
    with pytest.raises(ValueError, match="not a feature cache"):
        ShardDataModule(train=str(caches["float16"]), val=str(tone_shards), features="cached")
    with pytest.raises(ValueError, match="without audio"):
        ShardDataModule(train=str(caches["float16"]), features="live")


def test_fit_from_cache_end_to_end(tmp_path, caches, tokenizer_dir, whisper_dir, monkeypatch):
    """mmalign fit on the cache: the encoder never runs, a checkpoint is written and loads;
    a config whose encoder differs is refused before the first step."""
    from mmalign.inference.export import load_checkpoint

    def never(*args, **kwargs):
        raise AssertionError("the encoder ran although the features are cached")

    cache = str(caches["float16"])
    config = write_fit_config(
        tmp_path, tokenizer_dir, whisper_dir, {"train": cache, "val": cache, "features": "cached"}
    )
    monkeypatch.setattr(WhisperEncoder, "forward", never)
    cli = cli_main(["fit", "--config", str(config)])
    assert cli.trainer.global_step == 2
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    model = load_checkpoint(ckpt)
    trained = {k: v for k, v in cli.model.state_dict().items() if "lora_B" in k}
    assert trained and all(
        torch.equal(model.state_dict()[k.removeprefix("model.")], v) for k, v in trained.items()
    )

    (tmp_path / "other").mkdir()
    other = write_fit_config(
        tmp_path / "other", tokenizer_dir, whisper_dir, {"train": cache}, pad_to_30s=True
    )
    with pytest.raises(CacheMismatchError, match="window"):
        cli_main(["fit", "--config", str(other)])


def test_keep_audio_cache_serves_live_and_cached(tmp_path, tone_shards, whisper_dir):
    encoder = WhisperEncoder(source=str(whisper_dir))
    cache_features(tone_shards, tmp_path, encoder, keep_audio=True, progress=False)
    (cached,) = batches(tmp_path)
    (live,) = batches(tmp_path, features="live")
    assert "encoder_features" in cached and "audio_features" not in cached
    assert "audio_features" in live and "encoder_features" not in live
    assert sorted(cached["keys"]) == sorted(live["keys"])


def test_damaged_cached_samples_are_skipped_by_reason():
    from mmalign.data.decoding import decode_cached_sample
    from mmalign.data.skips import SampleError

    meta = json.dumps({"text": "one", "duration": 0.5}).encode()
    buf = io.BytesIO()
    np.save(buf, np.zeros((3, 4), np.float16))
    sample = decode_cached_sample({"json": meta, "feats.npy": buf.getvalue()}, task="asr")
    assert sample["encoder_features"].shape == (3, 4) and sample["duration"] == 0.5
    with pytest.raises(SampleError, match="^missing features"):
        decode_cached_sample({"json": meta})
    with pytest.raises(SampleError, match="^undecodable features"):
        decode_cached_sample({"json": meta, "feats.npy": b"garbage"})
    with pytest.raises(SampleError, match="^bad json: duration"):
        decode_cached_sample({"json": b'{"text": "one"}', "feats.npy": buf.getvalue()})
