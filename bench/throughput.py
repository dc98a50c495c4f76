"""Videos per minute: this job against the loop a diffusers user writes instead (bench/plain_loop.py: the
pipeline called row by row, each video written with export_to_video), on the same manifest, machine and cores.

    pip install -e ".[bench]"    # imageio + imageio-ffmpeg: export_to_video's backend, for the plain loop
    python bench/throughput.py [--videos 8 --long 2 --model bench-df]

The manifest is mixed: short videos, then long chained ones at its end. Each run is a fresh process; the job's
wall time includes starting Ray and loading the model, as the plain loop's includes loading it. Runs: plain; the
job with 1 actor; 2 actors in manifest order and 2 actors longest first (the makespan gain of scheduling by the
plan's cost). `transformer_of_busy`: time in transformer forward passes over time spent rendering rows;
`transformer_of_pool`: over the pool's whole render phase (idle actors included).
Prints a table and writes bench/results/throughput.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

import common

from skyreels_batch.job.manifest import write_manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=8, help="short videos")
    parser.add_argument("--long", type=int, default=2, help="long chained videos, last in the manifest")
    parser.add_argument("--model", default="bench-df")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="throughput-"))
    manifest = write_manifest(work / "manifest.parquet", common.rows(args.videos, long=args.long))

    plain = common.run_plain(manifest, work / "plain", model=args.model)
    table = [common.summarize("plain diffusers loop", plain, None, actors=1, order="manifest")]
    for workers, longest_first in ((1, True), (2, False), (2, True)):
        row, _ = common.job_row(
            manifest, work, model=args.model, workers=workers, longest_first=longest_first, baseline=plain
        )
        table.append(row)

    common.print_table(table)
    path = common.save(
        "throughput",
        {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU only",
            "model": args.model,
            "manifest": {"short_videos": args.videos, "long_videos": args.long, **common.LONG},
            "command": f"python bench/throughput.py --videos {args.videos} --long {args.long} --model {args.model}",
            "rows": table,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
