"""Reading an encoder feature cache (written by :mod:`mmalign.inference.cache`).

*Reading a cache.* :class:`mmalign.data.datamodule.ShardDataModule` finds the ``cache`` block
in the ``index.json`` beside a split's shards (``data.features: auto``, the default; ``cached``
insists on one, ``live`` reads the audio a cache kept; remote shard URLs are read live) and batches
then carry ``encoder_features [B, T', D]`` and ``encoder_lengths [B]`` instead of
``audio_features``; :meth:`mmalign.model.SpeechLLM.encode` uses them instead of running the
encoder. Before training starts, :func:`check_model_cache` refuses a cache that another encoder
(class, settings, weights, window, mel bins, sample rate, compute dtype) wrote, naming the field,
and the data module refuses settings a cache cannot honour: waveform noise
(``data.noise_snrs``), ``keep_waveform`` and ``require_video``. A trainable encoder (LoRA,
unfrozen layers, learned layer weights) is refused too: a cache means frozen.

The first version covers the audio encoder of audio-only models; audio-visual configs (with a
``model.video_encoder``) are refused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from mmalign.data.index import INDEX_NAME, read_index
from mmalign.data.shardset import ShardSet

log = logging.getLogger(__name__)

CACHE_FORMAT = "mmalign-feature-cache/1"
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}
WINDOWS = ("per_sample", "pad_to_30s")
FEATURE_MODES = ("auto", "live", "cached")
# init_args that do not change the features: where the weights came from (the weights hash
# decides) and whether the encoder is frozen (checked on its own: a cache means frozen)


class CacheMismatchError(ValueError):
    """A feature cache that does not fit the model or data settings; names the field."""


def find_cache(shard_set: ShardSet) -> dict[str, Any] | None:
    """The ``cache`` block of the ``index.json`` beside a split's shards, or None when they are
    plain shards. All shards of a split must agree (all cached by one encoder, or none)."""
    blocks: dict[Path, dict[str, Any] | None] = {}
    for url in shard_set.urls:
        if "://" in url or url.startswith("pipe:"):
            blocks.setdefault(Path(url).parent, None)
            continue
        folder = Path(url).parent
        if folder not in blocks:
            try:
                cache = read_index(folder / INDEX_NAME).get("cache")
            except (OSError, ValueError):
                cache = None
            blocks[folder] = {**cache, "path": str(folder)} if isinstance(cache, dict) else None
    found = [b for b in blocks.values() if b is not None]
    if not found:
        return None
    if len(found) != len(blocks):
        plain = [str(f) for f, b in blocks.items() if b is None]
        raise ValueError(
            f"{shard_set.spec}: some shards are a feature cache and some are not ({plain[:2]}); "
            "a split reads one or the other"
        )

    def identity(block: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in block.items() if k not in ("path", "source", "audio_kept")}

    for other in found[1:]:
        if identity(other) != identity(found[0]):
            raise ValueError(
                f"{shard_set.spec}: feature caches written by different encoders or settings "
                f"({found[0]['path']}, {other['path']})"
            )
    return {**found[0], "audio_kept": all(b.get("audio_kept") for b in found)}


def split_caches(shard_sets: dict[str, ShardSet], mode: str) -> dict[str, dict[str, Any]]:
    """Split name -> cache block for the splits read from a feature cache under ``mode``
    (``auto``: wherever there is one; ``cached``: all splits must be caches; ``live``: none,
    and cached shards must have kept their audio)."""
    if mode not in FEATURE_MODES:
        raise ValueError(f"ShardDataModule: features={mode!r} must be one of {FEATURE_MODES}")
    found = {split: find_cache(s) for split, s in shard_sets.items()}
    if mode == "cached":
        plain = [split for split, c in found.items() if c is None]
        if plain:
            raise ValueError(
                f"ShardDataModule: features='cached' but data.{plain[0]} "
                f"({shard_sets[plain[0]].spec}) is not a feature cache (no 'cache' block in its "
                "index.json); write one with mmalign cache-features"
            )
    if mode == "live":
        bare = [split for split, c in found.items() if c is not None and not c.get("audio_kept")]
        if bare:
            raise ValueError(
                f"ShardDataModule: features='live' but data.{bare[0]} "
                f"({shard_sets[bare[0]].spec}) is a feature cache without audio "
                "(written without keep_audio); give the original shards"
            )
        return {}
    return {split: c for split, c in found.items() if c is not None}


def check_cache_settings(
    caches: dict[str, dict[str, Any]],
    *,
    noise_snrs: Any,
    keep_waveform: bool,
    require_video: bool,
) -> None:
    """Refuse data settings a feature cache cannot honour, naming the setting."""
    if not caches:
        return
    splits = ", ".join(f"data.{s}" for s in caches)
    problems = []
    if noise_snrs is not None and "train" in caches:
        problems.append(
            f"noise_snrs={list(noise_snrs)!r} mixes noise into the waveform, which a feature "
            "cache no longer has (set noise_snrs: null, or train from live features)"
        )
    if keep_waveform:
        problems.append(
            "keep_waveform=true asks for waveforms, which a feature cache does not hand out "
            "(the cached encoder output replaces them: set keep_waveform: false)"
        )
    if require_video:
        problems.append("require_video=true, but a feature cache holds audio features only")
    if problems:
        raise ValueError(f"ShardDataModule: {splits} read a feature cache: " + "; ".join(problems))


# ------------------------------------------------------------------ writing a cache
