"""Whether the same frames encode to the same H.264 bytes where the writer encodes them: in Ray workers, a few
encodes at once. For each x264 setting: how many of the encodes differ from the most common result, the MP4's size,
and its PSNR against the frames (the same random frames every run: the embedded models' output is noise too).

    python bench/encode_determinism.py [--workers 6 --encodes 20]

Prints a table and writes bench/results/encode_determinism.json.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
from fractions import Fraction

import common
import numpy as np
import ray

FRAMES = (33, 96, 160)  # frames, height, width: the example manifest's city-rain row
# How often MB-tree's encodes differ varies from run to run (from none to a third of them); the writer's setting
# runs last, in the workers the others have used.
SETTINGS = {
    "MB-tree on, 4 threads": {"crf": "18", "threads": "4"},
    "MB-tree on, 1 thread": {"crf": "18", "threads": "1"},
    "the writer's (mbtree=0, 4 threads)": {"crf": "18", "threads": "4", "x264-params": "mbtree=0"},
}


def frames() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (*FRAMES, 3), dtype=np.uint8)


def encode(pixels: np.ndarray, options: dict[str, str]) -> bytes:
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(16))
        stream.height, stream.width = pixels.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = options
        for frame in pixels:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


@ray.remote(num_cpus=0.25)  # the writer stage's share of a CPU
def checksums(options: dict[str, str], times: int) -> list[str]:
    pixels = frames()
    return [hashlib.sha256(encode(pixels, options)).hexdigest() for _ in range(times)]


def psnr(data: bytes, pixels: np.ndarray) -> float:
    import av

    with av.open(io.BytesIO(data)) as container:
        decoded = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    mse = np.mean((decoded.astype(np.float64) - pixels) ** 2)
    return float(10 * np.log10(255**2 / mse))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=6, help="Ray tasks at once")
    parser.add_argument("--encodes", type=int, default=20, help="encodes per task")
    args = parser.parse_args()
    ray.init(num_cpus=2, logging_level="WARNING")
    pixels, table = frames(), []
    for name, options in SETTINGS.items():
        tasks = [checksums.remote(options, args.encodes) for _ in range(args.workers)]
        results = [checksum for batch in ray.get(tasks) for checksum in batch]
        counts = collections.Counter(results)
        data = encode(pixels, options)
        table.append(
            {
                "x264": name,
                "encodes": len(results),
                "differ": len(results) - counts.most_common(1)[0][1],
                "distinct": len(counts),
                "bytes": len(data),
                "psnr_db": round(psnr(data, pixels), 2),
            }
        )
        print(f"done: {name}", flush=True)
    command = f"python bench/encode_determinism.py --workers {args.workers} --encodes {args.encodes}"
    shape = f"{FRAMES[0]} frames of {FRAMES[1]}x{FRAMES[2]}, random, crf 18"
    common.finish("encode_determinism", table, command, frames=shape)


if __name__ == "__main__":
    main()
