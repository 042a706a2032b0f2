"""``mmalign prepare --jobs N`` against ``--jobs 1`` on the same input, in one run.

    python bench/prepare_jobs.py --manifest runs/sent/corpus/train.jsonl --items 2000 --jobs 1 2

Takes the first ``--items`` lines of a manifest (22.05 kHz WAVs from ``mmalign synth --kind
sentences`` by default: every item is read, resampled to 16 kHz and FLAC-encoded), prepares them
once per ``--jobs`` value into a temporary folder, and reports items per second, the speed-up
over the first value and whether the shards are byte-identical. Table on stdout, JSON in
``bench/results/prepare_jobs.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

from mmalign.data.shards import prepare
from mmalign.quiet import silence

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    silence()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=ROOT / "runs/sent/corpus/train.jsonl")
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/prepare_jobs.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        subset = args.manifest.parent / f".bench-{args.items}.jsonl"
        lines = args.manifest.read_text().splitlines()[: args.items]
        subset.write_text("\n".join(lines) + "\n")
        try:
            for jobs in args.jobs:
                out = Path(tmp) / f"jobs{jobs}"
                start = time.perf_counter()
                report = prepare(subset, out, jobs=jobs, progress=False, shard_max_count=500)
                seconds = time.perf_counter() - start
                digest = hashlib.sha256()
                for shard in sorted(out.glob("*.tar")):
                    digest.update(shard.read_bytes())
                rows.append(
                    {
                        "jobs": jobs,
                        "items": report.written,
                        "seconds": round(seconds, 2),
                        "items_per_s": round(report.written / seconds, 1),
                        "sha256": digest.hexdigest(),
                    }
                )
        finally:
            subset.unlink()
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
        "manifest": str(args.manifest),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
