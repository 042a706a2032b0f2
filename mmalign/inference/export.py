"""Export a training checkpoint to a directory that loads without Lightning, and load it back.

Every weight file is safetensors (loading never unpickles), and checkpoints are read with
``weights_only=True``. Layout: ``adapter/`` (peft's own format), ``projector.safetensors``,
``encoder.safetensors`` (only when the encoder has trainable weights), the same two with a
``video_`` prefix for an audio-visual model, and ``mmalign.json`` (encoder, projector and LLM specs
plus prompts). An adapter whose initialisation moved part of the frozen weights into it
(``pissa_niter_<n>``, ``corda``, ``lora_ga``; see :mod:`mmalign.llm.offsets`) is written as the
equivalent plain LoRA of twice the rank on the original weights, so it loads like any other.

A multi-rate (Matryoshka) model keeps every adapter: peft's ``save_pretrained`` writes the
``default`` (shared) adapter at ``adapter/`` and each other one in ``adapter/<name>/`` (e.g.
``adapter/rate8/``); ``mmalign.json`` lists them under ``adapters`` with the ``lora_strategy``,
and :func:`load_exported` loads them all and activates those of the projector's rate. Task
adapters (``task_adapters``) are saved the same way, the task map in ``mmalign.json``; a
prompt-aware scaling head goes to ``prompt_scaler.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from mmalign.components import build, spec
from mmalign.llm.load import CausalLM
from mmalign.llm.lora import SHARED_ADAPTER
from mmalign.llm.offsets import convert_export, offset_buffer_names, sync_base_offsets
from mmalign.llm.tuners import config_from_dict
from mmalign.model import SpeechLLM

CONFIG_NAME = "mmalign.json"
CKPT_KEY = "mmalign"
SCALER_FILE = "prompt_scaler.safetensors"
CTC_FILE = "ctc.safetensors"


def describe(model: SpeechLLM) -> dict[str, Any]:
    """Everything needed to rebuild ``model`` (weights aside), as plain JSON types."""
    adapter = model.llm.adapter
    video = {}
    if model.video_encoder is not None and model.video_projector is not None:
        video = {
            "video_encoder": spec(model.video_encoder),
            "video_projector": spec(model.video_projector),
        }
    return _jsonable(
        {
            "encoder": spec(model.encoder),
            "projector": spec(model.projector),
            **video,
            "task_modalities": {t: list(m) for t, m in model.task_modalities.items()},
            "llm": spec(model.llm),
            "llm_architecture": model.llm.architecture(),
            "adapter": adapter.to_dict() if adapter is not None else None,
            "adapters": list(model.llm.model.peft_config) if adapter is not None else [],
            "lora_strategy": model.lora_strategy,
            "prompts": model.prompt.prompts,
            "system_prompt": model.prompt.system_prompt,
            **{k: getattr(model, k) for k in SpeechLLM.ADAPTER_OPTIONS},
            "ctc": model.ctc is not None,
            "ctc_shrink": model.ctc_shrink,
            "ctc_embed": model.ctc_embed,
        }
    )


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


def build_from_description(
    desc: dict[str, Any], with_adapter: bool = True, llm: str | None = None
) -> SpeechLLM:
    """Rebuild a model; ``llm`` puts another LLM (hub id, folder, GGUF, ``pinned:``) under the
    trained projector and adapter, which must have the same architecture (adapter transfer,
    e.g. train on an instruct model and decode with its base model)."""
    encoder = build(desc["encoder"])
    adapter = config_from_dict(desc["adapter"]) if with_adapter and desc.get("adapter") else None
    llm_spec = desc["llm"]
    if llm is not None:
        llm_spec = {**llm_spec, "init_args": {**llm_spec["init_args"], "source": llm}}
        if llm_spec["init_args"].get("config") is not None and not llm.startswith("random"):
            llm_spec["init_args"]["config"] = None
    llm_model = build(llm_spec, adapter=adapter)
    trained_on = desc.get("llm_architecture")
    if llm is not None and trained_on is not None:
        now = llm_model.architecture()
        diff = {k: (v, now.get(k)) for k, v in trained_on.items() if now.get(k) != v}
        if diff:
            fields = ", ".join(f"{k} ({a} vs {b})" for k, (a, b) in diff.items())
            raise ValueError(
                f"the adapter and projector were trained on {desc['llm']['init_args']['source']}"
                f" but {llm} differs in {fields}; only an LLM of the same architecture and "
                "width can take them"
            )
    llm = llm_model
    projector = build(desc["projector"], encoder.dim, llm.hidden_size)
    video_encoder = video_projector = None
    if desc.get("video_encoder"):
        video_encoder = build(desc["video_encoder"])
        video_projector = build(desc["video_projector"], video_encoder.dim, llm.hidden_size)
    return SpeechLLM(
        encoder,
        projector,
        llm,
        desc.get("prompts"),
        desc.get("system_prompt"),
        lora_strategy=desc.get("lora_strategy", "shared"),
        video_encoder=video_encoder,
        video_projector=video_projector,
        task_modalities=desc.get("task_modalities"),
        **{k: desc[k] for k in SpeechLLM.ADAPTER_OPTIONS if k in desc},
        ctc=bool(desc.get("ctc", False)),
        ctc_shrink=bool(desc.get("ctc_shrink", False)),
        ctc_embed=bool(desc.get("ctc_embed", False)),
    )


def load_checkpoint(
    path: str | Path, map_location: str = "cpu", llm: str | None = None
) -> SpeechLLM:
    """Rebuild a SpeechLLM from a Lightning checkpoint written by AlignmentModule (``llm``:
    another LLM of the same architecture under the trained parts)."""
    from mmalign.checkpoint_io import load_checkpoint_file

    ckpt = load_checkpoint_file(path, map_location=map_location)  # weights_only=True
    if CKPT_KEY not in ckpt:
        raise KeyError(f"{path} has no '{CKPT_KEY}' entry; was it written by mmalign fit?")
    model = build_from_description(ckpt[CKPT_KEY], llm=llm)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if wrong:
        raise ValueError(
            f"{path}: trained weights do not fit the model ({wrong[0]}: "
            f"{tuple(state[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)}); "
            "was it trained on an LLM of another size?"
        )
    result = model.load_state_dict(state, strict=False)
    sync_base_offsets(model.llm)  # frozen weights minus the adapter's init offsets
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    trainable |= {f"llm.{n}" for n in offset_buffer_names(model.llm)}
    missing = [k for k in result.missing_keys if k in trainable]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"{path}: missing trainable keys {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    return model


def export(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write adapter (peft), projector (+ trainable encoder weights) and config to ``out_dir``."""
    model = load_checkpoint(checkpoint)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model.llm.adapter is not None:
        model.llm.model.save_pretrained(out / "adapter", safe_serialization=True)
        convert_export(model.llm.model, out / "adapter")  # a plain LoRA on the original weights
    for prefix, encoder, projector in _parts(model):
        save_file(
            {k: v.contiguous() for k, v in projector.state_dict().items()},
            out / f"{prefix}projector.safetensors",
        )
        encoder_trained = trainable_state(encoder)
        if encoder_trained:  # e.g. WavLM layer weights or encoder LoRA
            save_file(encoder_trained, out / f"{prefix}encoder.safetensors")
    if model.prompt_scaler is not None:  # prompt-aware adapter scaling head
        save_file(_contiguous(model.prompt_scaler), out / SCALER_FILE)
    desc = describe(model)
    if model.ctc is not None and model.ctc_shrink:  # decoding reads the head: it picks frames
        save_file(_contiguous(model.ctc), out / CTC_FILE)
    else:
        desc["ctc"] = False  # the CTC head only trained the projector; decoding never reads it
    desc["checkpoint"] = str(checkpoint)
    (out / CONFIG_NAME).write_text(json.dumps(desc, indent=2))
    return out


def load_exported(path: str | Path, device: str = "cpu", llm: str | None = None) -> SpeechLLM:
    """Load an exported directory: base LLM + peft adapter + projector weights."""
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: not an mmalign export directory")
    desc = json.loads(cfg_file.read_text())
    model = build_from_description(desc, with_adapter=False, llm=llm)
    if (path / "adapter").is_dir():
        llm: CausalLM = model.llm
        names = desc.get("adapters") or [SHARED_ADAPTER]

        def where(name: str) -> Path:  # peft's save_pretrained layout
            return path / "adapter" if name == SHARED_ADAPTER else path / "adapter" / name

        for name in names:  # peft would fall back to a pickled adapter_model.bin
            if not (where(name) / "adapter_model.safetensors").is_file():
                raise FileNotFoundError(
                    f"{where(name) / 'adapter_model.safetensors'} missing: exports load adapters "
                    "from safetensors only, never from pickled .bin files"
                )
        llm.model = PeftModel.from_pretrained(llm.model, where(names[0]), adapter_name=names[0])
        for name in names[1:]:
            llm.model.load_adapter(where(name), adapter_name=name)
        llm.adapter = llm.model.peft_config[names[0]]
        model.activate_rate()
    if model.prompt_scaler is not None:
        model.prompt_scaler.load_state_dict(load_file(path / SCALER_FILE))
    if model.ctc is not None:
        model.ctc.load_state_dict(load_file(path / CTC_FILE))
    for prefix, encoder, projector in _parts(model):
        projector.load_state_dict(load_file(path / f"{prefix}projector.safetensors"))
        expected = set(trainable_state(encoder))
        if not expected:
            continue
        enc_file = path / f"{prefix}encoder.safetensors"
        if not enc_file.is_file():
            raise FileNotFoundError(f"{enc_file} missing: the encoder has trainable weights")
        result = encoder.load_state_dict(load_file(enc_file), strict=False)
        missing = expected & set(result.missing_keys)
        if missing or result.unexpected_keys:
            unexpected = result.unexpected_keys[:5]
            missing_list = sorted(missing)[:5]
            raise RuntimeError(f"{enc_file}: missing {missing_list}, unexpected {unexpected}")
    return model.to(device).eval()


def _parts(model: SpeechLLM) -> list[tuple[str, torch.nn.Module, torch.nn.Module]]:
    """(file prefix, encoder, projector) of each branch: ``""`` main, ``video_`` video."""
    parts: list[tuple[str, torch.nn.Module, torch.nn.Module]] = [
        ("", model.encoder, model.projector)
    ]
    if model.video_encoder is not None and model.video_projector is not None:
        parts.append(("video_", model.video_encoder, model.video_projector))
    return parts


def _contiguous(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in module.state_dict().items()}


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The part of a module's state a frozen-weights export must carry."""
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    return {k: v.detach().contiguous() for k, v in module.state_dict().items() if k in names}
