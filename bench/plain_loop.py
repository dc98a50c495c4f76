"""The loop a diffusers user writes instead of this job: one pipeline, one call per manifest row, each video
written with `export_to_video` (imageio + imageio-ffmpeg, `pip install -e ".[bench]"`).

    python bench/plain_loop.py MANIFEST OUTPUT_DIR [--model bench-df] [--threads N]

Prints one JSON line: videos, transformer_s (time inside the transformer's forward passes), busy_s (loading and
the loop), phase_s (the loop: first video's start to last video's end).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch
from diffusers import SkyReelsV2DiffusionForcingPipeline, UniPCMultistepScheduler
from diffusers.utils import export_to_video

from skyreels_batch.models import card_for
from skyreels_batch.models.embedded import materialize
from skyreels_batch.render.timing import ForwardTimer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("manifest")
    parser.add_argument("output", type=Path)
    parser.add_argument("--model", default="bench-df")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    card = card_for(args.model)
    defaults = card.defaults
    pipe = SkyReelsV2DiffusionForcingPipeline.from_pretrained(materialize(card), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    timer = ForwardTimer(pipe.transformer)
    loaded = time.perf_counter()
    args.output.mkdir(parents=True, exist_ok=True)
    manifest = pd.read_parquet(args.manifest).to_dict("records")
    for raw in manifest:
        row = {**defaults.model_dump(), **{key: value for key, value in raw.items() if not pd.isna(value)}}
        pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=row["shift"])
        long = row["num_frames"] > row["base_num_frames"]
        frames = pipe(
            prompt=row["prompt"],
            negative_prompt=row["negative_prompt"],
            height=row["height"],
            width=row["width"],
            num_frames=row["num_frames"],
            base_num_frames=row["base_num_frames"],
            overlap_history=row["overlap_history"] if long else None,
            num_inference_steps=row["num_inference_steps"],
            guidance_scale=row["guidance_scale"],
            generator=torch.Generator().manual_seed(int(row["seed"])),
        ).frames[0]
        export_to_video(frames, str(args.output / f"{row['id']}.mp4"), fps=row["fps"])
    finished = time.perf_counter()
    rendering = finished - loaded
    print(
        json.dumps(
            {
                "videos": len(manifest),
                "transformer_s": timer.seconds,
                "busy_s": finished - started,
                "pool_s": finished - started,
                "phase_s": rendering,
            }
        )
    )


if __name__ == "__main__":
    main()
