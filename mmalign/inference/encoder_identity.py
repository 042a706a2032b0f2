"""What made a feature cache: an encoder's identity (class, settings, weights hash, window,
mel bins, rate, dtype) and the check that refuses a cache another encoder wrote, naming the field.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

import torch

from mmalign.components import spec
from mmalign.data.cache import CACHE_FORMAT, STORAGE_DTYPES, CacheMismatchError

log = logging.getLogger(__name__)

_IGNORED_INIT_ARGS = ("source", "freeze")


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict (sorted names, dtypes, shapes and bytes), so two random
    initialisations or two checkpoints of one architecture are told apart."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def window_policy(encoder: torch.nn.Module) -> str:
    """``pad_to_30s`` for a Whisper encoder on 30 s windows, else ``per_sample``."""
    return "pad_to_30s" if getattr(encoder, "pad_to_30s", False) else "per_sample"


def encoder_dtype(encoder: torch.nn.Module) -> str:
    """The compute dtype of an encoder's weights (``float32``, ``bfloat16`` ...)."""
    for p in encoder.parameters():
        if p.is_floating_point():
            return str(p.dtype).removeprefix("torch.")
    return "float32"


def _jsonable(value: Any) -> Any:
    return json.loads(
        json.dumps(value, default=lambda o: sorted(o) if isinstance(o, set) else str(o))
    )


def describe_encoder(
    encoder: Any, sample_rate: int, n_mels: int | None, weights: str | None = None
) -> dict[str, Any]:
    """The ``cache`` block fields that identify what produced the features (no storage info)."""
    return {
        "encoder": _jsonable(spec(encoder)),
        "weights_sha256": weights if weights is not None else weights_sha256(encoder),
        "window": window_policy(encoder),
        "n_mels": n_mels,
        "sample_rate": int(sample_rate),
        "encoder_dtype": encoder_dtype(encoder),
        "dim": int(encoder.dim),
        "frame_rate": float(encoder.frame_rate),
        "modality": str(getattr(encoder, "modality", "audio")),
    }


def trainable_problem(encoder: Any) -> str | None:
    """Why ``encoder`` cannot be replaced by a cache (it trains), or None."""
    trained = [n for n, p in encoder.named_parameters() if p.requires_grad]
    if not getattr(encoder, "frozen", False) or trained:
        what = f"trainable parameters {trained[:3]}" if trained else "freeze: false"
        return (
            f"{type(encoder).__name__} is trainable ({what}: LoRA, unfrozen layers or learned "
            "layer weights), so its features change while training and a feature cache "
            "cannot stand in for it; freeze the encoder or train from live features "
            "(data.features: live on shards with audio)"
        )
    return None


# ------------------------------------------------------------------ checking a cache


def check_cache(
    cache: dict[str, Any],
    encoder: Any,
    *,
    sample_rate: int,
    n_mels: int | None,
    where: str = "feature cache",
    weights: Callable[[], str] | None = None,
) -> None:
    """Raise :class:`CacheMismatchError` naming the first field in which ``cache`` (an index's
    ``cache`` block) differs from what ``encoder`` and the data settings would compute.

    The weights are hashed last, only when everything else agrees; ``weights`` returns the
    encoder's :func:`weights_sha256` (e.g. remembered across splits).
    """

    def refuse(field_name: str, cached: Any, wanted: Any, hint: str = "") -> None:
        raise CacheMismatchError(
            f"{where} does not match the model config: {field_name} differs (cache: "
            f"{cached!r}, config: {wanted!r}){hint}; rerun mmalign cache-features with this "
            "config, or train from live features (data.features: live)"
        )

    if cache.get("format") != CACHE_FORMAT:
        refuse("format", cache.get("format"), CACHE_FORMAT)
    problem = trainable_problem(encoder)
    if problem:
        raise CacheMismatchError(f"{where}: {problem}")
    if str(getattr(encoder, "modality", "audio")) != cache.get("modality", "audio"):
        refuse("modality", cache.get("modality"), getattr(encoder, "modality", "audio"))
    mine = _jsonable(spec(encoder))
    theirs = cache.get("encoder") or {}
    if theirs.get("class_path") != mine["class_path"]:
        refuse("encoder.class_path", theirs.get("class_path"), mine["class_path"])
    if cache.get("window") != window_policy(encoder):
        refuse(
            "window",
            cache.get("window"),
            window_policy(encoder),
            " (Whisper's pad_to_30s decides the window)",
        )
    encoder_mels = getattr(encoder, "n_mels", None)
    for label, value in (("encoder", encoder_mels), ("data.n_mels", n_mels)):
        if encoder_mels is not None and value is not None and cache.get("n_mels") != value:
            refuse("n_mels", cache.get("n_mels"), value, f" ({label})")
    if cache.get("sample_rate") != sample_rate:
        refuse("sample_rate", cache.get("sample_rate"), sample_rate, " (data.sample_rate)")
    if cache.get("encoder_dtype") != encoder_dtype(encoder):
        refuse(
            "encoder_dtype",
            cache.get("encoder_dtype"),
            encoder_dtype(encoder),
            " (the encoder's compute dtype, model.encoder.init_args.dtype)",
        )
    if cache.get("dtype") not in STORAGE_DTYPES:
        refuse("dtype", cache.get("dtype"), f"one of {sorted(STORAGE_DTYPES)}")
    args_cached, args_mine = theirs.get("init_args") or {}, mine.get("init_args") or {}
    for key in sorted(set(args_cached) | set(args_mine)):
        if key not in _IGNORED_INIT_ARGS and args_cached.get(key) != args_mine.get(key):
            refuse(f"encoder.init_args.{key}", args_cached.get(key), args_mine.get(key))
    if cache.get("dim") != int(encoder.dim):
        refuse("dim", cache.get("dim"), int(encoder.dim))
    digest = weights() if weights is not None else weights_sha256(encoder)
    if cache.get("weights_sha256") != digest:
        refuse(
            "weights_sha256",
            cache.get("weights_sha256"),
            digest,
            " (other weights: another checkpoint or random initialisation)",
        )


def check_model_cache(
    model: Any, caches: dict[str, dict[str, Any]], *, sample_rate: int, n_mels: int | None
) -> None:
    """Check every cached split (name -> its ``cache`` block, as
    ``ShardDataModule.caches``) against a :class:`mmalign.model.SpeechLLM`; raises
    :class:`CacheMismatchError`. Audio-visual models are refused (the cache holds audio)."""
    if not caches:
        return
    splits = ", ".join(f"data.{s}" for s in caches)
    if getattr(model, "video_encoder", None) is not None:
        raise CacheMismatchError(
            f"{splits} read a feature cache, which holds audio encoder features only, but the "
            "model has a video_encoder (audio-visual); train it from live features "
            "(data.features: live)"
        )
    hashed: list[str] = []

    def weights() -> str:  # hashed once, however many splits are cached
        if not hashed:
            hashed.append(weights_sha256(model.encoder))
        return hashed[0]

    for split, cache in caches.items():
        where = f"feature cache of data.{split} ({cache.get('path', '?')})"
        check_cache(
            cache,
            model.encoder,
            sample_rate=sample_rate,
            n_mels=n_mels,
            where=where,
            weights=weights,
        )
