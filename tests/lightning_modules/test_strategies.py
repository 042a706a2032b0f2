"""LLMFSDPStrategy (FSDP2): the units read off the model, its settings, LLM activation
checkpointing with LoRA, and real 2-process FSDP fits on CPU (gloo): the same losses and weights
as one process, and trainable-only checkpoints that resume exactly, from sharded and full ones."""

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

from mmalign.lightning_modules.fsdp_units import (
    encoder_layer_classes,
    llm_layer_classes,
    no_split_classes,
)
from mmalign.lightning_modules.strategies import LLMFSDPStrategy

REPO = Path(__file__).resolve().parents[2]
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


def test_full_state_dict_is_the_default_and_sharding_names_are_checked():
    s = LLMFSDPStrategy()
    assert s.state_dict_type == "full" and s.sharding_strategy == "FULL_SHARD"
    assert LLMFSDPStrategy(sharding_strategy="shard_grad_op").sharding_strategy == "SHARD_GRAD_OP"
    with pytest.raises(ValueError, match="strategy: ddp"):
        LLMFSDPStrategy(sharding_strategy="NO_SHARD")
    with pytest.raises(ValueError, match="HYBRID_SHARD only"):
        LLMFSDPStrategy(device_mesh=[2, 8])


def test_hybrid_sharding_needs_no_mesh_and_takes_one_from_yaml():
    s = LLMFSDPStrategy(sharding_strategy="HYBRID_SHARD")
    assert s.sharding_strategy == "HYBRID_SHARD" and s.device_mesh_shape is None
    s = LLMFSDPStrategy(sharding_strategy="hybrid_shard", device_mesh=[2, 8])
    assert s.device_mesh_shape == (2, 8)  # [replicas, shards]: Lightning's 2-D mesh


def test_trainer_precision_clips_dtensor_gradients_by_their_global_norm(tmp_path):
    """Lightning's own precision plugins clip by norm (its FSDP1 plugin refused to): their
    ``torch.nn.utils.clip_grad_norm_`` sees the sharded (DTensor) gradients of an FSDP2 module
    and clips them by the norm over all shards."""
    import torch.distributed as dist
    from lightning.pytorch.plugins.precision import FSDPPrecision
    from torch.distributed.fsdp import fully_shard

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
        assert not isinstance(plugin, FSDPPrecision) and plugin.precision == precision

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        layer = fully_shard(torch.nn.Linear(4, 4))
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
        layer(torch.ones(2, 4)).pow(2).sum().backward()
        before = torch.nn.utils.get_total_norm([p.grad for p in layer.parameters()])
        assert type(layer.weight.grad).__name__ == "DTensor" and before.full_tensor() > 0.5
        plugin.clip_gradients(optimizer, 0.5, "norm")
        after = torch.nn.utils.get_total_norm([p.grad for p in layer.parameters()])
        torch.testing.assert_close(after.full_tensor(), torch.tensor(0.5))
    finally:
        dist.destroy_process_group()


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
    assert s.activation_checkpointing and s.state_dict_type == "full"


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
    is restored, rank 0 writes every trainable weight and the optimizer state (keyed by
    parameter name), gathered from the FSDP shards."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        weights = gathered_trainable(module)  # collectives: every rank
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optimizer = get_optimizer_state_dict(module, trainer.optimizers[0], options=options)
        if trainer.is_global_zero:
            torch.save({"weights": weights, "optimizer": optimizer}, self.path)


def gathered_trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter, whole (``full_tensor`` of an FSDP2 shard)."""
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in module.named_parameters()
        if p.requires_grad
    }


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


def torchrun(*args: str, nproc: int = 2, timeout: float = 300) -> str:
    """``torchrun --nproc-per-node <nproc> <args>``, with the tests importable."""
    env = dict(os.environ)
    tests = [str(REPO / "tests" / "lightning_modules"), str(REPO / "tests"), str(REPO)]
    env["PYTHONPATH"] = os.pathsep.join([*tests, env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    port = str(29700 + os.getpid() % 1000)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    try:
        proc = subprocess.run(
            [*cmd, "--master-port", port, *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"timed out (a hang?):\n{str(e.stdout)[-4000:]}") from None
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    return out


def torchrun_fit(config: Path, *args: str, nproc: int = 2) -> str:
    """``torchrun --nproc-per-node <nproc> -m mmalign fit --config <config> <args>``."""
    return torchrun("-m", "mmalign", "fit", "--config", str(config), *args, nproc=nproc)


def test_fsdp_two_cpu_processes_save_trainable_weights_only_and_resume(
    tmp_path, tokenizer_dir, three_shards
):
    """2 processes, gloo: FSDP units, LLM activation checkpointing and clipping by norm; a
    sharded checkpoint of trainable weights only resumes (into a full one), which resumes too,
    under FSDP and in one process: weights and optimizer state exactly as saved. About 45 s
    on two cores."""
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
        "an FSDP checkpoint must hold exactly the trainable weights (and projector and offset "
        "buffers): AlignmentModule.trainable_names()"
    )
    dcp_to_torch_save(sharded, tmp_path / "step4.pt")
    step4_all = torch.load(tmp_path / "step4.pt", weights_only=True)
    step4 = step4_all["model"]

    # resume from the shards (trainable keys only) into full checkpoints
    (tmp_path / "ckpt" / "last.ckpt").rename(tmp_path / "step4.ckpt")
    dump = tmp_path / "restored.pt"
    with_dump = fsdp_config(tmp_path, tokenizer_dir, three_shards, dump, name="dump")
    torchrun_fit(
        with_dump, *strategy, "--trainer.max_steps=6", "--ckpt_path", str(tmp_path / "step4.ckpt")
    )
    restored = torch.load(dump, weights_only=True)
    assert restored["weights"].keys() == {
        k for k in trainable if k in dict(module.named_parameters())
    }
    for k, v in restored["weights"].items():
        torch.testing.assert_close(v, step4[k], rtol=0, atol=0, msg=k)
    # and the optimizer state (AdamW's moments and steps), exactly
    stored_optimizer = step4_all["optimizer_0"]
    assert restored["optimizer"]["state"].keys() == stored_optimizer["state"].keys()
    torch.testing.assert_close(
        restored["optimizer"]["state"], stored_optimizer["state"], rtol=0, atol=0
    )

    last = tmp_path / "ckpt" / "last.ckpt"
    full = torch.load(last, weights_only=True)
    assert full["global_step"] == 6 and set(full["state_dict"]) == trainable
    assert sum(v.numel() for v in full["state_dict"].values()) == expected_trainable()
    assert full["optimizer_states"][0]["state"]  # the gathered optimizer state

    # and a full checkpoint resumes (read with weights_only=True, its keys checked)
    torchrun_fit(with_dump, *strategy, "--trainer.max_steps=7", "--ckpt_path", str(last))
    restored = torch.load(dump, weights_only=True)
    for k, v in restored["weights"].items():
        torch.testing.assert_close(v, full["state_dict"][k], rtol=0, atol=0, msg=k)
    # the full file numbers parameters as one process does: the optimizer's own order
    order = restored["optimizer"]["param_groups"][0]["params"]
    by_index = full["optimizer_states"][0]["state"]
    assert set(by_index) == set(range(len(order)))
    by_name = {order[i]: v for i, v in by_index.items()}
    torch.testing.assert_close(restored["optimizer"]["state"], by_name, rtol=0, atol=0)
    assert torch.load(last, weights_only=True)["global_step"] == 7

    # which is a single-process checkpoint: one process without FSDP resumes from it
    full = torch.load(last, weights_only=True)
    torchrun_fit(
        with_dump, "--trainer.devices=1", "--trainer.max_steps=8", "--ckpt_path", str(last), nproc=1
    )
    restored = torch.load(dump, weights_only=True)
    for k, v in restored["weights"].items():
        torch.testing.assert_close(v, full["state_dict"][k], rtol=0, atol=0, msg=k)
    by_index = full["optimizer_states"][0]["state"]
    by_name = {order[i]: v for i, v in by_index.items()}
    torch.testing.assert_close(restored["optimizer"]["state"], by_name, rtol=0, atol=0)
    assert torch.load(last, weights_only=True)["global_step"] == 8


# -- 2 processes = 1 process ----------------------------------------------------------------

CLIP, STEPS = 0.05, 3


class RecordLosses(L.Callback):
    """Each micro-batch's loss (its token sum, undoing Lightning's division by accumulation)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]) * trainer.accumulate_grad_batches)


def micro_batches() -> list[dict]:
    """Six micro-batches of 1-3 utterances (unequal token counts): 3 steps of 2."""
    torch.manual_seed(3)
    return [tiny_batch(n=1 + i % 3) for i in range(2 * STEPS)]


def train_steps(
    tokenizer_dir: Path, batches: list[dict], **trainer_kwargs: Any
) -> tuple[list[float], Any]:
    """(losses, module) after ``STEPS`` optimizer steps of SGD with momentum over ``batches``
    in their order: accumulated 2 at a time in one process, or one per rank."""
    from torch.utils.data import DataLoader

    module = tiny_module(
        tokenizer_dir, optimizer=functools.partial(torch.optim.SGD, lr=0.5, momentum=0.9)
    )
    record = RecordLosses()
    trainer_kwargs.setdefault("accumulate_grad_batches", 2)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
        use_distributed_sampler=False,  # Lightning's would shuffle
        **trainer_kwargs,
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return record.losses, module


def two_process_run(tokenizer_dir: Path, out: Path) -> None:
    """The torchrun side of :func:`test_two_fsdp_processes_match_one_process`: rank r takes
    micro-batches r, r + 2, r + 4."""
    import torch.distributed as dist

    strategy = LLMFSDPStrategy(activation_checkpointing=True, wrap_encoders=True)
    losses, module = train_steps(
        tokenizer_dir,
        micro_batches()[int(os.environ["RANK"]) :: 2],
        devices=2,
        strategy=strategy,
        accumulate_grad_batches=1,
        gradient_clip_val=CLIP,
    )
    weights = gathered_trainable(module)
    every: list[Any] = [None, None]
    dist.all_gather_object(every, losses)
    if dist.get_rank() == 0:
        interleaved = [loss for step in zip(*every, strict=True) for loss in step]
        torch.save({"losses": interleaved, "weights": weights}, out / "fsdp.pt")


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_two_fsdp_processes_match_one_process(tmp_path, tokenizer_dir):
    """2 processes under LLMFSDPStrategy (units, activation checkpointing, clipping by norm)
    give each micro-batch the loss one process gives it, and end on the same weights: the
    sharded model, its token-mean gradient and the global clipping norm are those of one
    process. Clipping is engaged: without it one process ends elsewhere."""
    torchrun(__file__, "two_process_run", str(tokenizer_dir), str(tmp_path))
    fsdp = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    losses, module = train_steps(tokenizer_dir, micro_batches(), gradient_clip_val=CLIP)
    _, unclipped = train_steps(tokenizer_dir, micro_batches())
    assert len(losses) == 2 * STEPS
    torch.testing.assert_close(fsdp["losses"], losses, rtol=1e-4, atol=1e-5)
    weights = gathered_trainable(module)
    assert fsdp["weights"].keys() == weights.keys()
    for name, value in weights.items():
        torch.testing.assert_close(fsdp["weights"][name], value, rtol=1e-4, atol=1e-6, msg=name)
    moved = dict(unclipped.named_parameters())
    assert any(not torch.allclose(moved[n], v, atol=1e-5) for n, v in weights.items())


if __name__ == "__main__":  # under torchrun: `test_strategies.py <function> <args>`
    globals()[sys.argv[1]](*map(Path, sys.argv[2:]))
