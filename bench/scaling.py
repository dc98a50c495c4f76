"""Scaling: the job with 1 and with 2 render actors on this machine, torch threads pinned per actor (1 actor: all
cores; 2 actors: half each), on a manifest of equal short videos.

    python bench/scaling.py [--videos 12 --model bench-df]

Prints a table and writes bench/results/scaling.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

import common

from skyreels_batch.manifest import write_manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=12)
    parser.add_argument("--model", default="bench-df")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="scaling-"))
    manifest = write_manifest(work / "manifest.parquet", common.rows(args.videos))
    table: list[dict] = []
    for workers in (1, 2):
        baseline = table[0]["wall_s"] if table else None
        table.append(
            common.job_row(manifest, work, model=args.model, workers=workers, longest_first=True, baseline=baseline)
        )
    common.print_table(table)
    path = common.save(
        "scaling",
        {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU only",
            "model": args.model,
            "videos": args.videos,
            "command": f"python bench/scaling.py --videos {args.videos} --model {args.model}",
            "rows": table,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
