"""Each encoder/projector config in configs/asr fits two steps through the real CLI, shrunk.

The YAML is loaded as written; only what cannot run here is swapped: hub encoders and the LLM
become tiny random models of the same class, projector widths shrink, the trainer runs two CPU
steps without validation, and the data is the tone-clip shards. Everything else (class paths,
rates, windows, weighted sums, data.keep_waveform) is the config's own.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import tiny_llm_config, tiny_wavlm_config, tiny_whisper_config

from mmalign.cli import cli_main
from mmalign.inference.export import export, load_exported

ASR = Path(__file__).parents[2] / "configs" / "asr"
CONFIGS = sorted(p.name for p in ASR.glob("*.yaml"))  # every ASR config, shrunk to tiny
TINY_ENCODERS = {
    "mmalign.encoders.whisper.WhisperEncoder": tiny_whisper_config,
    "mmalign.encoders.wavlm.WavLMEncoder": tiny_wavlm_config,
}
SHRINK = {"hidden_dim": 16, "hidden_size": 16, "num_heads": 2}


def shrink_encoder(spec: dict) -> None:
    args = spec.setdefault("init_args", {})
    if spec["class_path"] in TINY_ENCODERS:
        args.update(source="random", config=TINY_ENCODERS[spec["class_path"]]())
    for key in ("first", "second"):
        if isinstance(args.get(key), dict):
            shrink_encoder(args[key])


def shrunk_config(name: str, tmp: Path, tokenizer_dir: Path, shards: Path) -> Path:
    cfg = yaml.safe_load((ASR / name).read_text())
    cfg["trainer"] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 2,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(tmp),
        "callbacks": [
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(tmp / "ckpt"), "save_last": True, "save_top_k": 0},
            }
        ],
    }
    model = cfg["model"]
    shrink_encoder(model["encoder"])
    proj = model["projector"].setdefault("init_args", {})
    proj.update({k: v for k, v in SHRINK.items() if k in proj})
    model["llm"]["init_args"].update(
        source="random", tokenizer=str(tokenizer_dir), config=tiny_llm_config(), dtype="float32"
    )
    model["max_new_tokens"] = 2
    cfg["data"].update(train=str(shards), val=None, test=None, max_batch_seconds=3.0, num_workers=0)
    path = tmp / name
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("name", CONFIGS)
def test_config_fits_two_steps(name, tmp_path, tokenizer_dir, tone_shards):
    first = (ASR / name).read_text().splitlines()[0]
    assert first.startswith(f"# mmalign fit --config configs/asr/{name}")
    cli = cli_main(
        ["fit", "--config", str(shrunk_config(name, tmp_path, tokenizer_dir, tone_shards))]
    )
    assert cli.trainer.global_step == 2
    module = cli.model
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    keys = set(ckpt["state_dict"])
    assert keys == module.trainable_names()
    assert sum(v.numel() for v in ckpt["state_dict"].values()) == module.num_trainable_parameters()
    encoder_keys = {k for k in keys if k.startswith("model.encoder.")}
    # frozen encoders never reach the checkpoint; WavLM's learned layer weights do
    assert all(k.endswith("layer_weights") for k in encoder_keys)
    assert bool(encoder_keys) == ("wavlm" in name)
    assert (
        ckpt["mmalign"]["projector"]["class_path"]
        == (yaml.safe_load((ASR / name).read_text())["model"]["projector"]["class_path"])
    )
    # the export carries trained encoder weights too, and they come back
    out = export(tmp_path / "ckpt" / "last.ckpt", tmp_path / "export")
    assert (out / "encoder.safetensors").is_file() == bool(encoder_keys)
    reloaded = load_exported(out).state_dict()
    for key in encoder_keys:
        torch.testing.assert_close(reloaded[key.removeprefix("model.")], ckpt["state_dict"][key])


def test_waveform_encoder_without_waveforms_fails_at_setup(tiny_parts):
    from conftest import tiny_wavlm_config

    from mmalign.encoders.wavlm import WavLMEncoder
    from mmalign.lightning_modules.alignment import AlignmentModule
    from mmalign.projectors.linear import LinearProjector

    _, llm = tiny_parts
    module = AlignmentModule(
        WavLMEncoder("random", config=tiny_wavlm_config()), LinearProjector, llm
    )
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(keep_waveform=False, n_mels=80))
    with pytest.raises(ValueError, match="data.keep_waveform: true"):
        module.setup("fit")
