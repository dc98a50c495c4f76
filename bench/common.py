"""What the benchmarks share: manifests, the job and the plain diffusers loop as timed subprocesses, tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
LONG = {"num_frames": 65, "base_num_frames": 17, "overlap_history": 5}  # 5 segments of 17-frame windows


def rows(count: int, *, long: int = 0, prefix: str = "video") -> list[dict]:
    """`count` short videos at the model's defaults, then `long` chained ones (last in manifest order)."""
    short = [{"id": f"{prefix}-{i:03d}", "prompt": f"bench prompt {i}", "seed": i} for i in range(count)]
    chained = [{"id": f"{prefix}-long-{i}", "prompt": f"long prompt {i}", "seed": 100 + i, **LONG} for i in range(long)]
    return short + chained


def run_job(manifest: Path, output: Path, *, model: str, workers: int, longest_first: bool = True) -> dict:
    """`python jobs/render.py` in a fresh process on its own local Ray; wall time from launch to exit."""
    command = [sys.executable, "jobs/render.py", str(manifest), "--output", str(output), "--model", model]
    command += ["--workers", str(workers)] + ([] if longest_first else ["--manifest-order"])
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="rb-", dir="/tmp")}
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - started
    index = pd.read_parquet(output / "results")
    assert (index.status == "done").all(), index.error.dropna().tolist()
    finished = index.render_started + pd.to_timedelta(index.render_s, unit="s")
    span = (finished.max() - index.render_started.min()).total_seconds()
    return {
        "wall_s": wall,
        "videos": len(index),
        "transformer_s": float(index.transformer_s.sum()),
        "busy_s": float(index.render_s.sum()),
        "pool_s": span * workers,  # the pool's time from the first render's start to the last one's end
    }


def job_row(
    manifest: Path, work: Path, *, model: str, workers: int, longest_first: bool, baseline: float | None
) -> dict:
    """One table row: the job run with `workers` actors, compared with a baseline wall time."""
    order = "longest first" if longest_first else "manifest"
    output = work / f"job-{workers}-{order.replace(' ', '-')}"
    run = run_job(manifest, output, model=model, workers=workers, longest_first=longest_first)
    print(f"done: {workers} actors, {order}", flush=True)
    return summarize("this job", run, baseline, actors=workers, order=order)


def run_plain(manifest: Path, output: Path, *, model: str) -> dict:
    """The loop a diffusers user writes, in a fresh process (bench/plain_loop.py)."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "bench/plain_loop.py", str(manifest), str(output), "--model", model],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    return {"wall_s": wall, **json.loads(result.stdout.strip().splitlines()[-1])}


def summarize(name: str, run: dict, baseline_wall: float | None, **labels) -> dict:
    return {
        "run": name,
        **labels,
        "wall_s": round(run["wall_s"], 1),
        "videos_per_min": round(60 * run["videos"] / run["wall_s"], 2),
        "vs_baseline": round(baseline_wall / run["wall_s"], 2) if baseline_wall else 1.0,
        "transformer_of_busy": round(run["transformer_s"] / run["busy_s"], 3),
        "transformer_of_pool": round(run["transformer_s"] / run["pool_s"], 3),
    }


def print_table(rows: list[dict]) -> None:
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns))


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
