"""The job's door: what it checks before any work, and refuses with one line (exit 2) when the invocation can never
run: the model, the manifest, and a cluster that can place the job now or once its autoscaler has grown it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import ray
from ray.data import DataContext

from skyreels_batch import storage
from skyreels_batch.config import JobConfig
from skyreels_batch.job.cluster import Capacity, read_capacity
from skyreels_batch.job.manifest import Manifest, open_manifest
from skyreels_batch.job.resources import Resources, check_placeable, check_ranks, plan_resources, simulated_gpus
from skyreels_batch.models import ModelCard, card_for


@dataclass(frozen=True)
class Job:
    """What the door established: the model, the manifest, where the output goes, and the resources decided for
    this cluster."""

    config: JobConfig
    card: ModelCard
    manifest: Manifest
    output: str
    capacity: Capacity
    resources: Resources


def open_job(config: JobConfig, log: Callable[[str], None]) -> Job:
    """Check the job and decide its resources (the job's first line says what, and why). Attaches to Ray if it is
    not initialised (inside a Ray job: the cluster)."""
    card = card_for(config.model)
    check_ranks(card, config.gpus_per_video)
    output = storage.normalize(config.output)
    manifest = open_manifest(config.manifest)
    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING)  # Ray's INFO lines stay in its session's logs
    quiet_ray_data()
    capacity = read_capacity()
    resources = plan_resources(config, capacity, rows=manifest.num_rows, simulated=simulated_gpus())
    check_placeable(resources, capacity)
    log(resources.decision)
    return Job(config, card, manifest, output, capacity, resources)


class _ProgressBarsOff(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Progress bars disabled")


_PROGRESS_BARS_OFF = _ProgressBarsOff()


def quiet_ray_data() -> None:
    """The job prints its own progress lines; Ray Data's INFO lines go to its log file (`ray-data.log` in the Ray
    session's logs), not to the console.

    Ray Data's progress bars redraw a line in place, which the job's lines would cut into, so they are off; Ray Data
    then warns once that they are off, as the job asked, and that one warning is filtered from the console too."""
    DataContext.get_current().enable_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(max(handler.level, logging.WARNING))
            if _PROGRESS_BARS_OFF not in handler.filters:
                handler.addFilter(_PROGRESS_BARS_OFF)
