"""Encoder feature cache: run the frozen audio encoder once, train from its stored output.

``mmalign cache-features SHARDS OUT_DIR FIT_CONFIG`` reads prepared shards, runs the
``model.encoder`` of a fit config over every sample under ``torch.inference_mode`` and writes new
shards, one per input shard, in which each sample keeps its JSON (text, task, translation ...)
and gains ``<key>.feats.npy``: the encoder's valid output frames ``[T', D]`` (float16 by default;
``.npy`` so that any tool reads it). The audio is dropped unless ``keep_audio``. The shard
folder's ``index.json`` has the layout ``mmalign prepare`` writes plus a ``cache`` block that
says what made the features::

    "cache": {"format", "encoder": {"class_path", "init_args"}, "weights_sha256",
              "window", "n_mels", "sample_rate", "dtype", "encoder_dtype", "dim",
              "frame_rate", "modality", "audio_kept", "source"}

*Window policy.* Whisper by default encodes a batch on a window as long as its longest input, so
live features of an utterance depend on what it was batched with. A cache must not: every sample
is encoded as if alone (``window: per_sample``): its log-mel is computed on its own and only
samples whose encoder inputs have the same shape (the same even number of mel frames) share an
encoder call, which gives exactly what a batch of one gives. With ``pad_to_30s: true`` the window
is always 30 s (``window: pad_to_30s``) and any samples may share a call. Training from the cache
therefore sees the features a batch-of-one live run would see. (Live, the log-mel of a batch's
longest clip also differs in its last frame or two from that of a shorter clip, whose frames see
zero padding instead of the STFT's end-of-row reflection; the cache's are all "alone".)

*Precision.* The encoder runs in its own dtype (``model.encoder.init_args.dtype``, recorded as
``encoder_dtype``) without autocast, and its output is stored in ``dtype`` (float16 by default,
float32 on request) and collated as float32. Under ``trainer.precision: bf16-mixed`` a live
encoder runs under autocast, so cached features are then the more precise ones.

Reading a cache: :mod:`mmalign.data.cache`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.nn import functional as F
from tqdm.auto import tqdm

from mmalign.data.cache import CACHE_FORMAT, STORAGE_DTYPES
from mmalign.data.collate import collate
from mmalign.data.decoding import FEATURES_KEY, decode_sample
from mmalign.data.features import WhisperFeatures
from mmalign.data.index import INDEX_NAME, ShardInfo, SkippedItem, write_index
from mmalign.data.reading import tar_samples
from mmalign.data.shardset import ShardSet, resolve_shards
from mmalign.inference.encoder_identity import describe_encoder, trainable_problem, window_policy

log = logging.getLogger(__name__)


@dataclass
class CacheReport:
    """What :func:`cache_features` wrote and skipped."""

    out_dir: Path
    written: int = 0
    total_seconds: float = 0.0
    shards: list[ShardInfo] = field(default_factory=list)
    skipped: list[SkippedItem] = field(default_factory=list)
    cache: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------ describing an encoder


def encoder_from_fit_config(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """(``model.encoder`` built as ``mmalign fit`` would build it, the ``data`` settings) of a
    fit config. Audio-visual configs are refused (the cache covers the audio encoder)."""
    import yaml
    from jsonargparse import ArgumentParser

    from mmalign.encoders.base import Encoder

    path = Path(path)
    cfg = yaml.safe_load(path.read_text()) or {}
    model = _section(cfg.get("model"), path, "model")
    data = _section(cfg.get("data"), path, "data")
    if model.get("video_encoder"):
        raise ValueError(
            f"{path}: model.video_encoder is set; the feature cache covers audio-only models "
            "for now (train audio-visual models from live features)"
        )
    if not model.get("encoder"):
        raise ValueError(f"{path}: no model.encoder to cache the features of")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--encoder", type=Encoder)
    parsed = parser.parse_object({"encoder": model["encoder"]})
    encoder = parser.instantiate(parsed).encoder
    return encoder, data


def _section(value: Any, path: Path, name: str) -> dict[str, Any]:
    """A config section given inline, as ``{class_path, init_args}``, or as a path to a file."""
    if value is None:
        return {}
    if isinstance(value, str):
        import yaml

        value = yaml.safe_load((path.parent / value).read_text()) or {}
    if not isinstance(value, dict):
        raise ValueError(f"{path}: {name} must be a mapping")
    if "init_args" in value and "encoder" not in value and "train" not in value:
        value = value["init_args"] or {}
    return value


def cache_features(
    shards: str | Path,
    out_dir: str | Path,
    encoder: Any,
    *,
    sample_rate: int = 16000,
    n_mels: int | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    dtype: str = "float16",
    keep_audio: bool = False,
    prefix: str = "shard",
    buffer: int | None = None,
    progress: bool = True,
) -> CacheReport:
    """Encode every sample of ``shards`` with the frozen ``encoder`` and write a feature cache.

    One output shard ``{prefix}-NNNNNN.tar`` per input shard, in input order, each sample in
    its input order; ``<key>.json`` as read (``duration`` set to the decoded audio's seconds, as
    live training counts it) and ``<key>.feats.npy`` ``[T', D]`` in ``dtype``; with
    ``keep_audio`` every original member too. Samples that cannot be decoded or encoded are
    skipped and listed in ``index.json``. ``buffer`` samples (default ``8 x batch_size``) are
    read at a time and grouped by window (see the module docstring) into encoder calls of at
    most ``batch_size``.
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"cache-features: dtype={dtype!r} must be one of {sorted(STORAGE_DTYPES)}")
    if batch_size < 1:
        raise ValueError(f"cache-features: batch_size={batch_size} must be >= 1")
    if prefix != re.sub(r"[^A-Za-z0-9_-]", "_", prefix):
        raise ValueError(f"cache-features: prefix {prefix!r} must be letters, digits, '-' or '_'")
    problem = trainable_problem(encoder)
    if problem:
        raise ValueError(f"cache-features: {problem}")
    if str(getattr(encoder, "modality", "audio")) != "audio":
        raise ValueError(
            f"cache-features: {type(encoder).__name__} reads {encoder.modality}; the feature "
            "cache covers audio encoders"
        )
    encoder_mels = getattr(encoder, "n_mels", None)
    if n_mels is not None and encoder_mels is not None and n_mels != encoder_mels:
        raise ValueError(
            f"cache-features: data.n_mels={n_mels} but the encoder expects {encoder_mels} bins"
        )
    n_mels = encoder_mels if encoder_mels is not None else n_mels
    shard_set = resolve_shards(shards)
    out = Path(out_dir).expanduser()
    inputs = {Path(u).resolve() for u in shard_set.urls if "://" not in u}
    out.mkdir(parents=True, exist_ok=True)
    targets = [out / f"{prefix}-{i:06d}.tar" for i in range(len(shard_set.urls))]
    if any(t.resolve() in inputs for t in targets) or (out / INDEX_NAME).resolve() in {
        p.parent / INDEX_NAME for p in inputs
    }:
        raise ValueError(f"cache-features: out_dir {out} holds the input shards; pick another")
    for old in out.glob(f"{prefix}-*.tar"):
        if re.fullmatch(rf"{re.escape(prefix)}-\d{{6}}\.tar", old.name):
            log.warning("removing old shard %s", old)
            old.unlink()

    encoder = encoder.to(device).eval()
    features = WhisperFeatures(n_mels=n_mels or 80, sample_rate=sample_rate)
    cache = {
        "format": CACHE_FORMAT,
        **describe_encoder(encoder, sample_rate, n_mels),
        "dtype": dtype,
        "audio_kept": bool(keep_audio),
        "source": str(shards),
    }
    report = CacheReport(out_dir=out, cache=cache)
    encode = _GroupEncoder(encoder, features, batch_size, device, STORAGE_DTYPES[dtype])
    bar = tqdm(total=shard_set.samples, disable=not progress, desc="cache-features")
    try:
        for url, target in zip(shard_set.urls, targets, strict=True):
            written, seconds = 0, 0.0
            tmp = target.with_suffix(".tar.tmp")
            with wds.TarWriter(str(tmp)) as writer:
                raws = _raw_samples(url, report.skipped)
                for raw, sample, feats, why in encode(raws, buffer or 8 * batch_size):
                    bar.update(1)
                    if why is not None:
                        report.skipped.append(
                            SkippedItem(url, None, f"{raw.get('__key__')}: {why}")
                        )
                        log.warning(
                            "cache-features: skipping %r in %s: %s", raw.get("__key__"), url, why
                        )
                        continue
                    writer.write(_members(raw, sample, feats, keep_audio))
                    written += 1
                    seconds += float(sample["duration"])
            if written:
                os.replace(tmp, target)
                report.shards.append(ShardInfo.of(target, written, seconds))
            else:
                tmp.unlink()
    finally:
        bar.close()
    report.written = sum(s.samples for s in report.shards)
    report.total_seconds = round(sum(s.seconds for s in report.shards), 6)
    _write_index(report, shard_set, sample_rate, prefix)
    return report


def _raw_samples(url: str, skipped: list[SkippedItem]) -> Iterator[dict[str, Any]]:
    """The raw samples of one shard (bytes per member), read strictly; damage ends the shard
    with a warning and an entry in ``skipped``."""

    def handler(exn: BaseException) -> bool:
        log.warning("cache-features: unreadable shard data in %s: %r", url, exn)
        skipped.append(SkippedItem(url, None, f"unreadable shard data: {exn!r}"))
        return True

    yield from tar_samples(handler=handler)(iter([{"url": url}]))


def _members(
    raw: dict[str, Any], sample: dict[str, Any], feats: np.ndarray, keep_audio: bool
) -> dict[str, Any]:
    meta = json.loads(raw["json"])
    meta["duration"] = float(sample["duration"])  # the decoded audio's, as live training
    members: dict[str, Any] = {"__key__": raw["__key__"]}
    if keep_audio:
        members.update({k: v for k, v in raw.items() if not k.startswith("__") and k != "json"})
    buf = io.BytesIO()
    np.save(buf, feats, allow_pickle=False)
    members[FEATURES_KEY] = buf.getvalue()
    members["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    return members


class _GroupEncoder:
    """Decode, compute inputs per sample, and encode samples whose windows agree together."""

    def __init__(
        self,
        encoder: Any,
        features: WhisperFeatures,
        batch_size: int,
        device: str,
        storage: Any,
    ) -> None:
        self.encoder, self.features, self.batch_size = encoder, features, batch_size
        self.device, self.storage = device, storage
        self.keep_waveform = "audio" in getattr(encoder, "input_keys", ())
        self.keys = tuple(getattr(encoder, "input_keys", ("audio_features", "audio_lengths")))
        self.any_window = window_policy(encoder) == "pad_to_30s"

    def __call__(
        self, raws: Iterator[dict[str, Any]], buffer: int
    ) -> Iterator[tuple[dict[str, Any], Any, Any, str | None]]:
        """(raw, decoded sample, features [T', D] or None, skip reason or None) in input order."""
        pending: list[dict[str, Any]] = []
        for raw in raws:
            pending.append(raw)
            if len(pending) >= buffer:
                yield from self._flush(pending)
                pending = []
        if pending:
            yield from self._flush(pending)

    def _flush(self, raws: list[dict[str, Any]]) -> list[tuple[Any, Any, Any, str | None]]:
        rows: list[list[Any]] = []  # [raw, sample, inputs, feats, reason]
        for raw in raws:
            try:
                # task asr: the sample's transcript is enough; the training run picks the task
                sample = decode_sample(raw, self.features.sample_rate, task="asr")
                inputs = collate([sample], self.features, self.keep_waveform, video_crop=None)
                rows.append([raw, sample, inputs, None, None])
            except Exception as exn:
                rows.append([raw, None, None, None, str(exn)])
        groups: dict[Any, list[list[Any]]] = {}
        for row in rows:
            if row[4] is None:
                groups.setdefault(self._window(row[2]), []).append(row)
        for members in groups.values():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                try:
                    for row, feats in zip(chunk, self._encode([r[2] for r in chunk]), strict=True):
                        row[3] = feats
                except Exception as exn:
                    for row in chunk:
                        row[4] = f"encoder failed: {exn}"
        return [(r[0], r[1], r[3], r[4]) for r in rows]

    def _window(self, inputs: dict[str, Any]) -> Any:
        """Samples with the same key are encoded together: equal input shapes (or any, for a
        30 s window)."""
        if self.any_window:
            return None
        return tuple(tuple(inputs[k].shape) for k in self.keys if torch.is_tensor(inputs.get(k)))

    def _encode(self, items: list[dict[str, Any]]) -> list[np.ndarray]:
        batch: dict[str, Any] = {}
        for key in self.keys:
            values = [item[key] for item in items]
            if values[0].dim() > 1:  # data: pad the last axis (a no-op within a window group)
                size = max(int(v.shape[-1]) for v in values)
                values = [F.pad(v, (0, size - int(v.shape[-1]))) for v in values]
            batch[key] = torch.cat(values).to(self.device)
        with torch.inference_mode():
            feats, lengths = self.encoder.encode_batch(batch)
        feats = feats.float().cpu()
        out = [
            feats[i, : int(n)].numpy().astype(self.storage)
            for i, n in enumerate(lengths.cpu().tolist())
        ]
        if not all(np.isfinite(f).all() for f in out):
            raise ValueError(
                f"features not finite in {np.dtype(self.storage).name} (overflow?); "
                "use --dtype float32"
            )
        return out


def _write_index(report: CacheReport, shard_set: ShardSet, sample_rate: int, prefix: str) -> None:
    """index.json as ``mmalign prepare`` writes it, plus the ``cache`` block."""
    fields = {
        "source": report.cache.get("source", str(shard_set.spec)),
        "source_format": "feature-cache",
        "sample_rate": sample_rate,
        "prefix": prefix,
        "video_samples": 0,
        "video_crop": None,
        "total_samples": report.written,
        "total_seconds": report.total_seconds,
        "skipped": [asdict(s) for s in report.skipped],
        "cache": report.cache,
    }
    write_index(report.out_dir, fields, report.shards)
