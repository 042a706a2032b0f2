"""The shards each split of :class:`mmalign.data.datamodule.ShardDataModule` reads: one shard
spec (:func:`mmalign.data.shardset.resolve_shards`), or a mixture, a list of sources
(:class:`mmalign.data.stages.MixSource`) drawn by weight. Resolved when the data module is
built, so that a wrong path fails before any model is.
"""

from __future__ import annotations

from typing import Any

from mmalign.data.shardset import ShardSet, resolve_shards
from mmalign.data.stages import MixSource

Mixture = list[tuple[MixSource, list[str]]]
"""The sources of a mixed split, each with its shard URLs."""


def resolve_splits(
    specs: dict[str, Any],
) -> tuple[dict[str, ShardSet], dict[str, Mixture]]:
    """The shard set of every split given (None: not given) and the sources of the mixed ones."""
    shard_sets: dict[str, ShardSet] = {}
    mixes: dict[str, Mixture] = {}
    for split, spec in specs.items():
        if spec is None:
            continue
        if isinstance(spec, (list, tuple)):
            shard_sets[split], mixes[split] = resolve_mix(split, spec)
            continue
        try:
            shard_sets[split] = resolve_shards(spec)
        except (OSError, ValueError) as exn:
            raise FileNotFoundError(f"ShardDataModule {split}={spec!r}: {exn}") from exn
    return shard_sets, mixes


def resolve_mix(split: str, sources: Any) -> tuple[ShardSet, Mixture]:
    """Resolve every source of a mixture; the split's counts are the sources' sums."""
    if not sources:
        raise ValueError(f"ShardDataModule {split}: an empty list of sources")
    mix, urls, samples, seconds, expected = [], [], 0, 0.0, {}
    for i, src in enumerate(sources):
        src = MixSource(**src) if isinstance(src, dict) else src
        try:
            found = resolve_shards(src.shards)
        except (OSError, ValueError) as exn:
            raise FileNotFoundError(
                f"ShardDataModule {split}[{i}].shards={src.shards!r}: {exn}"
            ) from exn
        mix.append((src, found.urls))
        expected.update(found.expected or {})
        urls += found.urls
        samples = None if samples is None or found.samples is None else samples + found.samples
        seconds = None if seconds is None or found.seconds is None else seconds + found.seconds
    return ShardSet(f"{split} mixture", urls, samples, seconds, expected or None), mix
