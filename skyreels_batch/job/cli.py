"""`python jobs/render.py MANIFEST ...`: the command line of the render job.

Exit codes: 0 every row done; 1 some rows failed (all others rendered); 2 the invocation or the manifest as a
whole is unusable; 3 stopped by SIGINT / SIGTERM before every row was done (the same command resumes).
"""

from __future__ import annotations

import argparse
import json
import sys

from skyreels_batch.config import JobConfig, JobRefused, PipelineOptions
from skyreels_batch.job.manifest import ManifestError
from skyreels_batch.models import UnknownModelError
from skyreels_batch.models.checkpoints import CheckpointError
from skyreels_batch.output.quality import parse_gate
from skyreels_batch.schema import manifest_columns

EXIT_DONE, EXIT_SOME_FAILED, EXIT_UNUSABLE, EXIT_STOPPED = 0, 1, 2, 3


def parse_workers(value: str) -> tuple[int, int | None]:
    """`N` (fixed pool) or `MIN:MAX` (autoscaling pool); MAX may be `auto` (one actor per GPU)."""
    low, _, high = value.partition(":")
    try:
        minimum = int(low)
        maximum = None if high == "auto" else int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--workers wants N, MIN:MAX or MIN:auto, got {value!r}") from None
    if minimum < 1 or (maximum is not None and maximum < minimum):
        raise argparse.ArgumentTypeError(f"--workers wants 1 <= MIN <= MAX, got {value!r}")
    return minimum, maximum


def parse_resource(value: str) -> tuple[str, float]:
    name, _, amount = value.partition("=")
    try:
        return name, float(amount or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--render-resource wants NAME or NAME=AMOUNT, got {value!r}") from None


def parse_quality_gate(value: str) -> str:
    try:
        parse_gate(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def parse_attention_backend(value: str) -> str:
    from diffusers.models.attention_dispatch import AttentionBackendName  # only when the flag is given

    names = sorted(backend.value for backend in AttentionBackendName)
    if value not in names:
        raise argparse.ArgumentTypeError(f"--attention-backend wants one of {', '.join(names)}; got {value!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    columns = "\n".join(f"  {name:20} {text}" for name, text in manifest_columns().items())
    parser = argparse.ArgumentParser(
        prog="python jobs/render.py",
        description="Render every row of a Parquet manifest into an MP4 with SkyReels-V2 on a Ray cluster.",
        epilog=f"manifest columns:\n{columns}\n\nexit codes: 0 all rows done, 1 some rows failed, "
        "2 unusable invocation or manifest, 3 stopped by SIGINT/SIGTERM (run the same command to resume)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "manifest", metavar="MANIFEST", help="Parquet file, directory or glob; local path or fsspec URL"
    )
    parser.add_argument(
        "--output",
        default="./renders",
        metavar="URI",
        help="output prefix, local path or fsspec URL (default: ./renders)",
    )
    parser.add_argument(
        "--model",
        default="tiny-df",
        metavar="NAME_OR_DIR",
        help="registry name (python -m skyreels_batch.models list), or a diffusers directory: local, or on object "
        "storage (s3://..., fetched once per node) (default: the embedded tiny-df)",
    )
    parser.add_argument(
        "--workers",
        type=parse_workers,
        default=(1, None),
        metavar="MIN:MAX",
        help="render actor pool size: N, MIN:MAX or MIN:auto (default 1:auto = one per GPU the cluster can have, now "
        "and once its autoscaler adds nodes; 1 without GPUs)",
    )
    parser.add_argument(
        "--text-workers",
        type=int,
        default=1,
        metavar="N",
        help="text-encoder actors (default 1): each unique prompt is encoded once, render actors get embeddings",
    )
    parser.add_argument("--crf", type=int, default=18, metavar="N", help="H.264 quality, 0-51, lower is better (18)")
    parser.add_argument("--lossless", action="store_true", help="lossless RGB H.264 (libx264rgb) for masters")
    parser.add_argument(
        "--max-frames", type=int, default=1457, metavar="N", help="reject rows asking for more frames (default 1457)"
    )
    parser.add_argument(
        "--save-latents",
        action="store_true",
        help="also write <output>/latents/<id>.safetensors (key 'latents', [1, C, L, h, w])",
    )
    parser.add_argument(
        "--quality-gate",
        nargs="?",
        const="default",
        type=parse_quality_gate,
        metavar="SIGNAL=VALUE,...",
        help="flag videos whose quality signals pass the gate's thresholds (quality_flags in the index; the dataset "
        "leaves them out): the defaults alone, or some changed, e.g. frozen_fraction=0.3,seam_jump=3",
    )
    parser.add_argument(
        "--keep-flagged", action="store_true", help="the dataset keeps the videos the quality gate flagged"
    )
    parser.add_argument(
        "--max-retries",
        type=int,
        default=3,
        metavar="N",
        help="retry a row lost in its pass (its render actor died: preemption, OOM) up to N times, then mark it "
        "failed (3)",
    )
    parser.add_argument(
        "--stop-grace",
        type=float,
        default=60.0,
        metavar="S",
        help="on SIGINT/SIGTERM, wait up to S seconds for the segments in flight to persist, then stop (60); "
        "a second signal stops at once",
    )
    parser.add_argument(
        "--index-interval",
        type=float,
        default=15.0,
        metavar="S",
        help="fold finished videos into the results index every S seconds while the job runs (15)",
    )
    parser.add_argument(
        "--gpus-per-video",
        type=int,
        default=1,
        choices=[1, 2, 4, 8],
        metavar="N",
        help="render each video on a group of N GPUs of one node, its windows split between them (sequence "
        "parallelism): for a few very long videos; on many short ones it costs throughput (1, 2, 4 or 8; default 1)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="render nothing; print each video's segment plan as one JSON line, then the totals",
    )
    parser.add_argument(
        "--render-resource",
        type=parse_resource,
        action="append",
        default=[],
        metavar="NAME[=AMOUNT]",
        help="a custom Ray resource each render actor needs (repeatable), e.g. render=1 to keep render work on the "
        "node types that offer it",
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cuda", "cpu"],
        default="auto",
        help="where render actors run (default: cuda when the cluster has GPUs or its autoscaler can add nodes with "
        "them; the job's first line says what it decided and why)",
    )
    parser.add_argument(
        "--manifest-order",
        action="store_true",
        help="render rows in manifest order instead of longest first (the most work first finishes sooner)",
    )
    parser.add_argument(
        "--offload",
        choices=["none", "model", "group"],
        default="none",
        help="keep weights in host memory, moving whole models (model) or layer groups (group) to the GPU as they "
        "run, for GPUs smaller than the checkpoint (default none)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the transformer's repeated blocks (regional compilation) in each actor",
    )
    parser.add_argument(
        "--attention-backend",
        type=parse_attention_backend,
        metavar="NAME",
        help="diffusers attention backend of the transformer, e.g. flash, _flash_3, sage, native (default: diffusers')",
    )
    return parser


def dry_run(config: JobConfig) -> int:
    from skyreels_batch.job.work import plan_job

    failed = 0
    for line in plan_job(config):
        failed = line.get("total", {}).get("failed", failed)
        print(json.dumps(line), flush=True)
    return EXIT_SOME_FAILED if failed else EXIT_DONE


def job_config(args: argparse.Namespace) -> JobConfig:
    return JobConfig(
        manifest=args.manifest,
        output=args.output,
        model=args.model,
        min_workers=args.workers[0],
        max_workers=args.workers[1],
        text_workers=args.text_workers,
        crf=args.crf,
        lossless=args.lossless,
        max_frames=args.max_frames,
        save_latents=args.save_latents,
        max_retries=args.max_retries,
        device=args.device,
        pipeline=PipelineOptions(offload=args.offload, compile=args.compile, attention_backend=args.attention_backend),
        longest_first=not args.manifest_order,
        render_resources=dict(args.render_resource),
        stop_grace_s=args.stop_grace,
        index_interval_s=args.index_interval,
        gpus_per_video=args.gpus_per_video,
        quality_gate=args.quality_gate,
        keep_flagged=args.keep_flagged,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = job_config(args)
    from skyreels_batch.job.collect import StopRequest  # Ray and torch load only once the flags are good
    from skyreels_batch.job.pipeline import run_job

    try:
        if args.dry_run:
            return dry_run(config)
        summary = run_job(config, log=lambda line: print(line, flush=True), stop=StopRequest(on_signals=True))
    except (UnknownModelError, CheckpointError, ManifestError, JobRefused) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_UNUSABLE
    already = f" ({summary.skipped:,} already done)" if summary.skipped else ""
    print(f"{summary.done:,} done{already}, {summary.failed:,} failed of {summary.total:,}", flush=True)
    if summary.stopped:
        print(f"stopped: {summary.left:,} rows left; run the same command to resume", flush=True)
        return EXIT_STOPPED
    return EXIT_SOME_FAILED if summary.failed else EXIT_DONE
