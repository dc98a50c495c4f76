"""The job's configuration, as the command line builds it (resources and pool sizes: job/resources.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from skyreels_batch.output.quality import parse_gate

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
    quality_gate: str | None = Field(
        default=None,
        description="Flag videos whose quality signals pass a threshold (quality.GATE): 'default', or "
        "'SIGNAL=VALUE,...' to change some. None: signals only, no flags.",
    )
    keep_flagged: bool = Field(
        default=False, description="The dataset (videos/metadata.parquet) keeps videos the quality gate flagged."
    )

    @field_validator("quality_gate")
    @classmethod
    def _gate_parses(cls, spec: str | None) -> str | None:
        if spec is not None:
            parse_gate(spec)
        return spec

    def gate(self) -> dict[str, tuple[str, float]] | None:
        return None if self.quality_gate is None else parse_gate(self.quality_gate)


class JobRefused(ValueError):
    """The job can never run as asked, on this cluster or with this model: exit 2 at the door, before any work."""
