"""Where a render actor's time goes: the job with one render actor (the README's line, `--workers 1`) on equal short
videos, each row's time split from the index: inside the transformer's forward passes (`transformer_s`), decoding
latents to frames (`decode_s`), waiting for storage (`persist_wait_s`: segments are written on a background thread
while the next is denoised) and the rest (prompt embeddings, inputs, control calls). The plain diffusers loop
(bench/plain_loop.py) on the same manifest gives `x plain`.

    pip install -e ".[bench]"    # imageio + imageio-ffmpeg: export_to_video's backend, for the plain loop
    python bench/render_time.py [--videos 12 --steps 4 16 --size 128 --frames 33 --model bench-df]

Prints a table and writes bench/results/render_time.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import common

from skyreels_batch.job.manifest import write_manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=12)
    parser.add_argument("--steps", type=int, nargs="*", default=[4, 16], help="denoising steps; a run for each")
    parser.add_argument("--size", type=int, default=128, help="height and width")
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--model", default="bench-df")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="render-time-"))
    table = []
    for steps in args.steps:
        shape = {"height": args.size, "width": args.size, "num_frames": args.frames, "num_inference_steps": steps}
        manifest = write_manifest(work / f"{steps}.parquet", [{**row, **shape} for row in common.rows(args.videos)])
        plain = common.run_plain(manifest, work / f"plain-{steps}", model=args.model)
        job = common.run_job(manifest, work / f"job-{steps}", model=args.model, workers=1)
        busy = job["busy_s"]
        parts = {name: job[f"{name}_s"] / busy for name in ("transformer", "decode", "persist_wait")}
        table.append(
            {
                "steps": steps,
                "wall_s": round(job["wall_s"], 1),
                "x_plain": round(plain["wall_s"] / job["wall_s"], 2),
                "phase_x_plain": round(plain["phase_s"] / job["phase_s"], 2),
                "s_per_video": round(busy / job["videos"], 2),
                "transformer": round(parts["transformer"], 3),
                "decode": round(parts["decode"], 3),
                "persist_wait": round(parts["persist_wait"], 4),
                "rest": round(1 - sum(parts.values()), 3),
            }
        )
        print(f"done: {steps} steps", flush=True)
    steps = " ".join(map(str, args.steps))
    command = f"python bench/render_time.py --videos {args.videos} --steps {steps} --size {args.size} "
    command += f"--frames {args.frames} --model {args.model}"
    videos = f"{args.videos} of {args.size}x{args.size}x{args.frames}f, one render actor"
    common.finish("render_time", table, command, model=args.model, videos=videos)


if __name__ == "__main__":
    main()
