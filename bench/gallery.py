"""How the gallery holds up as a run grows: results indexes of 1,000 to 100,000 synthetic rows, their gallery
written as a run's end writes it, then opened from disk in headless Chromium.

    python bench/gallery.py [--rows 1000 10000 100000]

Prints a table and writes bench/results/gallery.json. Columns: `write s` (folding the rows into the index and
writing the gallery, as a run's end does), `data MB` (the gallery's row scripts), `open s` (from navigation to
the first page of cards drawn), then in the page: `next page ms`, `search ms` (a prompt substring over every row)
and `filter ms` (failed rows only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import common
from browser import start_chromium

from skyreels_batch.output.gallery import Gallery, data_dir
from skyreels_batch.output.results import ResultsIndex

PROMPT = "A slow aerial shot over a coastline at golden hour, waves breaking on rocks, seabirds, number {k}"
TIMED = """
const [id, value] = arguments;
const started = performance.now();
const field = document.getElementById(id);
field.value = value;
field.dispatchEvent(new Event(id === 'search' ? 'input' : 'change'));
return performance.now() - started;
"""


def index_rows(count: int):
    for k in range(count):
        failed = k % 20 == 0
        params = {"mode": ("t2v", "i2v", "v2v")[k % 3], "prompt": PROMPT.format(k=k), "seed": k}
        yield {
            "id": f"video-{k:07d}",
            "status": "failed" if failed else "done",
            "error": f"row 'video-{k:07d}': num_frames: must be 4k+1 (e.g. 17, 97), got 20" if failed else None,
            "uri": None if failed else f"s3://bucket/renders/videos/video-{k:07d}.mp4",
            "poster_uri": None if failed else "set",
            "sheet_uri": None if failed else "set",
            "prompt": PROMPT.format(k=k),
            "params": json.dumps(params),
            "seed": k,
            "width": 960,
            "height": 544,
            "num_frames": 97,
            "num_segments": 1,
            "render_s": 300.0 + k % 97,
        }


def measure(count: int, browser) -> dict:
    output = tempfile.mkdtemp(prefix=f"gallery-{count}-")
    started = time.perf_counter()
    index = ResultsIndex(output)
    index.add(index_rows(count))
    index.close()
    Gallery(output).follow(index, running=False)
    write_s = time.perf_counter() - started
    data_mb = sum(path.stat().st_size for path in Path(data_dir(output)).iterdir()) / 1e6
    started = time.perf_counter()
    browser.get((Path(output) / "index.html").as_uri())
    while not browser.execute_script("return document.querySelectorAll('.card').length"):
        time.sleep(0.01)
    open_s = time.perf_counter() - started
    next_ms = browser.execute_script(
        "const t = performance.now(); document.getElementById('next').click(); return performance.now() - t"
    )
    search_ms = browser.execute_script(TIMED, "search", "number 12345")
    browser.execute_script(TIMED, "search", "")
    filter_ms = browser.execute_script(TIMED, "status", "failed")
    return {
        "rows": count,
        "write_s": round(write_s, 2),
        "data_mb": round(data_mb, 1),
        "open_s": round(open_s, 2),
        "next_page_ms": round(next_ms, 1),
        "search_ms": round(search_ms, 1),
        "filter_ms": round(filter_ms, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[1_000, 10_000, 100_000])
    args = parser.parse_args()
    browser = start_chromium()
    try:
        table = []
        for count in args.rows:
            table.append(measure(count, browser))
            print(f"done: {count:,} rows", flush=True)
    finally:
        browser.quit()
    common.print_table(table)
    path = common.save(
        "gallery",
        {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU only",
            "command": "python bench/gallery.py --rows " + " ".join(str(count) for count in args.rows),
            "rows": table,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
