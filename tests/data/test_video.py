"""Lip video: decoding, A/V alignment, transforms, prepare with video, pipeline, collate, module."""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import webdataset as wds

from mmalign.data.collate import collate
from mmalign.data.datamodule import ShardDataModule
from mmalign.data.decoding import decode_sample
from mmalign.data.encoding import encode_flac
from mmalign.data.features import WhisperFeatures
from mmalign.data.index import read_index
from mmalign.data.shards import prepare
from mmalign.data.skips import SampleError
from mmalign.data.video import (
    VideoTransform,
    align_audio,
    center_crop,
    decode_video,
    to_grayscale,
)

RATE = 16000


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def clip(frames: int, height: int = 96, width: int = 96, seed: int = 0) -> np.ndarray:
    """A uint8 clip whose pixels all differ in value along rows, columns and time."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(frames, height, width), dtype=np.uint8)


def write_av_corpus(
    root: Path, specs: list[tuple[int, float]], size: tuple[int, int] = (96, 96)
) -> Path:
    """Items ``(video frames, audio seconds)`` as wav + npy files and a manifest; returns it."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (frames, seconds) in enumerate(specs):
        t = np.arange(int(seconds * RATE)) / RATE
        sf.write(root / f"a{i}.wav", (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), RATE)
        np.save(root / f"v{i}.npy", clip(frames, *size, seed=i))
        lines.append(
            {"audio": f"a{i}.wav", "video": f"v{i}.npy", "text": f"word {i}", "key": f"k{i}"}
        )
    manifest = root / "m.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return manifest


def read_raw(out: Path) -> list[dict]:
    urls = [str(out / s["path"]) for s in read_index(out)["shards"]]
    return list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))


# ------------------------------------------------------------------ alignment and decoding


@pytest.mark.parametrize("fps", [25.0, 29.97])
@pytest.mark.parametrize("audio_samples", [20000, 30001])  # shorter and longer than 37 frames
def test_align_audio_to_whole_frames(fps, audio_samples) -> None:
    wave = torch.linspace(-1, 1, audio_samples)
    out = align_audio(wave, 37, fps, RATE)
    expected = round(37 * RATE / fps)  # 23680 at 25 fps, 19753 at 29.97 fps
    assert out.numel() == expected == {25.0: 23680, 29.97: 19753}[fps]
    keep = min(audio_samples, expected)
    assert torch.equal(out[:keep], wave[:keep])
    assert torch.count_nonzero(out[keep:]) == 0  # zero padding only
    assert abs(out.numel() / RATE - 37 / fps) < 1 / RATE
    assert align_audio(wave, 38, 29.97, RATE).numel() == 20287  # 20286.95 rounds up, not down
    with pytest.raises(ValueError, match="fps"):
        align_audio(wave, 37, 0.0, RATE)


def test_decode_npy_gray_rgb_and_errors() -> None:
    gray = clip(5, 8, 10)
    frames, fps = decode_video(npy_bytes(gray), "npy")
    assert (
        fps is None and frames.dtype == torch.uint8 and torch.equal(frames, torch.from_numpy(gray))
    )
    rgb = np.random.default_rng(1).integers(0, 256, size=(5, 8, 10, 3), dtype=np.uint8)
    want = np.round(rgb @ np.array([0.2989, 0.587, 0.114])).astype(np.uint8)
    last, _ = decode_video(npy_bytes(rgb), "npy")
    first, _ = decode_video(npy_bytes(rgb.transpose(0, 3, 1, 2)), "video.npy")
    assert torch.equal(last, first) and last.shape == (5, 8, 10)
    assert np.abs(last.numpy().astype(int) - want).max() <= 1
    with pytest.raises(ValueError, match="uint8"):
        decode_video(npy_bytes(gray.astype(np.float32)), "npy")
    with pytest.raises(ValueError, match="T x H x W"):
        decode_video(npy_bytes(gray[0]), "npy")
    with pytest.raises(ValueError, match="empty"):
        decode_video(npy_bytes(gray[:0]), "npy")
    with pytest.raises(ValueError, match="npy"):
        decode_video(b"\x93NUMPY garbage" * 10, "npy")
    with pytest.raises(ValueError, match="outside the 10x8 frame"):
        decode_video(npy_bytes(gray), "npy", box=(4, 0, 8, 8))


def mp4_bytes(frames: torch.Tensor, fps: float) -> bytes:
    """``[T, 3, H, W]`` uint8 frames as mp4, or skip when torchcodec cannot encode here."""
    try:
        from torchcodec.encoders import VideoEncoder

        return VideoEncoder(frames, frame_rate=fps).to_tensor(format="mp4").numpy().tobytes()
    except Exception as exn:  # not installed (optional 'decode' extra) or no encoder in ffmpeg
        pytest.skip(f"torchcodec cannot write mp4 here: {exn!r}")


def smooth_rgb(frames: int, height: int, width: int) -> torch.Tensor:
    """Slowly varying colours (they survive lossy coding), ``[T, 3, H, W]`` uint8."""
    y = torch.arange(height)[:, None].expand(height, width)
    x = torch.arange(width)[None, :].expand(height, width)
    planes = [
        torch.stack([(2 * x + 3 * t) % 200 + 20, (2 * y) % 200 + 20, torch.full_like(x, 128)])
        for t in range(frames)
    ]
    return torch.stack(planes).to(torch.uint8)


def test_decode_mp4(tmp_path) -> None:
    data = mp4_bytes(smooth_rgb(12, 64, 80), 25.0)
    frames, fps = decode_video(data, "mp4")
    assert frames.shape == (12, 64, 80) and frames.dtype == torch.uint8 and fps == 25.0
    want = to_grayscale(smooth_rgb(12, 64, 80))
    assert (frames.float() - want.float()).abs().mean() < 8  # lossy h264, but the same picture
    boxed, _ = decode_video(data, "mp4", box=(8, 4, 40, 30))
    assert boxed.shape == (12, 30, 40)
    with pytest.raises(ValueError, match="cannot decode .mp4"):
        decode_video(b"not a video at all" * 20, "mp4")


# ------------------------------------------------------------------ transforms


def test_video_transform_seeded_and_eval_centre_crop() -> None:
    frames = torch.from_numpy(clip(30, 96, 100))
    before = frames.clone()
    train = VideoTransform(train=True, crop=88, flip_prob=0.5, time_masks=2, time_mask_frames=10)
    outs = {seed: train(frames, random.Random(seed)) for seed in range(6)}
    assert all(o.shape == (30, 88, 88) and o.dtype == torch.uint8 for o in outs.values())
    assert torch.equal(outs[0], train(frames, random.Random(0)))  # same seed, same clip
    assert any(not torch.equal(outs[0], o) for o in list(outs.values())[1:])
    assert torch.equal(frames, before)  # input untouched

    ev = VideoTransform(train=False, crop=88)(frames, random.Random(1))
    assert torch.equal(ev, frames[:, 4:92, 6:94])
    assert torch.equal(ev, center_crop(frames, 88))

    flip = VideoTransform(train=True, crop=None, flip_prob=1.0)(frames, random.Random(0))
    assert torch.equal(flip, frames.flip(-1))
    masked = VideoTransform(train=True, crop=None, flip_prob=0.0, time_masks=3, time_mask_frames=10)
    out = masked(frames, random.Random(3))
    mean = int(round(float(frames.float().mean())))
    changed = [t for t in range(30) if not torch.equal(out[t], frames[t])]
    assert changed and len(changed) <= 30
    assert all(bool((out[t] == mean).all()) for t in changed)

    with pytest.raises(ValueError, match="64x64"):
        VideoTransform(train=True, crop=88)(
            torch.zeros(3, 64, 64, dtype=torch.uint8), random.Random()
        )
    with pytest.raises(ValueError, match="64x64"):
        center_crop(torch.zeros(3, 64, 64, dtype=torch.uint8), 88)
    with pytest.raises(ValueError, match="flip_prob"):
        VideoTransform(train=True, flip_prob=1.5)


# ------------------------------------------------------------------ collate


def av_sample(key: str, video: torch.Tensor) -> dict:
    return {
        "__key__": key,
        "audio": torch.zeros(640 * video.shape[0]),
        "text": key,
        "video": video,
        "video_fps": 25.0,
    }


def test_collate_video_shapes_padding_and_errors() -> None:
    features = WhisperFeatures()
    samples = [
        av_sample("a", torch.full((5, 96, 96), 7, dtype=torch.uint8)),
        {**av_sample("b", torch.from_numpy(clip(9, 96, 96))), "snr": 5.0},
    ]
    batch = collate(samples, features)  # the old positional signature still works
    assert batch["video"].shape == (2, 9, 1, 88, 88) and batch["video"].dtype == torch.uint8
    assert batch["video_lengths"].tolist() == [5, 9]
    assert batch["video_fps"].tolist() == [25.0, 25.0]
    assert int(batch["video"][0, 5:].count_nonzero()) == 0 and bool(
        (batch["video"][0, :5] == 7).all()
    )
    assert torch.equal(batch["video"][1, :, 0], samples[1]["video"][:, 4:92, 4:92])
    assert math.isnan(float(batch["snr"][0])) and float(batch["snr"][1]) == 5.0
    full = collate(samples, features, video_crop=None)
    assert full["video"].shape == (2, 9, 1, 96, 96)
    small = [{**samples[0], "video": torch.zeros(5, 64, 64, dtype=torch.uint8)}, samples[1]]
    with pytest.raises(ValueError, match="sizes differ"):
        collate(small, features)
    with pytest.raises(ValueError, match="1 of 2 samples have no video"):
        collate([samples[0], {"audio": torch.zeros(100), "text": "x"}], features)
    assert "video" not in collate([{"audio": torch.zeros(100), "text": "x"}], features)


# ------------------------------------------------------------------ prepare


def test_prepare_with_video_column_crop_and_bad_videos(tmp_path) -> None:
    manifest = write_av_corpus(tmp_path / "c", [(20, 0.8), (13, 0.5)], size=(100, 120))
    bad_lines = [
        {"audio": "a0.wav", "video": "missing.npy", "text": "gone"},
        {"audio": "a0.wav", "video": "garbage.npy", "text": "garbage"},
        {"audio": "a0.wav", "video": "small.npy", "text": "small"},
        {"audio": "a0.wav", "video": "v0.npy", "video_fps": -3, "text": "fps"},
    ]
    (tmp_path / "c" / "garbage.npy").write_bytes(b"\x00garbage" * 40)
    np.save(tmp_path / "c" / "small.npy", clip(4, 30, 30))
    with open(manifest, "a") as fh:
        fh.writelines(json.dumps(x) + "\n" for x in bad_lines)
    lines = manifest.read_text().splitlines()
    lines[1] = json.dumps({**json.loads(lines[1]), "video_fps": 30.0})
    manifest.write_text("\n".join(lines) + "\n")

    out = tmp_path / "out"
    report = prepare(manifest, out, crop=(10, 6, 96, 90), progress=False)
    assert report.written == 2
    reasons = {s.line: s.reason for s in report.skipped}
    assert "not found" in reasons[3] and "missing.npy" in reasons[3]
    assert "unreadable video" in reasons[4] and "garbage.npy" in reasons[4]
    assert "outside" in reasons[5] and "small.npy" in reasons[5]
    assert "video_fps" in reasons[6]
    raws = {r["__key__"]: r for r in read_raw(out)}
    assert set(raws) == {"k0", "k1"}
    for i, (key, fps) in enumerate([("k0", 25.0), ("k1", 30.0)]):
        meta = json.loads(raws[key]["json"])
        frames = np.load(io.BytesIO(raws[key]["npy"]), allow_pickle=False)
        assert frames.dtype == np.uint8 and frames.shape == (meta["video_frames"], 90, 96)
        assert np.array_equal(frames, clip(meta["video_frames"], 100, 120, seed=i)[:, 6:96, 10:106])
        assert meta["video_fps"] == fps and meta["video_source"].endswith(f"v{i}.npy")
        audio, _ = sf.read(io.BytesIO(raws[key]["flac"]))
        assert len(audio) == int([0.8, 0.5][i] * RATE)  # audio stored as is
    assert read_index(out)["video_samples"] == 2
    with pytest.raises(ValueError, match="crop"):
        prepare(manifest, tmp_path / "o2", crop=(0, 0, -1, 5), progress=False)


def test_prepare_mp4_video(tmp_path) -> None:
    data = mp4_bytes(smooth_rgb(15, 64, 80), 30.0)
    (tmp_path / "v.mp4").write_bytes(data)
    sf.write(tmp_path / "a.wav", np.zeros(8000, dtype=np.float32), RATE)
    line = {"audio": "a.wav", "video": "v.mp4", "text": "hello", "key": "m"}
    (tmp_path / "m.jsonl").write_text(json.dumps(line) + "\n")
    report = prepare(tmp_path / "m.jsonl", tmp_path / "out", crop=(8, 4, 48, 40), progress=False)
    assert report.written == 1, report.skipped
    (raw,) = read_raw(tmp_path / "out")
    meta = json.loads(raw["json"])
    assert meta["video_fps"] == 30.0 and meta["video_frames"] == 15
    sample = decode_sample(raw)
    assert sample["video"].shape == (15, 40, 48) and sample["video_fps"] == 30.0
    assert sample["audio"].numel() == 8000  # 15 frames at 30 fps = 0.5 s


# ------------------------------------------------------------------ pipeline and data module


def test_decode_sample_aligns_and_rejects_bad_video() -> None:
    wave = torch.from_numpy((0.1 * np.ones(30000)).astype(np.float32))
    raw = {
        "__key__": "x",
        "flac": encode_flac(wave, RATE),
        "npy": npy_bytes(clip(37, 8, 8)),
        "json": json.dumps({"text": "hi", "video_fps": 29.97}).encode(),
    }
    sample = decode_sample(raw)
    assert sample["audio"].numel() == 19753 and sample["video"].shape == (37, 8, 8)
    assert sample["duration"] == pytest.approx(19753 / RATE)
    raw25 = {**raw, "json": b'{"text": "hi"}'}
    assert decode_sample(raw25)["audio"].numel() == 23680  # default 25 fps, padded
    with pytest.raises(SampleError, match="undecodable video"):
        decode_sample({**raw, "npy": b"\x00" * 64})
    no_video = {k: v for k, v in raw.items() if k != "npy"}
    assert "video" not in decode_sample(no_video)
    with pytest.raises(SampleError, match="missing video"):
        decode_sample(no_video, require_video=True)


def write_av_shard(path: Path, n_good: int = 4) -> set[str]:
    """Good audio+video samples, one with garbage npy bytes, one without video."""
    good = set()
    with wds.TarWriter(str(path)) as sink:
        for i in range(n_good):
            frames = 10 + 3 * i
            wave = torch.full((frames * 640 + 100,), 0.1)
            meta = {"text": f"good {i}", "video_fps": 25.0}
            sink.write(
                {
                    "__key__": f"good{i}",
                    "flac": encode_flac(wave, RATE),
                    "npy": npy_bytes(clip(frames, 96, 96, i)),
                    "json": json.dumps(meta).encode(),
                }
            )
            good.add(f"good{i}")
        flac = encode_flac(torch.full((6400,), 0.1), RATE)
        junk = b"\x93NUMPY\x00junk" * 30
        sink.write({"__key__": "corrupt", "flac": flac, "npy": junk, "json": b'{"text": "c"}'})
        sink.write({"__key__": "novideo", "flac": flac, "json": b'{"text": "n"}'})
    return good


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_video_skipped_and_counted(tmp_path, num_workers) -> None:
    good = write_av_shard(tmp_path / "av-000000.tar")
    dm = ShardDataModule(
        val=str(tmp_path / "av-000000.tar"), num_workers=num_workers, require_video=True
    )
    batches = list(dm.val_dataloader())
    assert {k for b in batches for k in b["keys"]} == good
    assert dm.skipped == {"val": 2}
    assert dm.skipped_by_reason == {"val": {"undecodable video": 1, "missing video": 1}}
    for batch in batches:
        assert batch["video"].shape[2:] == (1, 88, 88)


def test_datamodule_video_batches_task_override_and_noise(tmp_path) -> None:
    specs = [(10 + 2 * i, 0.3 + 0.05 * i) for i in range(8)]
    manifest = write_av_corpus(tmp_path / "c", specs)
    out = tmp_path / "shards"
    assert prepare(manifest, out, progress=False).written == 8
    dm = ShardDataModule(
        train=str(out), val=str(out), max_batch_seconds=4.0, max_batch_size=4, task="vsr",
        video_time_masks=1, noise_snrs=[5.0], shuffle_buffer=4, bucket_buffer=8,
    )  # fmt: skip
    frames_of = {f"k{i}": n for i, (n, _) in enumerate(specs)}
    val = list(dm.val_dataloader())
    assert sorted(k for b in val for k in b["keys"]) == sorted(frames_of)
    for batch in val:
        B = len(batch["keys"])
        assert batch["task"] == ["vsr"] * B and "snr" not in batch  # eval stays clean
        assert batch["video"].shape == (B, int(batch["video_lengths"].max()), 1, 88, 88)
        assert batch["video_lengths"].tolist() == [frames_of[k] for k in batch["keys"]]
        samples = (batch["audio_lengths"] * 160).tolist()
        for k, n in zip(batch["keys"], samples, strict=True):
            assert abs(n - frames_of[k] * 640) < 160  # audio aligned to the video frames
        for row, key in enumerate(batch["keys"]):
            stored = torch.from_numpy(clip(frames_of[key], seed=int(key[1:])))
            assert torch.equal(batch["video"][row, : frames_of[key], 0], stored[:, 4:92, 4:92])
    train = list(dm.train_dataloader())
    assert train and all(b["task"] == ["vsr"] * len(b["keys"]) for b in train)
    for batch in train:
        assert batch["video"].shape[-2:] == (88, 88)
        want = [5.0 if len(batch["keys"]) > 1 else math.nan] * len(batch["keys"])
        assert np.allclose(batch["snr"].numpy(), want, equal_nan=True)


def test_datamodule_rejects_bad_video_and_noise_settings(tmp_path) -> None:
    for kwargs, field in [
        ({"video_crop": 0}, "video_crop"),
        ({"video_flip": 1.5}, "video_flip"),
        ({"video_time_masks": -1}, "video_time_masks"),
        ({"noise_snrs": []}, "noise_snrs"),
        ({"noise_snrs": ["loud"]}, "noise_snrs"),
        ({"noise_snrs": [5.0], "noise_source": str(tmp_path / "nope")}, "noise_source"),
        ({"noise_prob": 2.0}, "noise_prob"),
        ({"babble_speakers": 0}, "babble_speakers"),
        ({"task": ""}, "task"),
    ]:
        with pytest.raises(ValueError, match=field):
            ShardDataModule(**kwargs)
