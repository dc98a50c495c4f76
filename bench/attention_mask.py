"""Asynchronous rows' self-attention: diffusers' dense boolean mask against this job's flex-attention BlockMask, in
one transformer forward of the real SkyReels-V2 1.3B configuration cut to `--layers` blocks (random weights, built
in code), at a 720P frame size, with causal blocks of 5 latent frames (of half the window below 10).

    python bench/attention_mask.py [--latent-frames 10 --height 720 --width 1280 --layers 1]

Paths: `dense` (diffusers: `num_frame_per_block` set, the forward builds the [1, 1, L, L] mask), `block mask`
(`block_causal_attention` as a render runs it: flex attention, its self-attention compiled off the CPU and above
4,096 tokens on it) and `block mask, uncompiled` (flex attention never compiled: why the job compiles it). Each
path runs in a fresh process: seconds of one forward after a warm-up (which pays the compile), and peak memory:
on the CPU the peak RSS (reset after the warm-up) less the RSS before the forward, on CUDA `max_memory_allocated`.
The CPU default is a 10-latent-frame window (36,000 tokens, two causal blocks of 5), not the 25 of a 97-frame
window (90,000 tokens, whose dense mask is 8.1 GB): too slow on two cores. bench/gpu.py runs the whole window.

Prints a table and writes bench/results/attention_mask.json (`--out` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

PATHS = ["dense", "block mask, uncompiled", "block mask"]


def forward_once(path: str, *, latent_frames: int, height: int, width: int, layers: int, device: str) -> dict:
    """One path's forward: seconds after a warm-up, and its peak memory in GiB."""
    import psutil
    import torch
    from diffusers import SkyReelsV2Transformer3DModel

    from skyreels_batch.models import card_for
    from skyreels_batch.render.diffusion_forcing import COMPILE_ABOVE, block_causal_attention

    config = {**card_for("bench-1.3b").embedded["transformer"], "num_layers": layers}
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    transformer = SkyReelsV2Transformer3DModel(**config).to(device, dtype).eval()
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, latent_frames, height // 8, width // 8, generator=generator).to(device, dtype)
    timestep = torch.randint(0, 1000, (1, latent_frames), generator=generator).to(device)
    text = torch.randn(1, 512, config["text_dim"], generator=generator).to(device, dtype)
    causal_block_size = latent_frames // 2 if latent_frames < 10 else 5  # two causal blocks at least
    compile_above = None if path == "block mask, uncompiled" else COMPILE_ABOVE

    def run() -> torch.Tensor:
        kwargs = dict(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, fps=[1])
        with torch.no_grad():
            if path == "dense":
                transformer._set_ar_attention(causal_block_size)
                return transformer(**kwargs, enable_diffusion_forcing=True).sample
            with block_causal_attention(transformer, causal_block_size, compile_above=compile_above):
                return transformer(**kwargs, enable_diffusion_forcing=True).sample

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    started = time.perf_counter()
    run()  # warm-up: the compile, kernels' first calls
    sync()
    warm_up = time.perf_counter() - started
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM): the warm-up's compile is not in it
        before = psutil.Process().memory_info().rss
    started = time.perf_counter()
    output = run()
    sync()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes()
    checksum = float(output.float().abs().mean())
    return {"seconds": seconds, "warm_up_s": warm_up, "peak_gib": (peak - before) / 2**30, "mean_abs_out": checksum}


def peak_rss_bytes() -> int:
    """The process's peak RSS since the last reset (VmHWM, in kB in /proc/self/status)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024


def measure(path: str, args: argparse.Namespace, device: str) -> dict:
    """`forward_once` in a fresh process: peak RSS is per process, and compiled code must not leak between paths."""
    shape = ["--latent-frames", str(args.latent_frames), "--height", str(args.height), "--width", str(args.width)]
    command = [sys.executable, __file__, "--child", path, "--layers", str(args.layers), "--device", device, *shape]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if done.returncode:
        if done.returncode in (-9, 137):
            return {"error": "killed: out of memory"}
        errors = [line for line in done.stderr.splitlines() if "Error" in line]
        return {"error": errors[-1] if errors else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table_rows(args: argparse.Namespace, device: str) -> list[dict]:
    tokens = args.latent_frames * (args.height // 16) * (args.width // 16)
    rows = []
    for path in PATHS:
        run = measure(path, args, device)
        row = {"path": path, "tokens": tokens, "seconds": None, "peak_gib": None, "output_vs_dense": None}
        if "error" in run:
            row["error"] = run["error"][:200]
        else:
            row |= {"seconds": round(run["seconds"], 2), "peak_gib": round(run["peak_gib"], 2), "error": None}
            dense = next((r["_out"] for r in rows if r["path"] == "dense" and "_out" in r), None)
            row["output_vs_dense"] = round(run["mean_abs_out"] / dense, 5) if dense else None
            row["_out"] = run["mean_abs_out"]
        rows.append(row)
        print(f"done: {path}", flush=True)
    return [{key: value for key, value in row.items() if not key.startswith("_")} for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent-frames", type=int, default=10, help="latent frames of the window (97 frames: 25)")
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--layers", type=int, default=1, help="transformer blocks of the 1.3B configuration")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="where attention_mask.json goes (default: bench/results)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = dict(latent_frames=args.latent_frames, height=args.height, width=args.width, layers=args.layers)
    if args.child:
        print(json.dumps(forward_once(args.child, **shape, device=args.device)))
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common
    import torch

    rows = table_rows(args, args.device)
    common.print_table(rows)
    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.machine()}, {os.cpu_count()} cores"
    payload = {
        "machine": machine,
        "torch": torch.__version__,
        "command": f"python bench/attention_mask.py --latent-frames {args.latent_frames} --height {args.height} "
        f"--width {args.width} --layers {args.layers}" + (" --device cuda" if args.device == "cuda" else ""),
        "dense_mask_gib_at_97_frames": round((25 * (args.height // 16) * (args.width // 16)) ** 2 / 2**30, 2),
        "rows": rows,
    }
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "attention_mask.json"
        path.write_text(json.dumps(payload, indent=2) + "\n")
    else:
        path = common.save("attention_mask", payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
