"""What the quality signals cost the writer: `python bench/quality.py` (CPU; a few minutes on 2 cores).

For each size and length, one video's segments go through the writer stage (WriteVideos: read the segments, H.264,
poster and sheet, quality signals, record) and, on the same frames, through the quality meter alone; the table
gives both and the meter's share of the write (the goal: at most 5%). Frames are a detailed picture panning, so
x264 has real work, not noise; every number is the best of `--repeats`. Writes bench/results/quality.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import print_table, save  # noqa: E402
from skyreels_batch.models import card_for  # noqa: E402
from skyreels_batch.output.quality import QualityMeter  # noqa: E402
from skyreels_batch.render.segments import SegmentStore  # noqa: E402
from skyreels_batch.schema import resolve  # noqa: E402
from skyreels_batch.stages.write import WriteVideos  # noqa: E402

SIZES = {"540P": (544, 960), "720P": (720, 1280)}


def panning(height: int, width: int, count: int) -> np.ndarray:
    coarse = np.random.default_rng(0).integers(0, 256, (height // 16, width // 16 + count, 3), dtype=np.uint8)
    picture = cv2.resize(coarse, ((width // 16 + count) * 16, height), interpolation=cv2.INTER_CUBIC)
    return np.stack([picture[:, 4 * k : 4 * k + width] for k in range(count)])


def best_of(repeats: int, work) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def measure(size: str, frames: int, repeats: int) -> dict:
    height, width = SIZES[size]
    video = panning(height, width, frames)
    params = resolve(
        {"id": "bench", "prompt": "bench", "num_frames": frames, "height": height, "width": width},
        card_for("tiny-df"),
        max_frames=frames,
    )
    row = {"id": "bench", "params": params.model_dump_json(), "num_segments": 1, "error": None, "stopped": None}

    def write() -> None:
        with tempfile.TemporaryDirectory() as output:
            store = SegmentStore(output, params.id)
            store.open(params)
            store.save(0, video, torch.zeros(1), torch.zeros(1))
            WriteVideos(output=output, crf=18, lossless=False).process(params, row)

    def meter() -> None:
        watched = QualityMeter(frames)
        for _ in watched.watch(iter(video)):
            pass
        watched.quality()

    write_s, quality_s = best_of(repeats, write), best_of(repeats, meter)
    return {
        "size": f"{size} ({width}x{height})",
        "frames": frames,
        "write_s": round(write_s, 3),
        "quality_s": round(quality_s, 3),
        "quality_share": f"{quality_s / write_s:.1%}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[97, 257])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rows = [measure(size, frames, args.repeats) for size in SIZES for frames in args.frames]
    print_table(rows)
    save("quality", {"rows": rows})


if __name__ == "__main__":
    main()
