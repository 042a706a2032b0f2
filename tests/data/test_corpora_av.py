"""LRS3 through ``mmalign prepare``: MP4s with an audio track and moving frames written by
ffmpeg, ``pretrain`` split at word timings, auto-avsr's mouth-ROI layout used as is, and mouth
crops cut by the MTCNN landmark detector on a real face photograph (scikit-image's astronaut)."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from mmalign.cli import main
from mmalign.data.index import read_index
from mmalign.data.reading import read_shard_samples

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
decoders = pytest.importorskip("torchcodec.decoders")


def mp4(path, frames: np.ndarray, audio_seconds: float | None = None) -> None:
    """uint8 RGB ``[T, H, W, 3]`` frames at 25 fps, with a noise audio track (16 kHz AAC)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t, h, w, _ = frames.shape
    cmd = ["ffmpeg", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24"]
    cmd += ["-s", f"{w}x{h}", "-r", "25", "-i", "-"]
    if audio_seconds is not None:
        wav = path.with_suffix(".wav")
        noise = np.random.default_rng(1).uniform(-0.3, 0.3, round(audio_seconds * 16000))
        sf.write(wav, noise.astype("float32"), 16000)
        cmd += ["-i", str(wav), "-c:a", "aac"]
    cmd += ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "12", str(path)]
    subprocess.run(cmd, input=frames.tobytes(), check=True)
    if audio_seconds is not None:
        wav.unlink()


def moving(n: int, size: int = 64) -> np.ndarray:
    """A bright square sliding over a dark frame."""
    frames = np.full((n, size, size, 3), 30, np.uint8)
    for i in range(n):
        frames[i, 20:36, i % (size - 16) : i % (size - 16) + 16] = 220
    return frames


PRETRAIN_WORDS = """Text:  ONE TWO THREE FOUR FIVE SIX
Conf:  3

WORD START END ASDSCORE
ONE 0.10 0.50 1.0
TWO 0.60 1.20 1.0
THREE 1.30 1.90 1.0
FOUR 2.00 2.60 1.0
FIVE 2.70 3.50 1.0
SIX 3.60 3.90 1.0
"""


def lrs3(root) -> None:
    """trainval (one good clip, one without mp4, one without header), pretrain (one 4 s clip
    that splits in two at 2 s), test; mouth ROIs as auto-avsr writes them under root/crops."""
    mp4(root / "LRS3/trainval/spkA/00001.mp4", moving(30), 1.2)
    (root / "LRS3/trainval/spkA/00001.txt").write_text("Text:  HELLO THERE\nConf:  4\n")
    (root / "LRS3/trainval/spkA/00002.txt").write_text("Text:  NO VIDEO\n")
    mp4(root / "LRS3/trainval/spkB/00003.mp4", moving(10), 0.4)
    (root / "LRS3/trainval/spkB/00003.txt").write_text("HELLO\n")
    mp4(root / "LRS3/pretrain/spkA/10000.mp4", moving(100), 4.0)
    (root / "LRS3/pretrain/spkA/10000.txt").write_text(PRETRAIN_WORDS)
    mp4(root / "LRS3/test/spkC/00009.mp4", moving(10), 0.4)
    (root / "LRS3/test/spkC/00009.txt").write_text("Text:  TEST\n")
    for name, n in (("trainval/spkA/00001", 30), ("pretrain/spkA/10000_00", 47)):
        mp4(root / f"crops/{name}.mp4", moving(n, 96))
    mp4(root / "crops/pretrain/spkA/10000_01.mp4", moving(47, 96))


def test_lrs3_pretrain_split_with_auto_avsr_crops(tmp_path):
    lrs3(tmp_path)
    out = tmp_path / "shards"
    args = ["prepare", str(tmp_path / "LRS3"), str(out), "--split", "pretrain,trainval"]
    main([*args, "--crops", str(tmp_path / "crops"), "--max_seconds", "2"])
    index = read_index(out)
    assert index["source_format"] == "lrs3" and index["normalizer"] == "english"
    assert index["total_samples"] == index["video_samples"] == 3
    samples = {s["__key__"]: s for s in read_shard_samples(out)[0]}
    keys = ["pretrain_spkA_10000_00", "pretrain_spkA_10000_01", "trainval_spkA_00001"]
    assert sorted(samples) == keys
    first, second = samples["pretrain_spkA_10000_00"], samples["pretrain_spkA_10000_01"]
    assert first["text"] == "ONE TWO THREE" and second["text"] == "FOUR FIVE SIX"
    assert second["meta"]["offset"] == 2.0 and abs(second["duration"] - 1.88) < 1e-3
    track = decoders.AudioDecoder(str(tmp_path / "LRS3/pretrain/spkA/10000.mp4"))
    track = track.get_all_samples().data[0].numpy()
    assert np.abs(second["audio"].numpy() - track[32000 : 32000 + 30080]).max() < 1e-4
    assert tuple(second["video"].shape) == (47, 96, 96)  # auto-avsr's ROI, as it is
    whole = samples["trainval_spkA_00001"]
    assert whole["text"] == "HELLO THERE" and whole["meta"]["speaker"] == "spkA"
    aac = decoders.AudioDecoder(str(tmp_path / "LRS3/trainval/spkA/00001.mp4"))
    aac_seconds = aac.get_all_samples().data.shape[1] / 16000  # the whole track (AAC frames)
    assert abs(whole["meta"]["duration"] - aac_seconds) < 1e-3
    assert abs(whole["duration"] - 1.2) < 1e-3  # read back aligned to its 30 video frames
    reasons = sorted(s["reason"] for s in index["skipped"])
    assert reasons == ["no 'Text:' header", "no video 00002.mp4"]
    with pytest.raises(SystemExit, match="pick with --split"):
        main(["prepare", str(tmp_path / "LRS3"), str(tmp_path / "x"), "--crops", "none"])
    with pytest.raises(SystemExit, match="pass --crops"):
        main(["prepare", str(tmp_path / "LRS3/test"), str(tmp_path / "x")])


def face_clip() -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Six frames of the astronaut's face (256 px) sliding right by 2 px a frame on a 288 px
    canvas, the fourth frame blank; and where her mouth is in each (from MTCNN's landmarks on
    the 512 px photograph: mouth corners (201.7, 139.2) and (245.3, 141.9))."""
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    face = np.asarray(Image.fromarray(skimage_data.astronaut()).resize((256, 256)))
    frames = np.full((6, 288, 288, 3), 128, np.uint8)
    mouths = []
    for i in range(6):
        x = 16 + 2 * i
        if i != 3:
            frames[i, 16:272, x : x + 256] = face
        mouths.append((x + 223.5 / 2, 16 + 140.6 / 2))
    return frames, mouths


def test_lrs3_mouth_crops_from_landmarks(tmp_path):
    pytest.importorskip("facenet_pytorch")
    frames, mouths = face_clip()
    mp4(tmp_path / "trainval/spk/00001.mp4", frames, 0.24)
    (tmp_path / "trainval/spk/00001.txt").write_text("Text:  FACE\n")
    mp4(tmp_path / "trainval/spk/00002.mp4", np.full((6, 288, 288, 3), 128, np.uint8), 0.24)
    (tmp_path / "trainval/spk/00002.txt").write_text("Text:  NOBODY\n")
    out = tmp_path / "shards"
    main(["prepare", str(tmp_path / "trainval"), str(out), "--crops", "detect"])
    (sample,) = read_shard_samples(out)[0]
    video, meta = sample["video"], sample["meta"]
    assert tuple(video.shape) == (6, 96, 96) and meta["no_face_frames"] == 1
    assert meta["crop_detector"] == "mtcnn" and len(meta["crop_boxes"]) == 6
    for (x, y, w, h), (mouth_x, mouth_y) in zip(meta["crop_boxes"], mouths, strict=True):
        assert w == h and 24 <= w <= 40  # eye distance and mouth width are about 21 px each
        assert abs(x + w / 2 - mouth_x) < 5 and abs(y + h / 2 - mouth_y) < 5
    (skipped,) = read_index(out)["skipped"]
    assert skipped["source"].endswith("00002.txt")
    assert skipped["reason"].endswith("no face in any of its 6 frames")


def test_lrs3_detect_without_facenet_names_the_install(tmp_path, monkeypatch):
    (tmp_path / "test/spk").mkdir(parents=True)
    (tmp_path / "test/spk/00001.txt").write_text("Text:  HELLO\n")
    monkeypatch.setitem(__import__("sys").modules, "facenet_pytorch", None)
    with pytest.raises(SystemExit, match="pip install --no-deps facenet-pytorch==2.6.0"):
        main(["prepare", str(tmp_path / "test"), str(tmp_path / "x"), "--crops", "detect"])
