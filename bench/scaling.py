"""Scaling: the job with 1 and with 2 render actors on this machine, torch threads pinned per actor (1 actor: all
cores; 2 actors: half each), on a manifest of equal short videos. First, the ceiling without Ray: the plain
diffusers loop in one process with every core, and in two processes at once with half the cores each (each
process renders every other row); `vs_baseline` compares with the one-process (one-actor) row above it.

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

from skyreels_batch.job.manifest import write_manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=12)
    parser.add_argument("--model", default="bench-df")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="scaling-"))
    manifest = write_manifest(work / "manifest.parquet", common.rows(args.videos))
    # What two processes can get out of this machine at best, without Ray: the plain loop with every core, and two
    # plain loops at once with one core's threads each.
    table: list[dict] = []
    one_loop = common.run_plain(manifest, work / "plain-1", model=args.model)
    table.append(common.summarize("plain diffusers loop", one_loop, None, processes=1))
    two_loops = common.run_plain(manifest, work / "plain-2", model=args.model, processes=2)
    table.append(common.summarize("plain diffusers loop", two_loops, one_loop, processes=2))
    print("done: plain loops", flush=True)
    one_actor = None
    for workers in (1, 2):
        row, run = common.job_row(
            manifest, work, model=args.model, workers=workers, longest_first=True, baseline=one_actor
        )
        table.append({**row, "processes": workers})
        one_actor = one_actor or run
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
