"""LLMFSDPStrategy: the wrap policy read off the model, its settings, LLM activation
checkpointing with LoRA, and a real 2-process FSDP fit on CPU (gloo) that saves trainable weights
only and resumes, from sharded and from full checkpoints."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from conftest import (
    make_tiny_parts,
    tiny_batch,
    tiny_clip_config,
    tiny_llm_config,
    tiny_model_section,
    tiny_wavlm_config,
    tiny_whisper_config,
    write_tone_corpus,
)

from mmalign.lightning_modules.strategies import (
    LLMFSDPStrategy,
    encoder_layer_classes,
    llm_layer_classes,
    no_split_classes,
)

REPO = Path(__file__).resolve().parents[1]
RATE, HIDDEN, LORA_R = 2, 16, 4


def tiny_module(tokenizer_dir: Path, **kwargs: Any):
    from mmalign.lightning_modules.alignment import AlignmentModule
    from mmalign.projectors.mlp import MLPProjector

    encoder, llm = make_tiny_parts(tokenizer_dir)
    projector = functools.partial(MLPProjector, rate=RATE, hidden_dim=HIDDEN)
    return AlignmentModule(encoder, projector, llm, **kwargs)


def names(classes: set[type]) -> set[str]:
    return {c.__name__ for c in classes}


# -- the policy -----------------------------------------------------------------------------


def test_policy_picks_the_tiny_llm_decoder_layer_and_encoder_layers(tokenizer_dir):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from transformers.models.whisper.modeling_whisper import WhisperEncoderLayer

    module = tiny_module(tokenizer_dir)
    assert llm_layer_classes(module) == {LlamaDecoderLayer}
    # WhisperEncoder lists WhisperDecoderLayer too, which an encoder alone does not hold
    assert encoder_layer_classes(module) == {WhisperEncoderLayer}
    assert LLMFSDPStrategy().layer_classes(module) == {LlamaDecoderLayer}  # encoders: root unit
    both = {LlamaDecoderLayer, WhisperEncoderLayer}
    assert LLMFSDPStrategy(wrap_encoders=True).layer_classes(module) == both


def test_policy_follows_the_llm_family(tokenizer_dir):
    from mmalign.llm.load import CausalLM

    qwen = {**tiny_llm_config(), "model_type": "qwen2"}
    llm = CausalLM("random", tokenizer=str(tokenizer_dir), config=qwen)
    assert names(llm_layer_classes(llm)) == {"Qwen2DecoderLayer"}


def test_encoders_without_no_split_modules_give_their_repeated_block(tokenizer_dir):
    """transformers' WavLM and open_clip's ViT list no ``_no_split_modules``: their largest
    repeated block is taken (an audio-visual model: both encoders are read)."""
    from mmalign.encoders.clip_video import CLIPVideoEncoder
    from mmalign.encoders.wavlm import WavLMEncoder
    from mmalign.lightning_modules.alignment import AlignmentModule
    from mmalign.projectors.mlp import MLPProjector

    wavlm = WavLMEncoder("random", config=tiny_wavlm_config())
    assert not no_split_classes(wavlm)
    vision = {**tiny_clip_config()["vision_cfg"], "layers": 2}
    clip = CLIPVideoEncoder("tiny-vit", config={**tiny_clip_config(), "vision_cfg": vision})
    _, llm = make_tiny_parts(tokenizer_dir)
    projector = functools.partial(MLPProjector, rate=2, hidden_dim=8)
    module = AlignmentModule(wavlm, projector, llm, video_encoder=clip, video_projector=projector)
    assert names(encoder_layer_classes(module)) == {"WavLMEncoderLayer", "ResidualAttentionBlock"}
    assert names(LLMFSDPStrategy(wrap_encoders=True).layer_classes(module)) == {
        "LlamaDecoderLayer",
        "WavLMEncoderLayer",
        "ResidualAttentionBlock",
    }


def test_no_llm_means_no_guessing():
    with pytest.raises(ValueError, match="auto_wrap_policy"):
        LLMFSDPStrategy().layer_classes(torch.nn.Linear(2, 2))


# -- settings -------------------------------------------------------------------------------


def test_use_orig_params_is_forced_and_full_state_dict_is_the_default():
    s = LLMFSDPStrategy()
    assert s.kwargs["use_orig_params"] is True and s._state_dict_type == "full"
    with pytest.raises(ValueError, match="use_orig_params=True"):
        LLMFSDPStrategy(use_orig_params=False)


def test_hybrid_sharding_needs_no_mesh_and_takes_one_from_yaml():
    from torch.distributed.fsdp import ShardingStrategy

    s = LLMFSDPStrategy(sharding_strategy="HYBRID_SHARD")
    assert s.sharding_strategy == ShardingStrategy.HYBRID_SHARD
    s = LLMFSDPStrategy(sharding_strategy="hybrid_shard", device_mesh=[2, 8])
    assert s.kwargs["device_mesh"] == (2, 8)  # Lightning builds the mesh from a tuple only


def test_trainer_precision_clips_by_norm_through_the_root_module():
    import lightning as L

    from mmalign.lightning_modules.strategies import _RootClipFSDPPrecision

    for precision in ("bf16-true", "bf16-mixed", "32-true"):
        trainer = L.Trainer(
            strategy=LLMFSDPStrategy(),
            accelerator="cpu",
            devices=1,
            precision=precision,
            logger=False,
            enable_checkpointing=False,
        )
        plugin = trainer.strategy.precision_plugin
        assert isinstance(plugin, _RootClipFSDPPrecision) and plugin.precision == precision

    calls = []

    class Root:
        def clip_grad_norm_(self, value):
            calls.append(value)

    plugin.root = Root()
    plugin.clip_grad_by_norm(None, 0.5)
    assert calls == [0.5]


def test_strategy_names_are_registered():
    import lightning as L

    trainer = L.Trainer(
        strategy="llm_fsdp_activation_checkpointing", accelerator="cpu", devices=1, logger=False
    )
    assert isinstance(trainer.strategy, LLMFSDPStrategy)
    assert trainer.strategy.activation_checkpointing


@pytest.mark.parametrize(
    "path", sorted((REPO / "configs" / "scale").glob("fsdp_*.yaml")), ids=lambda p: p.name
)
def test_fsdp_fragments_build_their_strategy(path):
    strategy = yaml.safe_load(path.read_text())["trainer"]["strategy"]
    assert strategy["class_path"] == "mmalign.lightning_modules.strategies.LLMFSDPStrategy"
    s = LLMFSDPStrategy(**strategy["init_args"])
    assert s.activation_checkpointing and s.kwargs["use_orig_params"] is True


# -- activation checkpointing of the LLM ----------------------------------------------------


def test_llm_gradient_checkpointing_gives_the_same_lora_gradients(tokenizer_dir):
    """Non-reentrant checkpointing: the frozen layers' inputs need no grad, yet the LoRA
    weights inside them get exactly the gradients they get without checkpointing."""
    from peft import LoraConfig

    from mmalign.llm.load import CausalLM, is_checkpointing
    from mmalign.model import SpeechLLM
    from mmalign.projectors.mlp import MLPProjector

    def build(checkpointing: bool) -> SpeechLLM:
        encoder, _ = make_tiny_parts(tokenizer_dir)
        torch.manual_seed(1)
        llm = CausalLM(
            "random",
            adapter=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
            tokenizer=str(tokenizer_dir),
            config=tiny_llm_config(),
            gradient_checkpointing=checkpointing,
        )
        torch.manual_seed(2)
        return SpeechLLM(encoder, MLPProjector(encoder.dim, llm.hidden_size, rate=2), llm)

    grads = []
    for checkpointing in (False, True):
        model = build(checkpointing)
        assert is_checkpointing(model.llm.model) == checkpointing
        model.train()
        with torch.no_grad():  # LoRA B starts at zero: give the A weights a gradient too
            for name, p in model.llm.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn_like(p) * 0.1)
        model(tiny_batch()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys() and any("lora_A" in n for n in plain)
    for name, g in plain.items():
        assert checkpointed[name] is not None, name
        torch.testing.assert_close(checkpointed[name], g, msg=name)


def test_checkpointing_refuses_all_rates_with_per_rate_adapters(tokenizer_dir):
    from mmalign.lightning_modules.alignment import AlignmentModule
    from mmalign.projectors.matryoshka import MatryoshkaProjector

    encoder, llm = make_tiny_parts(tokenizer_dir)
    projector = functools.partial(MatryoshkaProjector, rates=[2, 4], hidden_dim=8)
    module = AlignmentModule(encoder, projector, llm, lora_strategy="per_rate")
    strategy = LLMFSDPStrategy(activation_checkpointing=True)
    with pytest.raises(ValueError, match="rate_sampling 'all'"):
        strategy._setup_checkpointing(module)


# -- a real 2-process FSDP run on CPU -------------------------------------------------------


class DumpTrainable(L.Callback):
    """Used by the subprocesses (as ``test_strategies.DumpTrainable``): once the checkpoint
    is restored, rank 0 writes every trainable weight, gathered from the FSDP shards."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(trainer.strategy.model, writeback=False):
            weights = {
                n.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
                for n, p in module.named_parameters()
                if p.requires_grad
            }
        if trainer.is_global_zero:
            torch.save(weights, self.path)


def expected_trainable() -> int:
    enc, llm = tiny_whisper_config(), tiny_llm_config()
    d, h = enc["d_model"], llm["hidden_size"]
    kv = h // llm["num_attention_heads"] * llm["num_key_value_heads"]
    projector = (d * RATE * HIDDEN + HIDDEN) + (HIDDEN * h + h) + 2 * h
    lora = llm["num_hidden_layers"] * (LORA_R * (h + h) + LORA_R * (h + kv))
    return projector + lora


@pytest.fixture(scope="module")
def three_shards(tmp_path_factory) -> Path:
    from mmalign.data.shards import prepare

    root = tmp_path_factory.mktemp("fsdp_shards")
    manifest = write_tone_corpus(root / "raw", 12)
    assert prepare(manifest, root / "shards", shard_max_count=4, progress=False).ok
    return root / "shards"


def fsdp_config(
    tmp: Path, tokenizer_dir: Path, shards: Path, dump: Path | None = None, name: str = "config"
) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 2,
            "max_steps": 4,
            "val_check_interval": 4,
            "check_val_every_n_epoch": None,
            "limit_val_batches": 1.0,  # all of it: 8 vs 4 clips, so a rank gets pad batches
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": False,
            "default_root_dir": str(tmp / "run"),
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(tmp / "ckpt"), "save_last": True},
                },
                *(
                    [
                        {
                            "class_path": "test_strategies.DumpTrainable",
                            "init_args": {"path": str(dump)},
                        }
                    ]
                    if dump
                    else []
                ),
            ],
        },
        "model": {
            **tiny_model_section(tokenizer_dir, RATE, HIDDEN, LORA_R),
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2}},
            "max_new_tokens": 3,
        },
        "data": {"train": str(shards), "val": str(shards), "max_batch_seconds": 2.0},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def torchrun_fit(config: Path, *args: str, timeout: float = 300) -> str:
    """``torchrun --nproc-per-node 2 -m mmalign fit --config <config> <args>``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(29700 + os.getpid() % 1000),
        "-m",
        "mmalign",
        "fit",
        "--config",
        str(config),
        *args,
    ]
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"timed out (a hang?):\n{str(e.stdout)[-4000:]}") from None
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    return out


def test_fsdp_two_cpu_processes_save_trainable_weights_only_and_resume(
    tmp_path, tokenizer_dir, three_shards
):
    """2 processes, gloo: FSDP units, LLM activation checkpointing and clipping by norm; a
    sharded checkpoint of trainable weights only resumes (into a full one), which resumes too.
    About 40 s on two cores."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    config = fsdp_config(tmp_path, tokenizer_dir, three_shards)
    strategy = [
        "--trainer.strategy.class_path=mmalign.lightning_modules.strategies.LLMFSDPStrategy",
        "--trainer.strategy.init_args.activation_checkpointing=true",
        "--trainer.strategy.init_args.wrap_encoders=true",  # Whisper runs once a step: safe
        "--trainer.gradient_clip_val=1.0",
    ]
    out = torchrun_fit(config, *strategy, "--trainer.strategy.init_args.state_dict_type=sharded")
    assert "FSDP units ['LlamaDecoderLayer', 'WhisperEncoderLayer']" in out, out[-3000:]
    assert "activation checkpointing ['LlamaDecoderLayer']" in out
    assert "val/wer = " in out and "on 12 utterances" in out  # uneven ranks padded, no hang
    sharded = tmp_path / "ckpt" / "last.ckpt"
    assert sharded.is_dir()
    module = tiny_module(tokenizer_dir)
    trainable = module.trainable_names()
    stored = {
        k.removeprefix("model.")
        for k in FileSystemReader(sharded).read_metadata().state_dict_metadata
        if k.startswith("model.")
    }
    assert stored == trainable, (
        "an FSDP checkpoint must hold exactly the trainable weights; if LoRA keys are missing, "
        "AlignmentModule.trainable_names() still has FSDP's '_fsdp_wrapped_module.' in its names"
    )
    dcp_to_torch_save(sharded, tmp_path / "step4.pt")
    step4 = torch.load(tmp_path / "step4.pt", weights_only=True)["model"]

    # resume from the shards (trainable keys only) into full checkpoints
    (tmp_path / "ckpt" / "last.ckpt").rename(tmp_path / "step4.ckpt")
    dump = tmp_path / "restored.pt"
    with_dump = fsdp_config(tmp_path, tokenizer_dir, three_shards, dump, name="dump")
    torchrun_fit(
        with_dump, *strategy, "--trainer.max_steps=6", "--ckpt_path", str(tmp_path / "step4.ckpt")
    )
    restored = torch.load(dump, weights_only=True)
    assert restored.keys() == {k for k in trainable if k in dict(module.named_parameters())}
    for k, v in restored.items():
        torch.testing.assert_close(v, step4[k], rtol=0, atol=0, msg=k)

    last = tmp_path / "ckpt" / "last.ckpt"
    full = torch.load(last, weights_only=True)
    assert full["global_step"] == 6 and set(full["state_dict"]) == trainable
    assert sum(v.numel() for v in full["state_dict"].values()) == expected_trainable()
    assert full["optimizer_states"][0]["state"]  # the gathered optimizer state

    # and a full checkpoint resumes (read with weights_only=True, its keys checked)
    torchrun_fit(with_dump, *strategy, "--trainer.max_steps=7", "--ckpt_path", str(last))
    restored = torch.load(dump, weights_only=True)
    for k, v in restored.items():
        torch.testing.assert_close(v, full["state_dict"][k], rtol=0, atol=0, msg=k)
    assert torch.load(last, weights_only=True)["global_step"] == 7
