"""Which shard files make a split: :func:`resolve_shards` turns a folder, an ``index.json``, a
``.tar``, or a glob or brace pattern into a :class:`ShardSet` (the URLs, and the sample counts
when an index gives them). An index is checked against its shards here
(:func:`mmalign.data.index.check_shards`).
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

from webdataset.shardlists import expand_urls

from mmalign.data.index import INDEX_NAME, check_shards, read_index
from mmalign.data.writer import PARTIAL_SUFFIX


@dataclass
class ShardSet:
    """Resolved shard URLs of one split, with sample counts when an index provides them
    (``expected``: the samples each listed shard should hold)."""

    spec: str
    urls: list[str]
    samples: int | None = None
    seconds: float | None = None
    expected: dict[str, int] | None = None


def _is_remote(spec: str) -> bool:
    return "://" in spec or spec.startswith("pipe:")


def _from_index(index_path: Path) -> ShardSet:
    expected, index = check_shards(index_path)
    shards = index["shards"]
    return ShardSet(
        str(index_path),
        list(expected),
        samples=sum(expected.values()),
        seconds=sum(float(s["seconds"]) for s in shards),
        expected=expected,
    )


def _counts_from_sibling_index(urls: list[str]) -> tuple[int | None, float | None]:
    """Sample counts for shards listed by an ``index.json`` in their folder, if all are."""
    tables: dict[Path, dict[str, tuple[int, float]]] = {}
    samples, seconds = 0, 0.0
    for url in urls:
        path = Path(url)
        if path.parent not in tables:
            try:
                index = read_index(path.parent / INDEX_NAME)
                tables[path.parent] = {
                    s["path"]: (int(s["samples"]), float(s["seconds"])) for s in index["shards"]
                }
            except (OSError, ValueError, KeyError):
                return None, None
        entry = tables[path.parent].get(path.name)
        if entry is None:
            return None, None
        samples += entry[0]
        seconds += entry[1]
    return samples, seconds


def resolve_shards(spec: str | Path) -> ShardSet:
    """Shard URLs for a folder with ``index.json``, an ``index.json``, a ``.tar``, or a glob or
    brace pattern (``data/shard-{000000..000009}.tar``). Remote URLs (``s3://``, ``pipe:``) pass
    through unchecked. Raises ``FileNotFoundError`` naming ``spec`` when it yields no shards."""
    text = str(spec)
    if _is_remote(text):
        return ShardSet(text, expand_urls(text))
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / INDEX_NAME).is_file():
            return _from_index(path / INDEX_NAME)
        unfinished = sorted(p.name for p in path.glob(f".*{PARTIAL_SUFFIX}"))
        if unfinished:
            raise FileNotFoundError(
                f"{path} has no {INDEX_NAME} but an unfinished prepare ({unfinished[0]}): "
                "rerun the same prepare command; it resumes"
            )
        urls = sorted(str(p) for p in path.glob("*.tar"))
    elif path.is_file() and path.suffix == ".json":
        return _from_index(path)
    elif path.is_file():
        urls = [str(path)]
    else:
        patterns = expand_urls(str(path))
        if any(ch in text for ch in "*?["):
            urls = sorted({u for p in patterns for u in glob.glob(p)})
        elif len(patterns) > 1:
            missing = [u for u in patterns if not Path(u).is_file()]
            if missing:
                raise FileNotFoundError(f"shards {text}: {len(missing)} missing, e.g. {missing[0]}")
            urls = patterns
        else:
            raise FileNotFoundError(
                f"no shards at {text}: not a folder, index.json, .tar file, glob or brace pattern"
            )
    if not urls:
        raise FileNotFoundError(f"no shards found at {text}")
    samples, seconds = _counts_from_sibling_index(urls)
    return ShardSet(text, urls, samples, seconds)
