"""Peak memory against video length: this job's segment chain vs diffusers' in-process long video.

Each measurement runs in a fresh process and reports its peak resident memory (ru_maxrss):
- job: the render stage (RenderVideos, the actor's code) then the writer stage (WriteVideos) on one row, in one
  process, so the figure is the larger of the two plus both their baselines;
- diffusers: SkyReelsV2DiffusionForcingPipeline(num_frames > base_num_frames, overlap_history=...) returning
  uint8-ready frames, as a user would call it before export_to_video.

    python bench/long_video_memory.py [--height 192 --width 320 --segments 4 8 16]

Prints a table and writes bench/results/long_video_memory.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASE, OVERLAP = 37, 17  # 10-latent-frame windows continuing from 5: 20 new frames a segment


def frames_for(segments: int) -> int:
    base_latents, overlap_latents = (BASE - 1) // 4 + 1, (OVERLAP - 1) // 4 + 1
    latents = base_latents + (segments - 1) * (base_latents - overlap_latents)
    return (latents - 1) * 4 + 1


def measure(mode: str, segments: int, height: int, width: int) -> dict:
    row = {
        "id": f"bench-{segments}",
        "prompt": "a long tracking shot",
        "num_frames": frames_for(segments),
        "base_num_frames": BASE,
        "overlap_history": OVERLAP,
        "height": height,
        "width": width,
        "seed": 0,
        "num_inference_steps": 2,
        "guidance_scale": 5.0,
    }
    output = subprocess.run(
        [sys.executable, __file__, "--child", mode, json.dumps(row)], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def child(mode: str, row: dict) -> None:
    import torch

    torch.set_num_threads(2)
    started = time.perf_counter()
    if mode == "job":
        import pyarrow as pa

        from skyreels_batch.models import card_for
        from skyreels_batch.stages.encode import EncodePrompts
        from skyreels_batch.stages.render import RenderVideos
        from skyreels_batch.stages.validate import ValidateRows
        from skyreels_batch.stages.write import WriteVideos

        card = card_for("tiny-df")
        with tempfile.TemporaryDirectory() as output:
            rows = ValidateRows(card, max_frames=100_000, duplicate_ids=())(pa.Table.from_pylist([row]))
            encoded = EncodePrompts(card, output=output, device="cpu", torch_threads=2)(rows)
            rendered = RenderVideos(card, output=output, device="cpu", torch_threads=2)(encoded)
            written = WriteVideos(output=output, crf=18, lossless=False)(rendered).to_pylist()[0]
            assert written["error"] is None, written["error"]
            segments = written["num_segments"]
    else:
        from diffusers import SkyReelsV2DiffusionForcingPipeline

        from skyreels_batch.models import card_for
        from skyreels_batch.models.embedded import materialize
        from skyreels_batch.output.video import to_uint8

        pipe = SkyReelsV2DiffusionForcingPipeline.from_pretrained(materialize(card_for("tiny-df")))
        pipe.set_progress_bar_config(disable=True)
        frames = pipe(
            **{k: v for k, v in row.items() if k not in ("id", "seed")},
            generator=torch.Generator().manual_seed(row["seed"]),
        ).frames[0]
        frames = to_uint8(frames)
        segments = None
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mib": peak_mib, "seconds": time.perf_counter() - started, "rendered_segments": segments}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--segments", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], json.loads(args.child[1]))
        return

    rows = []
    for segments in args.segments:
        for mode in ("job", "diffusers"):
            result = measure(mode, segments, args.height, args.width)
            rows.append({"mode": mode, "segments": segments, "frames": frames_for(segments), **result})
            print(f"  measured {mode} {segments} segments: {result['peak_mib']:.0f} MiB", file=sys.stderr)

    print(f"\nPeak memory, {args.height}x{args.width}, embedded tiny-df, windows of {BASE} frames / {OVERLAP} overlap")
    print(f"| {'segments':>8} | {'frames':>6} | {'job peak MiB':>12} | {'diffusers peak MiB':>18} |")
    print(f"| {'-' * 8} | {'-' * 6} | {'-' * 12} | {'-' * 18} |")
    by = {(r["mode"], r["segments"]): r for r in rows}
    for segments in args.segments:
        job, ref = by[("job", segments)], by[("diffusers", segments)]
        print(f"| {segments:>8} | {frames_for(segments):>6} | {job['peak_mib']:>12.0f} | {ref['peak_mib']:>18.0f} |")
    low, high = min(args.segments), max(args.segments)
    ratios = {mode: by[(mode, high)]["peak_mib"] / by[(mode, low)]["peak_mib"] for mode in ("job", "diffusers")}
    print(f"\nratio {high} vs {low} segments: job {ratios['job']:.2f}x, diffusers {ratios['diffusers']:.2f}x")

    out = Path(__file__).parent / "results" / "long_video_memory.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"height": args.height, "width": args.width, "rows": rows, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
