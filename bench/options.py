"""The pipeline options users of diffusers turn on, measured in a render actor's own code path: the default,
`--compile` (regional compilation of the transformer's repeated blocks) and `--attention-backend`. Each option set
runs in a fresh process (compiled code and thread pools do not leak between them): the text-encoding and render
stages are built as an actor builds them, one warm-up video is rendered (it pays the compile), then `--videos`
more are timed.

    python bench/options.py [--videos 4 --model bench-df --backends native _native_math]

Prints a table and writes bench/results/options.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import common


def child(options: dict, model: str, videos: int) -> None:
    import pyarrow as pa
    import torch

    from skyreels_batch.config import PipelineOptions
    from skyreels_batch.models import card_for
    from skyreels_batch.stages.encode import EncodePrompts
    from skyreels_batch.stages.render import RenderVideos
    from skyreels_batch.stages.validate import ValidateRows

    card = card_for(model)
    threads = os.cpu_count() or 1
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as output:
        encode = EncodePrompts(card, output=output, device="cpu", torch_threads=threads)
        render = RenderVideos(
            card, output=output, device="cpu", torch_threads=threads, options=PipelineOptions(**options)
        )
        validate = ValidateRows(card, max_frames=10_000, duplicate_ids=())
        seconds = []
        for index, row in enumerate(common.rows(videos + 1)):
            batch = encode(validate(pa.Table.from_pylist([row])))
            begun = time.perf_counter()
            (result,) = render(batch).to_pylist()
            assert result["error"] is None, result["error"]
            seconds.append(time.perf_counter() - begun)
            if index == 0:
                first = time.perf_counter() - started
    steady = sorted(seconds[1:])[len(seconds[1:]) // 2]
    print(json.dumps({"first_video_s": first, "s_per_video": steady, "torch": torch.__version__}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=4, help="timed videos per option set (after one warm-up)")
    parser.add_argument("--model", default="bench-df")
    parser.add_argument("--backends", nargs="*", default=["_native_math"], help="attention backends to try")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child), args.model, args.videos)
        return

    option_sets = [{}, {"compile": True}] + [{"attention_backend": name} for name in args.backends]
    table = []
    for options in option_sets:
        command = [sys.executable, __file__, "--child", json.dumps(options), "--videos", str(args.videos)]
        output = subprocess.run(command + ["--model", args.model], check=True, capture_output=True, text=True)
        run = json.loads(output.stdout.strip().splitlines()[-1])
        label = " ".join(
            f"--{key.replace('_', '-')}" + ("" if value is True else f" {value}") for key, value in options.items()
        )
        table.append(
            {
                "options": label or "(default)",
                "first_video_s": round(run["first_video_s"], 1),
                "s_per_video": round(run["s_per_video"], 2),
                "vs_default": round(table[0]["s_per_video"] / run["s_per_video"], 2) if table else 1.0,
            }
        )
        print(f"done: {table[-1]['options']}", flush=True)
    command = (
        f"python bench/options.py --videos {args.videos} --model {args.model} --backends {' '.join(args.backends)}"
    )
    common.finish("options", table, command, model=args.model)


if __name__ == "__main__":
    main()
