"""The job's configuration and the one place where resources and pool sizes are decided."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Offload = Literal["none", "model", "group"]


class PipelineOptions(BaseModel):
    """How each render actor sets up its pipeline, once, when it loads it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    offload: Offload = Field(
        default="none",
        description="Keep weights in host memory and move them to the device as they run: whole models "
        "(enable_model_cpu_offload) or groups of layers (group offloading); for GPUs too small for the checkpoint.",
    )
    compile: bool = Field(default=False, description="torch.compile the transformer's repeated blocks.")
    attention_backend: str | None = Field(
        default=None, description="diffusers attention backend of the transformer (None: diffusers' default)."
    )


class JobConfig(BaseModel):
    """Everything a render job needs to know, built from the command line."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    manifest: str = Field(description="Parquet manifest: a local path or fsspec URL (file, directory or glob).")
    output: str = Field(default="./renders", description="Output prefix: local path or fsspec URL.")
    model: str = Field(default="tiny-df", description="Registry name or diffusers directory.")
    min_workers: int = Field(default=1, ge=1, description="Render actors kept alive.")
    max_workers: int | None = Field(default=None, ge=1, description="Render actors at most; None: one per GPU.")
    text_workers: int = Field(default=1, ge=1, description="Text-encoder actors at most.")
    crf: int = Field(default=18, ge=0, le=51, description="H.264 constant rate factor (lower is better).")
    lossless: bool = Field(default=False, description="Lossless RGB H.264 (libx264rgb, crf 0) for masters.")
    max_frames: int = Field(default=1457, ge=1, description="Rows asking for more frames are rejected.")
    save_latents: bool = Field(default=False, description="Also write <output>/latents/<id>.safetensors.")
    max_retries: int = Field(
        default=3, ge=0, description="Retries of a row lost in its pass (its render actor died: preemption, OOM)."
    )
    device: Literal["auto", "cuda", "cpu"] = Field(default="auto", description="Where render actors run.")
    pipeline: PipelineOptions = Field(default_factory=lambda: PipelineOptions())
    longest_first: bool = Field(
        default=True, description="Render the videos with the most work first (False: manifest order)."
    )
    render_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each render actor asks for, e.g. {'render': 1} to keep render work on the "
        "node types that offer it (and off the head).",
    )
    stop_grace_s: float = Field(
        default=60.0,
        ge=0,
        description="On SIGINT/SIGTERM, how long to wait for the segments in flight to persist before stopping.",
    )
    index_interval_s: float = Field(
        default=15.0,
        gt=0,
        description="How often the driver folds finished videos into the results index while the job runs.",
    )
    gpus_per_video: int = Field(
        default=1,
        ge=1,
        le=8,
        description="Ranks that render one video together (sequence parallelism): a render worker is a group of "
        "this many processes, one GPU each, on one node.",
    )


# The text encoder shares a GPU with a render actor (1 - this each): with whole GPUs each, on a one-GPU node
# whichever pool started first would hold the GPU and the other would wait for it forever.
TEXT_ENCODER_GPU_SHARE = 0.2


class Resources(BaseModel):
    """Ray resources per stage. On CPU-only clusters every stage asks for a fraction of a CPU: a render pool
    that takes whole CPUs on a 2-core machine leaves nothing for the read tasks and the job stalls. The render
    pass (text encoders, render actors, writers) fits the cluster's CPUs at once."""

    model_config = ConfigDict(frozen=True)

    device: Literal["cuda", "cpu"]
    min_workers: int  # render workers: single actors, or groups of `ranks` processes
    max_workers: int
    ranks: int = 1  # processes per render worker (--gpus-per-video), each with the resources below
    render_num_gpus: float
    render_num_cpus: float
    render_resources: dict[str, float] = {}
    torch_threads: int
    text_workers: int
    text_num_gpus: float
    text_num_cpus: float
    read_num_cpus: float = 0.25
    write_num_cpus: float = 0.25


def plan_resources(config: JobConfig, cluster: dict[str, float]) -> Resources:
    """Pool sizes and per-actor resources from the job config and the cluster's resources (ray.cluster_resources)."""
    gpus = int(cluster.get("GPU", 0))
    cpus = max(1.0, cluster.get("CPU", os.cpu_count() or 1))
    device = config.device if config.device != "auto" else ("cuda" if gpus else "cpu")
    ranks = config.gpus_per_video
    if device == "cuda":
        max_workers = config.max_workers or max(gpus // ranks, config.min_workers)
        return Resources(
            device="cuda",
            min_workers=config.min_workers,
            max_workers=max_workers,
            ranks=ranks,
            render_num_gpus=1 - TEXT_ENCODER_GPU_SHARE,
            render_num_cpus=1,
            render_resources=config.render_resources,
            torch_threads=4,
            text_workers=config.text_workers,
            text_num_gpus=TEXT_ENCODER_GPU_SHARE,
            text_num_cpus=1,
        )
    max_workers = config.max_workers or config.min_workers
    # Leave a quarter of the CPUs to text encoders and MP4 writers; split the rest between render processes.
    processes = max_workers * ranks
    share = 0.75 * cpus / processes
    return Resources(
        device="cpu",
        min_workers=min(config.min_workers, max_workers),
        max_workers=max_workers,
        ranks=ranks,
        render_num_gpus=0,
        # At most 3/4 of a CPU: a one-CPU node then holds a render actor and a text encoder beside it. CPU counts
        # here only place actors; torch_threads decides the cores torch uses.
        render_num_cpus=round(min(0.75, share), 2),
        render_resources=config.render_resources,
        torch_threads=max(1, int(cpus // processes)),
        text_workers=config.text_workers,
        text_num_gpus=0,
        # Idle once every text is encoded: a sliver of a CPU, so the render actors keep theirs.
        text_num_cpus=round(0.2 / config.text_workers, 2),
    )
