"""A soak run: does what a run keeps stay flat with its length? (issue: runs of days stay bounded)

`python jobs/render.py` on many small rows with `--index-interval 1`, SIGTERMed and restarted every few minutes
(the same command resumes), for `--minutes`. Every `--sample-s` seconds it samples the output (files and bytes of
the work state: index files, gallery data, embeddings, `_segments/`, records), the driver's RSS, and the RSS of
every process of the run's Ray (GCS, raylet and its object store, workers, actors); prints a table of each run's
last sample and of the output once the last run stopped, and writes every sample to bench/results/soak.json.

    python bench/soak.py                      # 30 minutes, a restart every 5
    python bench/soak.py --minutes 5 --restart-every 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, RESULTS  # noqa: E402
from skyreels_batch.job.manifest import write_manifest  # noqa: E402

TINY = {"num_frames": 9, "height": 32, "width": 32, "num_inference_steps": 2}


def soak_rows(count: int) -> list[dict]:
    """Small rows, each with a prompt of its own (one embedding each), every 10th a two-segment video."""
    rows = [{**TINY, "id": f"soak-{n:05d}", "prompt": f"soak prompt {n}", "seed": n} for n in range(count)]
    for row in rows[::10]:
        row.update(num_frames=33, base_num_frames=17, overlap_history=5)
    return rows


STATE = ("results", "gallery/data", "_embeddings", "_segments", "_records")


def sample(output: Path, driver: psutil.Process | None, started: float) -> dict:
    """What the output holds besides the videos and their pictures, and the memory of the run's processes."""
    state = [path for folder in STATE for path in (output / folder).rglob("*") if path.is_file()]
    return {
        "minute": round((time.monotonic() - started) / 60, 2),
        "videos": len(list((output / "videos").glob("*.mp4"))),
        "state_files": len(state),
        "state_mb": round(sum(size(path) for path in state) / 2**20, 2),
        "index_parts": len(list((output / "results").glob("part-*.parquet"))),
        "embeddings": len(list((output / "_embeddings").glob("*.safetensors"))),
        "segment_dirs": len(list((output / "_segments").glob("*"))),
        "records": len(list((output / "_records").glob("*.json"))),
        "driver_rss_mb": round(rss([driver] if driver else []) / 2**20, 1),
        "ray_rss_mb": round(rss(ray_processes(driver)) / 2**20, 1),
    }


def size(path: Path) -> int:
    """A file's size; 0 for one the job removed since the listing."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def rss(processes: list[psutil.Process]) -> int:
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def ray_processes(driver: psutil.Process | None) -> list[psutil.Process]:
    """The processes of the local Ray the driver started: its GCS and raylet (with the object store), and their
    workers and actors."""
    try:
        return driver.children(recursive=True) if driver else []
    except psutil.NoSuchProcess:
        return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--restart-every", type=float, default=5.0, help="minutes between SIGTERMs")
    parser.add_argument("--rows", type=int, default=20_000, help="more than the run can render: it never ends")
    parser.add_argument("--sample-s", type=float, default=10.0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="soak-"))
    manifest, output = write_manifest(work / "manifest.parquet", soak_rows(args.rows)), work / "out"
    command = [sys.executable, "jobs/render.py", str(manifest), "--output", str(output), "--index-interval", "1"]
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="rs-", dir="/tmp")}
    started, samples, runs = time.monotonic(), [], []
    deadline = started + args.minutes * 60
    while time.monotonic() < deadline:
        stop_at = min(deadline, time.monotonic() + args.restart_every * 60)
        first = len(samples)
        run = run_until(command, env, stop_at, lambda driver: sample(output, driver, started), args.sample_s)
        samples += [{"run": len(runs), **row} for row in run.pop("samples")]
        runs.append({**run, "samples": [first, len(samples)]})
        print(f"run {len(runs)}: exit {run['exit']}, last line: {run['last_line']}", flush=True)
        print_table(samples)
    result = {"minutes": args.minutes, "restart_every": args.restart_every, "runs": runs, "samples": samples}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(result, indent=1))
    shutil.rmtree(work, ignore_errors=True)


def run_until(command: list[str], env: dict, stop_at: float, take_sample, every_s: float) -> dict:
    """Run the job, sampling every `every_s`, until `stop_at`; then SIGTERM it (a clean stop) and wait."""
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    driver, started, samples = psutil.Process(process.pid), time.monotonic(), []
    while process.poll() is None and time.monotonic() < stop_at:
        samples.append(take_sample(driver))
        time.sleep(every_s)
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=300)
    reader.join(timeout=10)
    samples.append(take_sample(None))
    last = lines[-1].strip() if lines else ""
    return {"exit": code, "seconds": round(time.monotonic() - started, 1), "last_line": last, "samples": samples}


COLUMNS = ("minute", "run", "videos", "state_files", "state_mb", "index_parts", "embeddings", "segment_dirs")
COLUMNS += ("records", "driver_rss_mb", "ray_rss_mb")


def print_table(samples: list[dict]) -> None:
    """Each run's last sample while its driver ran, then the output once the last run stopped: whether anything
    grows with the length of the run."""
    keep = []
    for run in sorted({row["run"] for row in samples}):
        running = [row for row in samples if row["run"] == run and row["driver_rss_mb"]]
        keep += running[-1:]
    keep.append(samples[-1])
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in keep:
        cells = [f"{row[name]:,}" if isinstance(row[name], int) else f"{row[name]}" for name in COLUMNS]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
