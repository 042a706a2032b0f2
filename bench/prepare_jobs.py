"""``mmalign prepare --jobs N`` against ``--jobs 1`` on the same input, in one run.

    python bench/prepare_jobs.py --manifest runs/sent/corpus/train.jsonl --items 2000 --jobs 1 2
    python bench/prepare_jobs.py --lrs3 64 --jobs 1 2

Takes the first ``--items`` lines of a manifest (22.05 kHz WAVs from ``mmalign synth --kind
sentences`` by default: every item is read, resampled to 16 kHz and FLAC-encoded), prepares them
once per ``--jobs`` value into a temporary folder, and reports items per second, the speed-up
over the first value and whether the shards are byte-identical. Table on stdout, JSON in
``bench/results/prepare_jobs.json``.

``--lrs3 N`` instead writes N whole-face LRS3 ``trainval/<speaker>/<id>.mp4`` + ``.txt`` clips
(scikit-image's astronaut swaying on a 224 px canvas, as LRS3's, 2 s at 25 fps, with an AAC
track; written by the LRS3 tests' ``mp4``) and prepares them with ``--format lrs3 --crops
detect``: every clip is decoded, its mouth found by MTCNN in each frame and cropped, its audio
resampled and FLAC-encoded. Workers are handed 32 items at a time, so N = 64 keeps two busy
(N <= 32 runs on one). JSON in ``bench/results/prepare_jobs_lrs3.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from mmalign.data.shards import prepare
from mmalign.quiet import silence

ROOT = Path(__file__).resolve().parents[1]


def fake_lrs3(folder: Path, n: int) -> Path:
    """N trainval clips of the astronaut's face (200 px, swaying 4 px either way); the split."""
    import numpy as np
    from PIL import Image
    from skimage.data import astronaut

    sys.path.insert(0, str(ROOT / "tests"))
    from data.test_corpora_av import mp4  # ffmpeg: rgb24 frames + noise track to H.264/AAC

    face = np.asarray(Image.fromarray(astronaut()).resize((200, 200)))
    for i in range(n):
        frames = np.full((50, 224, 224, 3), 128, np.uint8)
        for t, frame in enumerate(frames):
            x = 12 + round(4 * np.sin((t + i) / 4))
            frame[12:212, x : x + 200] = face
        clip = folder / f"trainval/spk{i % 4}/{i:05d}.mp4"
        mp4(clip, frames, 2.0)
        clip.with_suffix(".txt").write_text("Text:  HELLO THERE\nConf:  4\n")
    return folder / "trainval"


def timed(source: Path, out: Path, jobs: int, **options) -> dict:
    start = time.perf_counter()
    report = prepare(source, out, jobs=jobs, progress=False, shard_max_count=500, **options)
    seconds = time.perf_counter() - start
    digest = hashlib.sha256()
    for shard in sorted(out.glob("*.tar")):
        digest.update(shard.read_bytes())
    return {
        "jobs": jobs,
        "items": report.written,
        "seconds": round(seconds, 2),
        "items_per_s": round(report.written / seconds, 2),
        "sha256": digest.hexdigest(),
    }


def main() -> None:
    silence()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=ROOT / "runs/sent/corpus/train.jsonl")
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--lrs3", type=int, default=0, help="N fake LRS3 clips, not a manifest")
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    name = "prepare_jobs_lrs3" if args.lrs3 else "prepare_jobs"
    args.out = args.out or ROOT / f"bench/results/{name}.json"
    with tempfile.TemporaryDirectory() as tmp:
        if args.lrs3:
            source = fake_lrs3(Path(tmp) / "LRS3", args.lrs3)
            options = {"format": "lrs3", "crops": "detect"}
            about = {"lrs3_clips": args.lrs3, "crops": "detect"}
        else:
            source = args.manifest.parent / f".bench-{args.items}.jsonl"
            lines = args.manifest.read_text().splitlines()[: args.items]
            source.write_text("\n".join(lines) + "\n")
            options, about = {}, {"manifest": str(args.manifest)}
        load = os.getloadavg()[0]
        try:
            rows = [timed(source, Path(tmp) / f"jobs{j}", j, **options) for j in args.jobs]
        finally:
            if not args.lrs3:
                source.unlink()
    base = rows[0]
    print(
        "| jobs | items | seconds | items/s | speed-up | same shards |\n|---|---|---|---|---|---|"
    )
    for row in rows:
        row["speedup"] = round(row["items_per_s"] / base["items_per_s"], 2)
        same = row["sha256"] == base["sha256"]
        print(
            f"| {row['jobs']} | {row['items']} | {row['seconds']} | {row['items_per_s']} | "
            f"{row['speedup']}x | {'yes' if same else 'NO'} |"
        )
    result = {
        "rows": rows,
        **about,
        "cpus": os.cpu_count(),
        "load_1min_before": round(load, 2),
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
