"""The one place where resources and pool sizes are decided, from the job config and what the cluster holds now and
can become (cluster.py); and the door's checks that the job can ever be placed."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict

from skyreels_batch.config import JobConfig, JobRefused
from skyreels_batch.job.cluster import Capacity, resources_text
from skyreels_batch.models import ModelCard, attention_heads

# The text encoder shares a GPU with a render actor (1 - this each): with whole GPUs each, on a one-GPU node
# whichever pool started first would hold the GPU and the other would wait for it forever.
TEXT_ENCODER_GPU_SHARE = 0.2
# Set to 1 in a job's environment: actors are placed on Ray's GPUs exactly as on real ones (`num_gpus`, placement
# group bundles, the GPU ids Ray assigns, a render group's GPU sharing) and torch runs on the CPU. For clusters whose
# GPUs are logical (`ray start --num-gpus`, `Cluster.add_node(num_gpus=...)`, Ray's fake autoscaler), as Ray's own
# tests use them: every placement path runs without a GPU; kernels, NCCL and bf16 numerics do not.
SIMULATED_GPUS_ENV = "SKYREELS_BATCH_SIMULATED_GPUS"


def simulated_gpus() -> bool:
    return os.environ.get(SIMULATED_GPUS_ENV, "") not in ("", "0")


class Resources(BaseModel):
    """Ray resources per stage. On CPU-only clusters every stage asks for a fraction of a CPU: a render pool
    that takes whole CPUs on a 2-core machine leaves nothing for the read tasks and the job stalls. The render
    pass (text encoders, render actors, writers) fits the cluster's CPUs at once."""

    model_config = ConfigDict(frozen=True)

    device: Literal["cuda", "cpu"]  # what render and text-encoder actors are placed on
    torch_device: Literal["cuda", "cpu"]  # where their torch runs: the device, or the CPU with simulated GPUs
    decision: str = ""  # the job's first line: the device and the pool's size, and why
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

    @property
    def render_bundle(self) -> dict[str, float]:
        """What one render process (a render actor, or one rank of a render group) asks for."""
        return _bundle(self.render_num_cpus, self.render_num_gpus, self.render_resources)

    @property
    def text_bundle(self) -> dict[str, float]:
        return _bundle(self.text_num_cpus, self.text_num_gpus, {})


def _bundle(cpus: float, gpus: float, custom: dict[str, float]) -> dict[str, float]:
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **custom}


def plan_resources(
    config: JobConfig, capacity: Capacity, *, rows: int | None = None, simulated: bool = False
) -> Resources:
    """The device, pool sizes and per-actor resources, from the job config and what the cluster holds now and can
    become (cluster.read_capacity). `--device auto` is cuda when the cluster has a GPU or its autoscaler can add a
    node with one; `--workers MIN:auto` is, on GPUs, the most render workers the cluster can hold (its GPUs now and
    addable, per node, divided by --gpus-per-video), at most one per row (`rows`); without GPUs, MIN."""
    device, why = _device(config, capacity)
    ranks = config.gpus_per_video
    if device == "cuda":
        most = capacity.most_workers(ranks)
        auto = most if most is not None else rows or config.min_workers
        auto = min(auto, rows) if rows else auto
        resources = Resources(
            device="cuda",
            torch_device="cpu" if simulated else "cuda",
            min_workers=config.min_workers,
            max_workers=config.max_workers or max(auto, config.min_workers),
            ranks=ranks,
            render_num_gpus=1 - TEXT_ENCODER_GPU_SHARE,
            render_num_cpus=1,
            render_resources=config.render_resources,
            torch_threads=1 if simulated else 4,
            text_workers=config.text_workers,
            text_num_gpus=TEXT_ENCODER_GPU_SHARE,
            text_num_cpus=1,
        )
    else:
        cpus = max(1.0, sum(node.get("CPU", 0.0) for node in capacity.nodes) or os.cpu_count() or 1)
        max_workers = config.max_workers or config.min_workers
        # Leave a quarter of the CPUs to text encoders and MP4 writers; split the rest between render processes.
        processes = max_workers * ranks
        share = 0.75 * cpus / processes
        resources = Resources(
            device="cpu",
            torch_device="cpu",
            min_workers=min(config.min_workers, max_workers),
            max_workers=max_workers,
            ranks=ranks,
            render_num_gpus=0,
            # At most 3/4 of a CPU: a one-CPU node then holds a render actor and a text encoder beside it. CPU
            # counts here only place actors; torch_threads decides the cores torch uses.
            render_num_cpus=round(min(0.75, share), 2),
            render_resources=config.render_resources,
            torch_threads=max(1, int(cpus // processes)),
            text_workers=config.text_workers,
            text_num_gpus=0,
            # Idle once every text is encoded: a sliver of a CPU, so the render actors keep theirs.
            text_num_cpus=round(0.2 / config.text_workers, 2),
        )
    workers = f"render groups of {ranks} GPUs" if ranks > 1 and device == "cuda" else "render actors"
    if ranks > 1 and device == "cpu":
        workers = f"render groups of {ranks} processes"
    simulation = " (simulated GPUs: placed on Ray's GPUs, torch on the CPU)" if simulated and device == "cuda" else ""
    decision = f"{device}: {why}; {workers} {resources.min_workers}-{resources.max_workers}{simulation}"
    return resources.model_copy(update={"decision": decision})


def _device(config: JobConfig, capacity: Capacity) -> tuple[Literal["cuda", "cpu"], str]:
    """The device render actors run on, and why, in words."""
    gpus_now = f"{capacity.gpus} GPU{'s' if capacity.gpus != 1 else ''} now" if capacity.gpus else "no GPU now"
    addable = [
        f"{'any number of' if more is None else more} {node_type.name} node{'s' if more != 1 else ''} with "
        f"{node_type.gpus} GPU{'s' if node_type.gpus != 1 else ''} each"
        for node_type, more in capacity.addable()
        if node_type.gpus
    ]
    can_add = f"the autoscaler can add {' and '.join(addable)} ({capacity.source})" if addable else ""
    if config.device != "auto":
        return config.device, ", ".join(part for part in (f"--device {config.device}", gpus_now, can_add) if part)
    if capacity.gpus or addable:
        return "cuda", ", and ".join(part for part in (gpus_now if capacity.gpus else "", can_add) if part)
    if capacity.unreadable:
        return "cpu", f"no GPU now, and the autoscaler's node types are unknown ({capacity.unreadable}): " + (
            "--device cuda waits for GPU nodes"
        )
    if capacity.node_types:
        return "cpu", f"no GPU now, and the autoscaler's node types offer none ({capacity.source})"
    return "cpu", "no GPU now, and no autoscaler node types found"


def check_placeable(resources: Resources, capacity: Capacity) -> None:
    """Refuse a job whose render workers or text encoders no node can ever hold, now or once the autoscaler has
    added nodes: it would wait for them forever."""
    render = f"a render actor asks for {resources_text(resources.render_bundle)}"
    if resources.ranks > 1:
        render = (
            f"a render group (--gpus-per-video {resources.ranks}) asks for {resources.ranks} x "
            f"{resources_text(resources.render_bundle)} on one node"
        )
    for what, bundle, count in (
        (render, resources.render_bundle, resources.ranks),
        (f"a text encoder asks for {resources_text(resources.text_bundle)}", resources.text_bundle, 1),
    ):
        if not capacity.holds(bundle, count):
            raise JobRefused(
                f"the job cannot be placed on {resources.device}: {what}, which no node of this cluster holds, now or "
                f"once its autoscaler adds nodes ({capacity.describe()})"
            )


def check_ranks(card: ModelCard, ranks: int) -> None:
    """At the door: with --gpus-per-video N each rank attends with an equal share of the heads (SkyReels-V2 1.3B has
    12, 14B 40), so N must divide them."""
    heads = attention_heads(card) if ranks > 1 else None
    if heads is not None and heads % ranks:
        raise JobRefused(
            f"--gpus-per-video {ranks} does not divide {card.name}'s {heads} attention heads (each rank attends with "
            "an equal share of them)"
        )
