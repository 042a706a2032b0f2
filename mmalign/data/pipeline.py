"""Read prepared shards as a stream of ready batches: split, shuffle, decode, bucket, collate.

Stages of :func:`build_pipeline` (all run inside DataLoader workers)::

    shards ── shuffle (train; same seed on all ranks/workers) ── split_by_node ── split_by_worker
      ── tar members → samples ── [sample-level split, see below] ── shuffle buffer (train)
      ── decode (FLAC → float32 mono at the target rate, JSON; video → uint8 [T, H, W] and the
         audio cut/padded to whole video frames) ── video transform (train: random crop, flip,
         time masks; eval: centre crop) ── DurationBatcher ── noise augmentation (train) ── collate

*Video.* A sample may carry lip video as a ``.npy`` member (uint8 ``T x H x W``, what ``prepare``
writes) or a container (``mp4`` ...; decoded with torchcodec). Its rate is the JSON's
``video_fps``, else the container's, else 25. With ``require_video`` samples without video are
dropped ("missing video"), so an audio-visual model never sees a batch it cannot use; a batch
mixing samples with and without video fails in collate and is dropped as a whole.

*Feature caches* (``mmalign cache-features``, :mod:`mmalign.data.cache`) are read with
``cached=True``: decode takes each sample's stored encoder output (``feats.npy``) and the JSON's
``duration`` instead of audio, and batches carry ``encoder_features``/``encoder_lengths``.

*Seeds.* Shard order uses ``seed`` and the epoch only, so every rank and worker permutes the shard
list identically before taking its slice. The sample buffer, batch order, video augmentation and
noise augmentation also mix in rank and worker. The epoch is counted in the main process by
:class:`ShardLoader` (each ``iter()`` is one epoch) and reaches workers because they receive a
fresh copy of the pipeline every epoch; each stage also counts its own passes, so repeated passes
inside one epoch and persistent workers still differ.

*Few shards.* With fewer shards than ``world_size x num_workers`` slots, splitting shards would
leave some workers (or ranks) idle, so every slot reads all shards and keeps every k-th sample.

*Corrupt data never stops an epoch.* Undecodable audio or video, bad JSON, missing fields and clips
smaller than the video crop are skipped; each skip logs a warning naming the shard URL and key and
is counted by the pipeline's :class:`SkipCounter`, in total and per reason (the text before the
first colon, e.g. ``undecodable video``). A shard cut short or damaged counts, when its folder's
``index.json`` gives its size, every sample it lost (``lost in damaged shard``), not one; the
index itself is checked against the shards when they are resolved (:mod:`mmalign.data.index`).
DataLoader workers are other processes, so the counter
keeps its counts in shared memory (a ``multiprocessing.RawArray`` with one slot per worker,
created in the main process and inherited by the workers): the data module reads exact totals at
any time (``ShardDataModule.skipped``, ``skipped_by_reason``), including drops after a worker's
last batch or in a worker that yields no batch at all. For per-step logging each batch
also carries ``skipped``, the drops its worker saw since that worker's previous batch (deltas, so
a consumer simply sums them, e.g. ``self.log(..., reduce_fx="sum")``).
"""

from __future__ import annotations

import glob
import io
import json
import logging
import multiprocessing
import os
import random
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.context import get_spawning_popen
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
import webdataset as wds
from torch.utils.data import DataLoader
from webdataset.filters import pipelinefilter
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, url_opener
from webdataset.utils import pytorch_worker_info

from mmalign.data.augment import NoiseAugment
from mmalign.data.batching import DurationBatcher, LLMLength
from mmalign.data.collate import DEFAULT_TASK, DEFAULT_VIDEO_CROP, Collator
from mmalign.data.features import WhisperFeatures
from mmalign.data.index import INDEX_NAME, check_shards, read_index
from mmalign.data.shards import to_mono_rate
from mmalign.data.tasks import TaskError, apply_task
from mmalign.data.video import DEFAULT_VIDEO_FPS, VideoTransform, align_audio, decode_video
from mmalign.data.writer import PARTIAL_SUFFIX

log = logging.getLogger(__name__)

AUDIO_KEYS = ("flac", "wav", "ogg", "mp3", "opus")
VIDEO_KEYS = (
    "npy",
    "video.npy",
    "mp4",
    "video.mp4",
    "mkv",
    "webm",
    "mov",
    "avi",
)
"""Tar member extensions read as video, first match wins (``prepare`` writes ``npy``)."""

FEATURES_KEY = "feats.npy"
"""Member of a feature cache sample (``mmalign cache-features``): encoder output ``[T', D]``."""

SKIP_REASONS = (
    "missing json",
    "bad json",
    "missing text",
    "missing audio",
    "missing translation",
    "missing target_lang",
    "undecodable audio",
    "empty audio",
    "audio too long",
    "audio too short",
    "text too long",
    "missing video",
    "undecodable video",
    "video smaller than crop",
    "bad video",
    "missing features",
    "undecodable features",
    "unreadable shard data",
    "lost in damaged shard",
    "collate failed",
    "other",
)
"""Reasons counted across worker processes (:meth:`SkipCounter.totals_by_reason`); the rest are
counted as ``other`` there (and under their own name in the per-process ``by_reason``)."""


FILTER_REASONS = frozenset(
    {
        "missing translation",
        "missing target_lang",
        "missing video",
        "audio too long",
        "audio too short",
        "text too long",
        "video smaller than crop",
    }
)
"""Skips that filter by configuration (task, limits, crop) rather than damage; ``max_skip_rate``
does not count them."""


class SampleError(ValueError):
    """A sample that cannot be used (bad audio, JSON or fields)."""


class SkipCounter:
    """Counts and logs samples dropped by a pipeline, across DataLoader worker processes.

    ``total`` sums a shared-memory array that every copy made when workers start (fork or spawn)
    writes into, one slot per worker (slot 0: the main process), so no lock is needed;
    :meth:`totals_by_reason` does the same per reason (:data:`SKIP_REASONS`).
    ``by_reason`` is this process's own breakdown; :meth:`take` hands out the drops not yet put
    into a batch. A copy pickled outside process start (``copy.deepcopy``) counts on its own.
    """

    SLOTS = 1024

    def __init__(self) -> None:
        self.by_reason: Counter[str] = Counter()
        self._unreported = 0
        self._local_total = 0
        self._local_reasons: Counter[str] = Counter()
        self._shared: Any = multiprocessing.RawArray("q", self.SLOTS)
        self._shared_reasons: Any = multiprocessing.RawArray("q", self.SLOTS * len(SKIP_REASONS))
        self._shared_seen: Any = multiprocessing.RawArray("q", self.SLOTS)
        self._local_seen = 0

    @property
    def total(self) -> int:
        """Drops counted by all processes sharing this counter."""
        if self._shared is None:
            return self._local_total
        return int(sum(self._shared))

    @property
    def seen(self) -> int:
        """Samples read by all processes sharing this counter (used or skipped)."""
        if self._shared_seen is None:
            return self._local_seen
        return int(sum(self._shared_seen))

    def saw(self) -> None:
        """Count one sample read (the denominator of the skip rate)."""
        self._local_seen += 1
        if self._shared_seen is not None:
            self._shared_seen[self._slot()] += 1

    @staticmethod
    def _slot() -> int:
        info = torch.utils.data.get_worker_info()
        return 0 if info is None else 1 + info.id % (SkipCounter.SLOTS - 1)

    def totals_by_reason(self) -> dict[str, int]:
        """Drops per reason counted by all processes sharing this counter (nonzero ones)."""
        if self._shared_reasons is None:
            return dict(self._local_reasons)
        n = len(SKIP_REASONS)
        sums = [0] * n
        values = self._shared_reasons[:]
        for slot in range(self.SLOTS):
            row = values[slot * n : (slot + 1) * n]
            if any(row):
                sums = [a + b for a, b in zip(sums, row, strict=True)]
        return {r: int(v) for r, v in zip(SKIP_REASONS, sums, strict=True) if v}

    def _count(self, reason: str) -> None:
        self.by_reason[reason] += 1
        self._unreported += 1
        self._local_total += 1
        known = reason if reason in SKIP_REASONS else "other"
        self._local_reasons[known] += 1
        if self._shared is not None:
            slot = self._slot()
            self._shared[slot] += 1
            self._shared_reasons[slot * len(SKIP_REASONS) + SKIP_REASONS.index(known)] += 1

    def skip(self, reason: str, *, url: str | None = None, key: str | None = None) -> None:
        """Record one dropped sample and log where it came from."""
        log.warning("skipping sample %r in shard %s: %s", key, url, reason)
        self._count(reason.split(":")[0])

    def handler(self, exn: BaseException) -> bool:
        """webdataset ``handler=`` for tar-level errors: log, count, keep going. (webdataset's own
        ``warn_and_continue`` sleeps half a second per error.)"""
        log.warning("skipping unreadable shard data: %r", exn)
        self.saw()
        self._count("unreadable shard data")
        return True

    def lose(self, n: int, url: str, why: str) -> None:
        """Record ``n`` samples an index lists for shard ``url`` that never arrived (the shard is
        cut short or damaged): each counts as read and skipped, so ``max_skip_rate`` weighs a
        half-lost shard by the samples lost, not as one."""
        log.warning("shard %s: %s; %d samples lost", url, why, n)
        for _ in range(n):
            self.saw()
            self._count("lost in damaged shard")

    def take(self) -> int:
        """Drops since the previous call; resets that count."""
        n, self._unreported = self._unreported, 0
        return n

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if get_spawning_popen() is None:  # shared memory only travels to new processes
            state["_shared"] = None
            state["_shared_reasons"] = None
            state["_shared_seen"] = None
            state["_local_seen"] = self.seen
            state["_local_total"] = self.total
            state["_local_reasons"] = Counter(self.totals_by_reason())
        return state


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
    expected = check_shards(index_path)
    shards = read_index(index_path)["shards"]
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


def _decode_video_member(
    raw: dict[str, Any], meta: dict[str, Any]
) -> tuple[torch.Tensor, float] | None:
    """(frames uint8 [T, H, W], fps) of the sample's video member, None when it has none."""
    video_key = next((k for k in VIDEO_KEYS if raw.get(k) is not None), None)
    if video_key is None:
        return None
    try:
        frames, found_fps = decode_video(raw[video_key], video_key)
    except Exception as exn:  # decode_video says what is wrong; torchcodec may raise anything
        raise SampleError(f"undecodable video: .{video_key} member: {exn}") from exn
    fps = meta.get("video_fps")
    if fps is None:
        fps = found_fps or DEFAULT_VIDEO_FPS
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps < float("inf"):
        raise SampleError(f"undecodable video: bad video_fps {fps!r} in json")
    return frames, float(fps)


def _flac_without_frames(data: bytes) -> bool:
    """True for a FLAC stream that declares no samples and holds only metadata blocks (what
    ffmpeg or libFLAC write for empty input)."""
    if data[:4] != b"fLaC" or len(data) < 42:
        return False
    if int.from_bytes(data[18:26], "big") & ((1 << 36) - 1):  # STREAMINFO: total samples
        return False
    pos = 4
    while pos + 4 <= len(data):
        last = data[pos] & 0x80
        pos += 4 + int.from_bytes(data[pos + 1 : pos + 4], "big")
        if last:
            return pos == len(data)
    return False


class _StrictTarInfo(tarfile.TarInfo):
    """Tar headers that are damaged (bad checksum) or cut short raise instead of ending the
    archive quietly, as ``tarfile`` does for any header after the first one."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except (
            tarfile.InvalidHeaderError,
            tarfile.TruncatedHeaderError,
            tarfile.EmptyHeaderError,
        ) as exn:
            where = f"tar header at byte {tarfile_.offset}"
            raise tarfile.SubsequentHeaderError(f"{where}: {exn or 'file ends'}") from exn


def _sample_key(name: str) -> str:
    """webdataset's sample key of a member name: up to the first dot of its base name."""
    base = name.rsplit("/", 1)[-1]
    return name[: len(name) - len(base)] + base.split(".", 1)[0]


def _tar_files(
    sources: Iterable[dict[str, Any]],
    handler: Any,
    expected: dict[str, int] | None = None,
    lose: Callable[[int, str, str], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Each opened shard's regular members as ``{"fname", "data", "__url__"}``, then ``{}`` (end
    of shard), as webdataset's ``tar_file_expander``; but damage anywhere in a shard (a bad or
    truncated header, truncated data) ends the shard. A shard ``expected`` lists (its index's
    count) then reports exactly the samples that never arrived, ``lose(n, url, why)``; any
    other shard costs one ``handler`` call, since nothing says how much of it is missing."""
    expected = expected or {}
    split_shards, slot, _ = _slots(len(expected))
    for source in sources:
        url, stream = source["url"], source["stream"]
        keys, last = 0, None
        failure: Exception | None = None
        try:
            with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictTarInfo) as tar:
                for info in tar:
                    name = info.name
                    if info.isreg() and not re.match(r"__[^/]*__($|/)", name):  # metadata
                        data = tar.extractfile(info).read()
                        if _sample_key(name) != last:
                            keys, last = keys + 1, _sample_key(name)
                        yield {"fname": name, "data": data, "__url__": url}
                    tar.members = []
        except Exception as exn:
            failure = exn
        want = expected.get(url)
        if want is None or lose is None:
            if failure is not None:
                failure.args = (*failure.args, url)
                if not handler(failure):
                    return
        elif keys < want and (split_shards or slot == 0):  # every slot reads a shared shard
            why = f"cut short or damaged ({failure!r})" if failure else "ends early"
            lose(want - keys, url, f"{why} after {keys} of {want} samples")
        elif failure is not None:
            log.warning("shard %s: damaged after its %d samples: %r", url, keys, failure)
        yield {}


def _tar_samples(
    src: Iterable[dict[str, Any]],
    handler: Any,
    expected: dict[str, int] | None = None,
    lose: Callable[[int, str, str], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """webdataset's ``tarfile_to_samples`` with :func:`_tar_files`' strict reading."""
    files = _tar_files(url_opener(src, handler=handler), handler, expected, lose)
    return group_by_keys(files, handler=handler)


tar_samples = pipelinefilter(_tar_samples)


def _read_meta(raw: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The sample's JSON object and its non-empty ``text``; raises :class:`SampleError`."""
    if raw.get("json") is None:
        raise SampleError("missing json")
    try:
        meta = json.loads(raw["json"])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exn:
        raise SampleError(f"bad json: {exn}") from exn
    if not isinstance(meta, dict):
        raise SampleError("bad json: not an object")
    text = meta.get("text")
    if not isinstance(text, str) or not text.strip():
        raise SampleError("missing text")
    return meta, text


def decode_sample(
    raw: dict[str, Any],
    sample_rate: int = 16000,
    *,
    require_video: bool = False,
    task: str | None = None,
    target_lang: str | None = None,
    max_audio_seconds: float | None = None,
    max_text_chars: int | None = None,
    min_audio_seconds: float | None = None,
) -> dict[str, Any]:
    """Raw tar sample (bytes per extension) to a decoded sample; raises :class:`SampleError`.

    ``max_audio_seconds`` and ``max_text_chars`` reject over-long samples (after the task has
    picked the target text), which would otherwise blow a batch's memory or the encoder's
    window; ``min_audio_seconds`` rejects clips too short to carry one LLM token.

    ``text`` is the target of the sample's task (``task`` overrides the JSON's): the transcript,
    or for translation the ``translation`` into ``target_lang`` (see :mod:`mmalign.data.tasks`);
    the transcript is kept in ``transcript``.

    A video member adds ``video`` (uint8 ``[T, H, W]``) and ``video_fps``, and the audio is cut
    or zero-padded to the video's whole frames; ``require_video`` rejects samples without one.
    """
    meta, text = _read_meta(raw)
    audio_key = next((k for k in AUDIO_KEYS if raw.get(k) is not None), None)
    if audio_key is None:
        raise SampleError("missing audio")
    try:
        data, rate = sf.read(io.BytesIO(raw[audio_key]), dtype="float32", always_2d=True)
    except Exception as exn:  # libsndfile reports many kinds of damage
        if _flac_without_frames(raw[audio_key]):  # libsndfile cannot open an empty FLAC
            raise SampleError("empty audio: FLAC stream without frames") from exn
        raise SampleError(f"undecodable audio: {exn}") from exn
    wave = to_mono_rate(torch.from_numpy(data.T.copy()), rate, sample_rate)
    if wave.numel() == 0:
        raise SampleError("empty audio")
    video = _decode_video_member(raw, meta)
    if video is None and require_video:
        raise SampleError("missing video")
    sample: dict[str, Any] = {
        "__key__": raw.get("__key__"),
        "__url__": raw.get("__url__"),
        "text": text,
        "task": str(meta.get("task") or DEFAULT_TASK),
        "meta": meta,
    }
    if video is not None:
        frames, fps = video
        wave = align_audio(wave, int(frames.shape[0]), fps, sample_rate)
        sample["video"], sample["video_fps"] = frames, fps
    sample["audio"] = wave
    sample["duration"] = wave.numel() / sample_rate
    _check_duration(sample["duration"], max_audio_seconds, min_audio_seconds)
    try:
        sample = apply_task(sample, task, target_lang)
    except TaskError as exn:
        raise SampleError(str(exn).replace(" into ", ": into ", 1)) from exn
    if max_text_chars is not None and len(sample["text"]) > max_text_chars:
        raise SampleError(
            f"text too long: {len(sample['text'])} characters > max_text_chars={max_text_chars}"
        )
    return sample


def _check_duration(seconds: float, longest: float | None, shortest: float | None) -> None:
    if longest is not None and seconds > longest:
        raise SampleError(f"audio too long: {seconds:.1f} s > max_audio_seconds={longest}")
    if shortest is not None and seconds < shortest:
        raise SampleError(f"audio too short: {seconds:.3f} s < min_audio_seconds={shortest}")


def decode_cached_sample(
    raw: dict[str, Any],
    *,
    task: str | None = None,
    target_lang: str | None = None,
    max_audio_seconds: float | None = None,
    max_text_chars: int | None = None,
    min_audio_seconds: float | None = None,
) -> dict[str, Any]:
    """A feature cache's raw sample (see :mod:`mmalign.data.cache`) to a decoded sample with
    ``encoder_features`` (``[T', D]`` as stored) and the JSON's ``duration`` in place of audio;
    otherwise as :func:`decode_sample` (task, limits). Raises :class:`SampleError`."""
    meta, text = _read_meta(raw)
    duration = meta.get("duration")
    if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not duration > 0:
        raise SampleError(f"bad json: duration {duration!r}")
    if raw.get(FEATURES_KEY) is None:
        raise SampleError("missing features")
    try:
        feats = np.load(io.BytesIO(raw[FEATURES_KEY]), allow_pickle=False)
    except Exception as exn:
        raise SampleError(f"undecodable features: {exn}") from exn
    if feats.ndim != 2 or feats.dtype.kind != "f" or feats.shape[0] == 0:
        raise SampleError(f"undecodable features: {feats.dtype} {feats.shape}, not [T, D] float")
    _check_duration(duration, max_audio_seconds, min_audio_seconds)
    sample: dict[str, Any] = {
        "__key__": raw.get("__key__"),
        "__url__": raw.get("__url__"),
        "text": text,
        "task": str(meta.get("task") or DEFAULT_TASK),
        "meta": meta,
        "encoder_features": torch.from_numpy(feats),
        "duration": float(duration),
    }
    try:
        sample = apply_task(sample, task, target_lang)
    except TaskError as exn:
        raise SampleError(str(exn).replace(" into ", ": into ", 1)) from exn
    if max_text_chars is not None and len(sample["text"]) > max_text_chars:
        raise SampleError(
            f"text too long: {len(sample['text'])} characters > max_text_chars={max_text_chars}"
        )
    return sample


class EpochState:
    """Epoch number shared by the stages of one pipeline copy; advanced by :class:`ShardLoader`.

    ``resume`` holds a saved data position (see :meth:`ShardLoader.position`): in epoch
    ``resume["epoch"]`` every worker skips the batches the checkpointed run had consumed.
    ``finished`` is the last epoch whose loader ran to its end.
    """

    def __init__(self) -> None:
        self.current = 0
        self.next = 0
        self.started = False
        self.finished: int | None = None
        self.resume: dict[str, Any] | None = None
        self.sentinels = False

    def skip(self, rank: int, worker: int) -> int:
        """Batches worker ``worker`` of ``rank`` skips in the current epoch (resume)."""
        resume = self.resume
        if not resume or resume.get("epoch") != self.current:
            return 0
        ranks = resume.get("ranks") or []
        if rank >= len(ranks) or ranks[rank] is None:
            return 0
        return int(ranks[rank]["seqs"].get(worker, ranks[rank]["seqs"].get(str(worker), 0)))


END = "__end_of_worker__"
"""Key of the marker a worker sends after its last batch (consumed by :class:`ShardLoader`)."""


def _slots(n_urls: int) -> tuple[bool, int, int]:
    """(split shards?, this slot, number of slots) for the calling rank and worker."""
    rank, world, worker, workers = pytorch_worker_info()
    slots = max(1, world) * max(1, workers)
    return n_urls >= slots, rank * max(1, workers) + worker, slots


class _SeedParts:
    """Epoch, rank and worker, mixed into per-worker seeds (a class so that it pickles)."""

    def __init__(self, state: EpochState) -> None:
        self.state = state

    def __call__(self) -> tuple[int, ...]:
        rank, _, worker, _ = pytorch_worker_info()
        return (self.state.current, rank, worker)


@dataclass
class MixSource:
    """One shard set of a training mixture: its share of the samples and what it is used for.

    ``shards`` is anything :func:`resolve_shards` takes; ``weight`` its relative sampling
    probability; ``task``/``target_lang`` override the samples' own (e.g. the same shards once as
    ``asr`` and once as ``st`` into ``de``).
    """

    shards: str
    weight: float = 1.0
    task: str | None = None
    target_lang: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.weight, (int, float)) or not self.weight > 0:
            raise ValueError(
                f"mixture source {self.shards!r}: weight must be > 0, got {self.weight}"
            )


def _forever(chain: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Pass after pass over ``chain`` (reshuffled each time); stops if a pass yields nothing."""
    while True:
        n = 0
        for sample in chain:
            n += 1
            yield sample
        if n == 0:
            return


class _Mix(wds.PipelineStage):
    """Samples drawn from several decoded streams by weight (training; each stream repeats, so
    the mixture never runs dry and the epoch is cut by batch count), or the streams one after
    the other (evaluation: every sample once). webdataset's ``RandomMix`` draws from the global
    ``random`` module, which nothing seeds per worker and epoch, hence this seeded draw."""

    def __init__(
        self,
        chains: list[wds.DataPipeline],
        weights: list[float],
        train: bool,
        seed: int,
        seed_parts: _SeedParts,
    ) -> None:
        self.chains, self.weights, self.train = chains, weights, train
        self.seed, self.seed_parts = seed, seed_parts
        self.runs = 0

    def run(self) -> Iterator[dict[str, Any]]:
        if not self.train:
            for chain in self.chains:
                yield from chain
            return
        rng = random.Random(f"mix-{self.seed}-{self.runs}-{self.seed_parts()}")
        self.runs += 1
        streams = [_forever(c) for c in self.chains]
        alive = list(range(len(streams)))
        while alive:
            i = rng.choices(alive, weights=[self.weights[j] for j in alive])[0]
            try:
                yield next(streams[i])
            except StopIteration:  # a source with no usable sample at all
                alive.remove(i)


class _ShardSource(wds.PipelineStage):
    """Shard URLs for this rank and worker, seeded-shuffled identically on all of them."""

    def __init__(self, urls: list[str], shuffle: bool, seed: int, state: EpochState) -> None:
        self.urls, self.shuffle, self.seed, self.state = list(urls), shuffle, seed, state
        self.runs = 0

    def run(self) -> Iterator[dict[str, str]]:
        urls = list(self.urls)
        if self.shuffle:
            random.Random(f"shards-{self.seed}-{self.state.current}-{self.runs}").shuffle(urls)
        self.runs += 1
        split_shards, _, _ = _slots(len(urls))
        if split_shards:
            urls = list(wds.split_by_worker(wds.split_by_node(urls)))
        for url in urls:
            yield {"url": url}


class _SampleSplit(wds.PipelineStage):
    """Every k-th sample per slot when there are too few shards to split (see module doc)."""

    def __init__(self, n_urls: int) -> None:
        self.n_urls = n_urls

    def run(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        split_shards, slot, slots = _slots(self.n_urls)
        if split_shards or slots == 1:
            yield from src
            return
        for i, sample in enumerate(src):
            if i % slots == slot:
                yield sample


class _SeededShuffle(wds.PipelineStage):
    """webdataset's shuffle buffer with a reproducible per-epoch, per-worker seed."""

    def __init__(self, bufsize: int, seed: int, seed_parts: _SeedParts) -> None:
        self.bufsize, self.seed, self.seed_parts = bufsize, seed, seed_parts
        self.runs = 0

    def run(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        rng = random.Random(f"samples-{self.seed}-{self.runs}-{self.seed_parts()}")
        self.runs += 1
        return wds.shuffle(self.bufsize, initial=self.bufsize, rng=rng)(iter(src))


class _Decode(wds.PipelineStage):
    """Decode samples, dropping (and counting) the ones that fail; ``task`` overrides theirs."""

    def __init__(
        self,
        sample_rate: int,
        counter: SkipCounter,
        require_video: bool = False,
        task: str | None = None,
        target_lang: str | None = None,
        limits: dict[str, Any] | None = None,
        cached: bool = False,
    ) -> None:
        self.sample_rate, self.counter = sample_rate, counter
        self.require_video, self.task, self.target_lang = require_video, task, target_lang
        self.limits = dict(limits or {})
        self.cached = cached  # a feature cache: encoder output in place of audio

    def run(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for raw in src:
            self.counter.saw()
            try:
                if self.cached:
                    sample = decode_cached_sample(
                        raw, task=self.task, target_lang=self.target_lang, **self.limits
                    )
                else:
                    sample = decode_sample(
                        raw,
                        self.sample_rate,
                        require_video=self.require_video,
                        task=self.task,
                        target_lang=self.target_lang,
                        **self.limits,
                    )
            except Exception as exn:
                self.counter.skip(str(exn), url=raw.get("__url__"), key=raw.get("__key__"))
                continue
            yield sample


class _VideoAugment(wds.PipelineStage):
    """Per-clip :class:`VideoTransform`, seeded per epoch, pass, rank and worker; clips it
    rejects (smaller than the crop) are skipped and counted."""

    def __init__(
        self, transform: VideoTransform, seed: int, seed_parts: _SeedParts, counter: SkipCounter
    ) -> None:
        self.transform, self.seed, self.seed_parts = transform, seed, seed_parts
        self.counter = counter
        self.runs = 0

    def run(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        rng = random.Random(f"video-{self.seed}-{self.runs}-{self.seed_parts()}")
        self.runs += 1
        for sample in src:
            if sample.get("video") is not None:
                try:
                    sample["video"] = self.transform(sample["video"], rng)
                except Exception as exn:  # never stop an epoch for one clip
                    reason = str(exn) if "smaller than crop" in str(exn) else f"bad video: {exn}"
                    self.counter.skip(reason, url=sample["__url__"], key=sample["__key__"])
                    continue
            yield sample


class _NoiseStage(wds.PipelineStage):
    """Batch-level :class:`NoiseAugment` (babble needs the batch), seeded like the others."""

    def __init__(self, noise: NoiseAugment, seed: int, seed_parts: _SeedParts) -> None:
        self.noise, self.seed, self.seed_parts = noise, seed, seed_parts
        self.runs = 0

    def run(self, src: Iterable[list[dict[str, Any]]]) -> Iterator[list[dict[str, Any]]]:
        rng = random.Random(f"noise-{self.seed}-{self.runs}-{self.seed_parts()}")
        self.runs += 1
        for samples in src:
            yield self.noise(samples, rng)


class ShardPipeline(wds.DataPipeline):
    """A ``wds.DataPipeline`` of sample lists, collated into batches by :meth:`__iter__`, which
    also cuts epochs, skips already-consumed batches when resuming, and stamps every batch with
    its ``position``: ``(epoch, rank, worker, seq)``, ``seq`` counting the worker's sample lists
    in this epoch (collate failures included, so positions never depend on what failed)."""

    def __init__(
        self,
        *stages: Any,
        collator: Collator,
        counter: SkipCounter,
        state: EpochState,
        batches_per_worker: int | None = None,
    ) -> None:
        super().__init__(*stages)
        self.collator = collator
        self.counter = counter
        self.state = state
        self.batches_per_worker = batches_per_worker

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` through a :class:`ShardLoader` run epoch ``epoch``."""
        self.state.next = epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """One epoch for this rank and worker: one pass, or with ``batches_per_worker`` passes
        over reshuffled shards until that many batches."""
        rank, _, worker, _ = pytorch_worker_info()
        _reset_passes(self.pipeline)
        skip = self.state.skip(rank, worker)
        limit = self.batches_per_worker
        seq = 0
        while limit is None or seq < limit:
            produced = 0
            for samples in self.iterator1():
                produced += 1
                if seq >= skip:
                    batch = self._collate(samples)
                    if batch is not None:
                        batch["position"] = (self.state.current, rank, worker, seq)
                        yield batch
                seq += 1
                if limit is not None and seq >= limit:
                    break
            if limit is None or produced == 0:
                break
        if self.state.sentinels:
            yield {END: worker}

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The batch with the worker's skip count since its previous batch; None if it fails."""
        try:
            batch = self.collator(samples)
        except Exception as exn:
            for s in samples:
                self.counter.skip(f"collate failed: {exn}", url=s["__url__"], key=s["__key__"])
            return None
        batch["skipped"] = self.counter.take()
        return batch


def _reset_passes(stages: Iterable[Any]) -> None:
    """Restart every stage's pass counter, so a worker's seeds depend on the epoch and the
    pass within it, never on how many epochs this copy of the pipeline has run before."""
    for stage in stages:
        if hasattr(stage, "runs"):
            stage.runs = 0
        for chain in getattr(stage, "chains", ()):
            _reset_passes(chain.pipeline)


def build_pipeline(
    urls: list[str],
    *,
    features: WhisperFeatures,
    train: bool,
    max_batch_seconds: float = 60.0,
    max_batch_size: int | None = None,
    max_batch_tokens: float | None = None,
    llm_length: LLMLength | None = None,
    shuffle_buffer: int = 1000,
    bucket_buffer: int = 200,
    seed: int = 0,
    keep_waveform: bool = False,
    batches_per_worker: int | None = None,
    video_transform: VideoTransform | None = None,
    video_crop: int | None = DEFAULT_VIDEO_CROP,
    noise: NoiseAugment | None = None,
    require_video: bool = False,
    task: str | None = None,
    mix: Sequence[tuple[MixSource, list[str]]] | None = None,
    max_audio_seconds: float | None = None,
    max_text_chars: int | None = None,
    min_audio_seconds: float | None = None,
    cached: bool = False,
    shard_samples: dict[str, int] | None = None,
) -> ShardPipeline:
    """The batch stream over ``urls``. ``train`` shuffles shards, samples and batch order;
    otherwise one deterministic pass. ``batches_per_worker`` makes the stream endless (shards are
    re-read, reshuffled) and cuts each epoch after that many batches per worker.
    ``max_batch_tokens`` also caps a batch's padded LLM length as ``llm_length`` estimates it
    (see :mod:`mmalign.data.batching`).

    ``video_transform`` runs on every clip after decoding (a training transform draws from a
    seeded generator); ``video_crop`` is collate's centre crop of clips still larger than it.
    ``noise`` mixes noise into each batch before collate, in training only (ignored otherwise).
    ``require_video`` drops samples without video; ``task`` replaces every sample's task.
    ``mix`` (pairs of :class:`MixSource` and its shard URLs) replaces ``urls`` with several
    shard sets, each decoded with its own task and target language, drawn by weight.
    ``max_audio_seconds``/``max_text_chars`` skip over-long samples, ``min_audio_seconds``
    too short ones. ``cached`` reads a feature
    cache (:mod:`mmalign.data.cache`): batches carry ``encoder_features`` instead of audio, and
    waveform noise cannot be mixed in. ``shard_samples`` (the index's count per shard URL) makes
    a damaged shard count every sample it lost.
    """
    if cached and train and noise is not None and noise.enabled:
        raise ValueError("build_pipeline: a feature cache has no waveforms to mix noise into")
    counter, state = SkipCounter(), EpochState()
    limits = {
        "max_audio_seconds": max_audio_seconds,
        "max_text_chars": max_text_chars,
        "min_audio_seconds": min_audio_seconds,
    }
    parts = _SeedParts(state)

    def decoded(
        source_urls: list[str], src_task: str | None, tgt: str | None, k: int = 0
    ) -> list[Any]:
        src_seed = seed + 7919 * k  # sources over the same shards still shuffle differently
        if not source_urls:
            raise ValueError("build_pipeline needs at least one shard URL per source")
        chain: list[Any] = [
            _ShardSource(source_urls, shuffle=train, seed=src_seed, state=state),
            tar_samples(
                handler=counter.handler,
                expected={u: shard_samples[u] for u in source_urls if u in (shard_samples or {})},
                lose=counter.lose,
            ),
            _SampleSplit(len(source_urls)),
        ]
        if train and shuffle_buffer > 1:
            chain.append(_SeededShuffle(shuffle_buffer, src_seed, parts))
        chain.append(
            _Decode(features.sample_rate, counter, require_video, src_task, tgt, limits, cached)
        )
        return chain

    if mix:
        chains = [
            wds.DataPipeline(*decoded(u, src.task or task, src.target_lang, k))
            for k, (src, u) in enumerate(mix)
        ]
        stages: list[Any] = [_Mix(chains, [src.weight for src, _ in mix], train, seed, parts)]
    else:
        stages = decoded(urls, task, None)
    if video_transform is not None:
        stages.append(_VideoAugment(video_transform, seed, parts, counter))
    stages.append(
        DurationBatcher(
            max_batch_seconds,
            max_batch_size,
            buffer_size=bucket_buffer,
            shuffle=train,
            seed=seed,
            seed_parts=parts,
            max_batch_tokens=max_batch_tokens,
            tokens=llm_length,
        )
    )
    if train and noise is not None and noise.enabled:
        stages.append(_NoiseStage(noise, seed, parts))
    return ShardPipeline(
        *stages,
        collator=Collator(features, keep_waveform, video_crop),
        counter=counter,
        state=state,
        batches_per_worker=None if batches_per_worker is None else max(1, int(batches_per_worker)),
    )


class DataQualityError(RuntimeError):
    """Too many samples of a split were skipped as unusable (see ``max_skip_rate``)."""


class ShardLoader(DataLoader):
    """DataLoader for a :class:`ShardPipeline` (use ``batch_size=None``) that starts a new epoch
    of the pipeline on every ``iter()`` and makes what it yields exact and resumable:

    - batches come from the workers in a fixed round-robin order (worker 0, 1, ...; a worker
      leaves the cycle once it sends its end marker), whatever order they finish in, so a run
      is a function of its seed alone;
    - every batch's ``position`` becomes the loader state *after* it (epoch, batches taken
      from each worker, the worker next in turn): the state to save in a checkpoint;
    - under torch.distributed every rank yields the same number of batches: a rank that runs
      out yields copies of its last batch marked ``pad: True`` (weight 0) until all are done,
      so no collective call hangs at epoch end;
    - ``max_skip_rate`` stops the run with :class:`DataQualityError` when more than that share
      of the samples read so far were damaged (filters such as
      ``max_audio_seconds`` aside; checked once ``min_samples`` were read).
    """

    def __init__(
        self,
        *args: Any,
        max_skip_rate: float | None = None,
        min_samples: int = 200,
        split: str = "data",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.max_skip_rate, self.min_samples, self.split = max_skip_rate, min_samples, split
        if isinstance(self.dataset, ShardPipeline):
            self.dataset.state.sentinels = True

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        dataset = self.dataset
        if not isinstance(dataset, ShardPipeline):
            return super().__iter__()
        state = dataset.state
        state.current = state.next
        state.next += 1
        state.started = True
        workers = max(1, self.num_workers)
        resume = _rank_resume(state, workers)
        merged = _round_robin(super().__iter__(), workers, state.current, resume)
        return self._finish(_even_ranks(merged), dataset)

    def _finish(
        self, batches: Iterator[dict[str, Any]], dataset: ShardPipeline
    ) -> Iterator[dict[str, Any]]:
        counter, epoch = dataset.counter, dataset.state.current
        before = counter.totals_by_reason()
        for i, batch in enumerate(batches):
            if self.max_skip_rate is not None and i % 10 == 0:
                self.check_skip_rate(counter)
            yield batch
        if self.max_skip_rate is not None:
            self.check_skip_rate(counter)
        dataset.state.finished = epoch
        after = counter.totals_by_reason()
        per_epoch = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
        if per_epoch:
            log.warning(
                "%s epoch %d (rank %d): skipped %d samples: %s",
                self.split,
                epoch,
                _rank_world()[0],
                sum(per_epoch.values()),
                ", ".join(f"{k}: {v}" for k, v in sorted(per_epoch.items())),
            )

    def check_skip_rate(self, counter: SkipCounter) -> None:
        """Raise :class:`DataQualityError` when the share of skipped samples is too high."""
        seen = counter.seen
        if self.max_skip_rate is None or seen < self.min_samples or not seen:
            return
        by_reason = counter.totals_by_reason()
        skipped = sum(v for k, v in by_reason.items() if k not in FILTER_REASONS)
        if skipped / seen > self.max_skip_rate:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(by_reason.items()))
            raise DataQualityError(
                f"{self.split}: {skipped} of {seen} samples read so far were damaged "
                f"({skipped / seen:.1%} > max_skip_rate={self.max_skip_rate}); by reason: "
                f"{reasons}. The log names each skipped shard and key; fix the shards, or raise "
                "data.max_skip_rate"
            )


def _rank_resume(state: EpochState, workers: int) -> dict[str, Any] | None:
    """This rank's saved position if it belongs to the epoch starting now and still fits."""
    resume = state.resume
    if not resume or resume.get("epoch") != state.current:
        return None
    rank, world = _rank_world()
    ranks = resume.get("ranks") or []
    if len(ranks) != world or any(r is None or int(r["workers"]) != workers for r in ranks):
        log.warning(
            "data position of epoch %d was saved with %d rank(s) and workers %s; this run has "
            "%d x %d, so the epoch restarts from its beginning",
            state.current,
            len(ranks),
            [r and r["workers"] for r in ranks],
            world,
            workers,
        )
        state.resume = None
        return None
    return ranks[rank]


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _round_robin(
    items: Iterator[dict[str, Any]], workers: int, epoch: int, resume: dict[str, Any] | None
) -> Iterator[dict[str, Any]]:
    """Batches in worker order 0, 1, ..., skipping workers that have ended; each batch's
    ``position`` replaced by the loader state after it."""
    seqs = {w: 0 for w in range(workers)}
    turn = 0
    if resume is not None:
        seqs.update({int(w): int(n) for w, n in resume["seqs"].items()})
        turn = int(resume["next_worker"])
    alive = set(range(workers))
    pending: dict[int, list[dict[str, Any]]] = {w: [] for w in range(workers)}
    while alive:
        if turn not in alive:
            turn = (turn + 1) % workers
            continue
        while not pending[turn]:
            try:
                item = next(items)
            except StopIteration:
                raise RuntimeError(
                    f"data worker {turn} stopped without its end marker (epoch {epoch})"
                ) from None
            owner = int(item[END]) if END in item else int(item["position"][2])
            pending[owner].append(item)
        item = pending[turn].pop(0)
        if END in item:
            alive.discard(turn)
        else:
            seqs[turn] = int(item["position"][3]) + 1
            item["position"] = {
                "epoch": epoch,
                "workers": workers,
                "seqs": dict(seqs),
                "next_worker": (turn + 1) % workers,
            }
            yield item
        turn = (turn + 1) % workers


def _even_ranks(batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Under torch.distributed, pad ranks that run out with weight-0 copies of their last batch
    until every rank is done (one tiny all-reduce per batch)."""
    rank, world = _rank_world()
    if world == 1:
        yield from batches
        return
    backend = str(torch.distributed.get_backend())
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if "nccl" in backend and torch.cuda.is_available()
        else torch.device("cpu")
    )
    last: dict[str, Any] | None = None
    while True:
        batch = next(batches, None)
        flag = torch.tensor([0 if batch is None else 1], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if int(flag.item()) == 0:
            return
        if batch is not None:
            last = batch
            yield batch
            continue
        if last is None:
            raise RuntimeError(
                f"rank {rank} received no data this epoch while other ranks did: fewer usable "
                "samples than ranks x workers; use fewer devices/workers or more data"
            )
        yield {**last, "pad": True}


class _PinRank:
    """DataLoader ``worker_init_fn``: the main process's rank and world size, for the worker.

    A worker finds its rank through webdataset's ``pytorch_worker_info`` (shard split, seeds,
    resume), which reads ``RANK``/``WORLD_SIZE`` or torch.distributed. Lightning's launchers do
    not always set both variables, and spawn/forkserver workers have no process group, so
    every rank's workers would read the same shards with the same seeds.
    """

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def __call__(self, worker_id: int) -> None:
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(self.rank), str(self.world)


def make_loader(
    pipeline: ShardPipeline,
    num_workers: int = 0,
    *,
    max_skip_rate: float | None = None,
    min_samples: int = 200,
    split: str = "data",
    worker_context: str | None = None,
) -> ShardLoader:
    """A :class:`ShardLoader` over ``pipeline``: batching happens in the pipeline.

    ``worker_context`` is the workers' start method (``fork``, ``spawn``, ``forkserver``;
    None: torch's default); whichever it is, workers know this process's rank and world size.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = _rank_world()
    else:
        rank, world, _, _ = pytorch_worker_info()
    return ShardLoader(
        pipeline,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=_PinRank(rank, world) if num_workers > 0 else None,
        multiprocessing_context=worker_context if num_workers > 0 else None,
        max_skip_rate=max_skip_rate,
        min_samples=min_samples,
        split=split,
    )
