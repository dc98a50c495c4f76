"""The whole render job, top to bottom: read -> validate -> render -> write -> index."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import ray
from ray.data import ActorPoolStrategy, Dataset

from skyreels_batch import storage
from skyreels_batch.config import JobConfig, Resources, plan_resources
from skyreels_batch.manifest import Manifest, open_manifest
from skyreels_batch.models import ModelCard, card_for
from skyreels_batch.results import result_row, write_index
from skyreels_batch.stages.render import RenderVideos
from skyreels_batch.stages.validate import ValidateRows
from skyreels_batch.stages.write import WriteVideos

logger = logging.getLogger(__name__)

# Rows per block when reading: small blocks let the render pool spread rows over every actor.
ROWS_PER_READ_BLOCK = 1


@dataclass(frozen=True)
class JobSummary:
    total: int
    done: int
    failed: int
    index_uri: str
    errors: list[str]


def run_job(config: JobConfig, *, log: Callable[[str], None] = print) -> JobSummary:
    """Render every row of the manifest. Raises UnknownModelError / ManifestError before any Ray work when the
    invocation itself is unusable. Attaches to Ray if it is not initialised (inside a Ray job: the cluster)."""
    card = card_for(config.model)
    output = storage.normalize(config.output)
    manifest = open_manifest(config.manifest)
    if not ray.is_initialized():
        ray.init()
    resources = plan_resources(config, ray.cluster_resources())
    if manifest.unknown_columns:
        log(f"ignoring manifest columns the schema does not know: {', '.join(manifest.unknown_columns)}")
    log(
        f"rendering {manifest.num_rows} rows of {config.manifest} with {card.name} on {resources.device}, "
        f"{resources.min_workers}-{resources.max_workers} render actors -> {output}"
    )

    rows = read_manifest(manifest, resources)
    rows = rows.map_batches(
        ValidateRows(card, max_frames=config.max_frames, duplicate_ids=manifest.duplicate_ids),
        batch_format="pyarrow",
        num_cpus=resources.validate_num_cpus,
    )
    rows = render_videos(rows, card, output, resources)
    rows = rows.map_batches(
        WriteVideos(output=output, crf=config.crf, lossless=config.lossless),
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=resources.write_num_cpus,
    )
    return collect_results(rows, output, manifest.num_rows, log)


def read_manifest(manifest: Manifest, resources: Resources) -> Dataset:
    return ray.data.read_parquet(
        manifest.files,
        filesystem=storage.arrow_filesystem(manifest.fs),
        columns=manifest.columns,
        override_num_blocks=max(1, manifest.num_rows // ROWS_PER_READ_BLOCK),
        num_cpus=resources.read_num_cpus,
    )


def render_videos(rows: Dataset, card: ModelCard, output: str, resources: Resources) -> Dataset:
    return rows.map_batches(
        RenderVideos,
        fn_constructor_kwargs=dict(
            card=card, output=output, device=resources.device, torch_threads=resources.torch_threads
        ),
        batch_size=1,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=resources.min_workers, max_size=resources.max_workers),
        num_gpus=resources.render_num_gpus,
        num_cpus=resources.render_num_cpus,
    )


def collect_results(rows: Dataset, output: str, total: int, log: Callable[[str], None]) -> JobSummary:
    """Stream the (small) result rows to the driver, report progress, write the index."""
    results, counts = [], Counter()
    for batch in rows.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in batch.to_pylist():
            result = result_row(row)
            results.append(result)
            counts[result["status"]] += 1
            if result["error"]:
                log(f"failed: {result['error']}")
            log(f"videos {counts['done'] + counts['failed']}/{total} ({counts['failed']} failed)")
    index_uri = write_index(output, results)
    storage.remove_empty_dir(storage.join(output, "_segments"))
    log(f"results index: {index_uri}")
    return JobSummary(
        total=total,
        done=counts["done"],
        failed=counts["failed"],
        index_uri=index_uri,
        errors=[result["error"] for result in results if result["error"]],
    )
