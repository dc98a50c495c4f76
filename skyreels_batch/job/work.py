"""What a job will render, decided on the driver before the first pass: every row validated and planned (fused into
the manifest's read tasks), rows an earlier run finished skipped, the rest in render order; and `--dry-run`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import Dataset

from skyreels_batch import storage
from skyreels_batch.config import JobConfig
from skyreels_batch.job.door import Job
from skyreels_batch.job.manifest import Manifest, open_manifest, read_batches
from skyreels_batch.job.resources import check_ranks
from skyreels_batch.models import card_for
from skyreels_batch.render.diffusion_forcing import takes_attention_mask
from skyreels_batch.schema import RenderParams, plan_for
from skyreels_batch.stages.validate import PLANNED, PlanRows


@dataclass(frozen=True)
class WorkList:
    """The job's plan, held by the driver: compact (no resolved parameters), one table for a million rows."""

    rows: pa.Table  # the rows to render, in render order: their manifest columns and PLANNED's
    failed: pa.Table  # `id`, `error` (and `prompt`, where it is text) of the rows that failed validation
    skipped: int  # rows an earlier run finished for the same request
    finished: pa.Table  # `id`, `request_hash` of every video done and committed before this run


def read_manifest(manifest: Manifest, num_cpus: float) -> Dataset:
    return ray.data.read_parquet(
        manifest.files,
        filesystem=storage.arrow_filesystem(manifest.fs),
        schema=manifest.schema,
        num_cpus=num_cpus,
    ).select_columns(manifest.columns)


def plan_work(job: Job, finished: pa.Table) -> WorkList:
    """Validate and plan every row (fused into the manifest's read tasks), then decide on the driver what to render
    and in which order: rows that failed go to the index, rows an earlier run finished for the same request (in
    `finished`) are skipped, the rest are ordered by work, the longest first (`--manifest-order` keeps the
    manifest's order)."""
    config, manifest, read_num_cpus = job.config, job.manifest, job.resources.read_num_cpus
    planner = PlanRows(job.card, **validation(config), duplicate_ids=manifest.duplicate_ids)
    planned = read_manifest(manifest, read_num_cpus).map_batches(
        planner, batch_size=None, batch_format="pyarrow", num_cpus=read_num_cpus
    )
    batches = list(planned.iter_batches(batch_size=None, batch_format="pyarrow"))
    table = pa.concat_tables(batches) if batches else _empty_plan(manifest)
    del batches
    # A failed row keeps its prompt where it has one, so the gallery and the index can still say what it was.
    prompt_type = table.schema.field("prompt").type if "prompt" in table.column_names else None
    has_prompt = prompt_type is not None and (pa.types.is_string(prompt_type) or pa.types.is_large_string(prompt_type))
    failed = table.filter(pc.is_valid(table["error"])).select(["id", "error", *(["prompt"] if has_prompt else [])])
    done = pc.is_in(_request_keys(table), _request_keys(finished))
    todo = table.filter(pc.and_(pc.is_null(table["error"]), pc.invert(pc.fill_null(done, False))))
    # Only what the passes need from here on (`id` is PLANNED's: a string whatever the manifest's type).
    rows, work = todo.select(["num_segments", *manifest.columns]), todo["work"]
    del table, todo
    if config.longest_first:  # Arrow's sort is stable: ties keep the manifest's order
        rows = rows.take(pc.sort_indices(pa.table({"work": work}), sort_keys=[("work", "descending")]))
    return WorkList(rows=rows, failed=failed, skipped=pc.sum(done).as_py() or 0, finished=finished)


def plan_job(config: JobConfig) -> Iterator[dict]:
    """--dry-run: each row's segment plan (or its error) and then the totals, without Ray or a GPU."""
    card = card_for(config.model)
    check_ranks(card, config.gpus_per_video)
    manifest = open_manifest(config.manifest)
    planner = PlanRows(card, **validation(config), duplicate_ids=manifest.duplicate_ids)
    videos = segments = cost = failed = 0
    for batch in read_batches(manifest):
        for raw in batch.to_pylist():
            row = planner.validate(raw)
            if row.get("error"):
                failed += 1
                yield {"id": row["id"], "error": row["error"]}
                continue
            plan = plan_for(RenderParams.model_validate_json(row["params"]))
            videos, segments, cost = videos + 1, segments + len(plan.segments), cost + plan.cost
            yield {**plan.as_json(row["id"]), **_wall_cost(plan.cost, config.gpus_per_video)}
    total = {"videos": videos, "segments": segments, "cost": cost, "failed": failed}
    yield {"total": {**total, **_wall_cost(cost, config.gpus_per_video)}}


def validation(config: JobConfig) -> dict:
    """What row validation needs of the job config, beside the model card."""
    backend = config.pipeline.attention_backend
    maskless = backend if backend is not None and not takes_attention_mask(backend) else None
    ranks, compiled = config.gpus_per_video, config.pipeline.compile
    return dict(max_frames=config.max_frames, ranks=ranks, maskless_backend=maskless, compiled=compiled)


def _wall_cost(cost: int, ranks: int) -> dict:
    """With --gpus-per-video N, a video's passes split N ways: its wall time in passes, at best (all-to-all aside).
    GPU time, `cost`, stays the same."""
    return {"gpus_per_video": ranks, "wall_cost": round(cost / ranks, 1)} if ranks > 1 else {}


def _request_keys(table: pa.Table) -> pa.Array:
    """`id` and `request_hash` as one key: a row is done only for the request it was made for."""
    return pc.binary_join_element_wise(table["id"], table["request_hash"], "\0")


def _empty_plan(manifest: Manifest) -> pa.Table:
    manifest_fields = [field for field in manifest.schema if field.name in manifest.columns and field.name != "id"]
    return pa.schema([*PLANNED, *manifest_fields]).empty_table()
