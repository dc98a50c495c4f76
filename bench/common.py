"""What the benchmarks share: manifests, the job and the plain diffusers loop as timed subprocesses, tables."""

from __future__ import annotations

import json
import os
import platform
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
        "decode_s": float(index.decode_s.sum()),
        "persist_wait_s": float(index.persist_wait_s.sum()),
        "busy_s": float(index.render_s.sum()),
        "pool_s": span * workers,  # the pool's time from the first render's start to the last one's end
        "phase_s": span,
    }


def job_row(
    manifest: Path, work: Path, *, model: str, workers: int, longest_first: bool, baseline: dict | None
) -> tuple[dict, dict]:
    """The job run with `workers` actors: its table row, compared with a baseline run, and the run itself."""
    order = "longest first" if longest_first else "manifest"
    output = work / f"job-{workers}-{order.replace(' ', '-')}"
    run = run_job(manifest, output, model=model, workers=workers, longest_first=longest_first)
    print(f"done: {workers} actors, {order}", flush=True)
    return summarize("this job", run, baseline, actors=workers, order=order), run


def run_plain(manifest: Path, output: Path, *, model: str, processes: int = 1) -> dict:
    """The loop a diffusers user writes (bench/plain_loop.py) in fresh processes: one with every core, or
    `processes` at once, each with its share of the cores and of the manifest's rows (every n-th row)."""
    rows = pd.read_parquet(manifest)
    commands = []
    for index in range(processes):
        part = manifest if processes == 1 else manifest.with_name(f"{manifest.stem}-{index}-of-{processes}.parquet")
        if processes > 1:
            rows.iloc[index::processes].to_parquet(part)
        command = [sys.executable, "bench/plain_loop.py", str(part), str(output), "--model", model]
        commands.append(command + ([] if processes == 1 else ["--threads", str(max(1, os.cpu_count() // processes))]))
    started = time.perf_counter()
    pipe = subprocess.PIPE
    running = [subprocess.Popen(command, cwd=REPO, stdout=pipe, stderr=pipe, text=True) for command in commands]
    outputs = [process.communicate() for process in running]
    wall = time.perf_counter() - started
    for process, (_, errors) in zip(running, outputs, strict=True):
        assert process.returncode == 0, f"a plain loop failed:\n{errors[-3000:]}"
    runs = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    total = {key: sum(run[key] for run in runs) for key in ("videos", "transformer_s", "busy_s", "pool_s")}
    return {"wall_s": wall, **total, "phase_s": max(run["phase_s"] for run in runs)}


def summarize(name: str, run: dict, baseline: dict | None, **labels) -> dict:
    """One table row. `start_s`: the wall time before the first video starts rendering (process and Ray start,
    validation, model load; for the job also its last MP4 after the last render). `phase_*`: from the first video's
    start to the last one's end, the rate a long job settles at."""
    return {
        "run": name,
        **labels,
        "wall_s": round(run["wall_s"], 1),
        "videos_per_min": round(60 * run["videos"] / run["wall_s"], 2),
        "vs_baseline": round(baseline["wall_s"] / run["wall_s"], 2) if baseline else 1.0,
        "start_s": round(run["wall_s"] - run["phase_s"], 1),
        "phase_videos_per_min": round(60 * run["videos"] / run["phase_s"], 2),
        "phase_vs_baseline": round(baseline["phase_s"] / run["phase_s"], 2) if baseline else 1.0,
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


def finish(name: str, rows: list[dict], command: str, **details: object) -> None:
    """Print the table and write bench/results/<name>.json: this CPU machine, the command, the rows."""
    print_table(rows)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, CPU only"
    path = save(name, {"machine": machine, **details, "command": command, "rows": rows})
    print(f"wrote {path}")
