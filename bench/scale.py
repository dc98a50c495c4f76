"""Scale: manifests of 10^4, 10^5 and 10^6 rows (90% 17 frames, 10% 257 frames: three segments), embedded model.

    python bench/scale.py [--rows 10000 100000 1000000]

For each size:
- `validate rows/s`: PlanRows (schema, model card, plan, request hash) over the whole manifest in this process,
  one core;
- `dry-run s`: `python jobs/render.py MANIFEST --dry-run`, launch to exit (one JSON line per row);
- the real job, `python jobs/render.py MANIFEST` against a `ray start --head` of this script's (2 CPUs):
  `first render s` from launch until a render actor starts the first video (its `_segments/<id>/params.json`),
  the driver's `peak RSS MiB` until then, and the object store at that moment (`store MiB`, `store objects`);
- then SIGTERM to the driver: `stop s` until it exits, and its exit code (3: stopped, the same command resumes).

Prints a table and writes bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(common.REPO))  # tests.ray_head: a throwaway head on free ports, stopped cleanly

from skyreels_batch.models import card_for  # noqa: E402
from skyreels_batch.stages.validate import PlanRows  # noqa: E402
from tests.ray_head import ray_head  # noqa: E402


def write_manifest(path: Path, count: int) -> Path:
    ids = [f"video-{number:07d}" for number in range(count)]
    prompts = [f"a short film, scene {number}: a street market at dusk, cinematic" for number in range(count)]
    frames = [257 if number % 10 == 0 else 17 for number in range(count)]
    pq.write_table(pa.table({"id": ids, "prompt": prompts, "num_frames": pa.array(frames, pa.int64())}), path)
    return path


def validation_rate(manifest: Path) -> float:
    planner = PlanRows(card_for("tiny-df"), max_frames=1457, duplicate_ids=())
    started = time.perf_counter()
    rows = 0
    for batch in pq.ParquetFile(manifest).iter_batches(batch_size=65536):
        rows += planner(pa.Table.from_batches([batch])).num_rows
    return rows / (time.perf_counter() - started)


def dry_run_seconds(manifest: Path) -> float:
    started = time.perf_counter()
    command = [sys.executable, "jobs/render.py", str(manifest), "--dry-run"]
    subprocess.run(command, cwd=common.REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def job_until_first_render(manifest: Path, output: Path, timeout_s: float) -> dict:
    from ray._private.internal_api import memory_summary

    with ray_head(num_cpus=2) as head:
        env = {**os.environ, **head.env, "RAY_ADDRESS": head.address}
        command = [sys.executable, "jobs/render.py", str(manifest), "--output", str(output)]
        started = time.perf_counter()
        driver = subprocess.Popen(command, cwd=common.REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        process, peak, first = psutil.Process(driver.pid), 0, None
        while first is None and time.perf_counter() - started < timeout_s and driver.poll() is None:
            peak = max(peak, process.memory_info().rss)
            if any((output / "_segments").glob("*/params.json")):
                first = time.perf_counter() - started
            time.sleep(0.2)
        summary = memory_summary(address=head.address, stats_only=True)
        store = re.search(r"Plasma memory usage (\d+) MiB, (\d+) objects", summary)
        stop_started = time.perf_counter()
        driver.send_signal(signal.SIGTERM)
        try:
            code = driver.wait(timeout=180)
        except subprocess.TimeoutExpired:
            driver.kill()
            code = driver.wait()
        stop_s = time.perf_counter() - stop_started
        assert first is not None, (
            f"no video started rendering; the driver's stderr ends:\n{driver.stderr.read()[-3000:]}"
        )
    return {
        "first_render_s": round(first, 1),
        "peak_rss_mib": round(peak / 2**20),
        "store_mib": int(store.group(1)) if store else None,
        "store_objects": int(store.group(2)) if store else None,
        "stop_s": round(stop_s, 1),
        "exit_code": code,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the first render")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="scale-"))
    table = []
    for count in args.rows:
        manifest = write_manifest(work / f"manifest-{count}.parquet", count)
        row = {"rows": count, "validate_rows_per_s": round(validation_rate(manifest))}
        row["dry_run_s"] = round(dry_run_seconds(manifest), 1)
        row.update(job_until_first_render(manifest, work / f"out-{count}", args.timeout))
        table.append(row)
        print(f"done: {count:,} rows", flush=True)
    common.print_table(table)
    path = common.save("scale", {"machine": platform.platform(), "cpus": os.cpu_count(), "table": table})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
