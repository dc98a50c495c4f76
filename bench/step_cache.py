"""Step caches (the manifest's `cache` column) measured in a render actor's own code path: the text-encoding and
render stages built as an actor builds them, `--videos` videos per cache setting after one warm-up video.

    python bench/step_cache.py [--videos 4 --model bench-df --caches none first_block:0.1 ...]

For each setting: the transformer passes run in full and skipped (a skipped pass ran only the first block, or
nothing but TaylorSeer's prediction), seconds per video (median), the speed-up against no cache, and how far the
video's latents moved (max |difference| over max |latents| of the same row without a cache). Caveat: the embedded
models' weights are random, so how often a threshold skips here says nothing about real SkyReels-V2 weights;
the seconds a skipped pass saves does carry over.

Prints a table and writes bench/results/step_cache.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import common
import pyarrow as pa
import torch
from safetensors.torch import load_file

from skyreels_batch.models import card_for
from skyreels_batch.render.timing import PassCounter
from skyreels_batch.stages.encode import EncodePrompts
from skyreels_batch.stages.render import RenderVideos
from skyreels_batch.stages.validate import ValidateRows
from skyreels_batch.stages.write import WriteVideos

CACHES = ["none", "first_block:0.05", "first_block:0.1", "first_block:0.2", "first_block:0.4", "taylorseer:2"]
CACHES += ["taylorseer:4"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=4, help="timed videos per setting (after one warm-up)")
    parser.add_argument("--model", default="bench-df")
    parser.add_argument("--caches", nargs="*", default=CACHES, help="`none` and manifest `cache` values")
    args = parser.parse_args()

    card = card_for(args.model)
    threads = os.cpu_count() or 1
    table, reference = [], {}
    with tempfile.TemporaryDirectory() as output:
        encode = EncodePrompts(card, output=output, device="cpu", torch_threads=threads)
        render = RenderVideos(card, output=output, device="cpu", torch_threads=threads)
        write = WriteVideos(output=output, crf=18, lossless=False, save_latents=True)
        validate = ValidateRows(card, max_frames=10_000)
        counter = PassCounter(render.pipeline.transformer)
        for spec in args.caches:
            seconds, runs, skips, moved = [], 0, 0, 0.0
            for index, row in enumerate(common.rows(args.videos + 1)):
                row = {**row, "id": f"{row['id']}-{spec.replace(':', '-')}"}
                if spec != "none":
                    row["cache"] = spec
                batch = encode(validate(pa.Table.from_pylist([row])))
                before = (counter.passes, counter.skipped)
                begun = time.perf_counter()
                rendered = render(batch)
                elapsed = time.perf_counter() - begun
                (result,) = write(rendered).to_pylist()
                assert result["error"] is None, result["error"]
                latents = load_file(result["latents_uri"])["latents"]
                if spec == "none":
                    reference[index] = latents
                else:
                    moved = max(moved, float((latents - reference[index]).abs().max() / reference[index].abs().max()))
                if index:  # the first video warms up
                    seconds.append(elapsed)
                    runs += counter.passes - before[0]
                    skips += counter.skipped - before[1]
            median = statistics.median(seconds)
            table.append(
                {
                    "cache": spec,
                    "passes": runs,
                    "skipped": skips,
                    "s_per_video": round(median, 2),
                    "vs_none": round(table[0]["s_per_video"] / median, 2) if table else 1.0,
                    "latents_moved": round(moved, 3),
                }
            )
            print(f"done: {spec}", flush=True)
    command = f"python bench/step_cache.py --videos {args.videos} --model {args.model} --caches {' '.join(args.caches)}"
    common.finish("step_cache", table, command, model=args.model, torch=torch.__version__)


if __name__ == "__main__":
    main()
