"""The whole render job, top to bottom: read -> validate and plan -> encode prompts -> render -> write -> index."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.actor import ActorHandle
from ray.data import ActorPoolStrategy, DataContext, Dataset, TaskPoolStrategy
from ray.util.annotations import RayDeprecationWarning

from skyreels_batch import cluster, storage
from skyreels_batch.cluster import Capacity, PlacementWatch, read_capacity, resources_text
from skyreels_batch.collect import Collector, StopRequest
from skyreels_batch.config import (
    JobConfig,
    PipelineOptions,
    Resources,
    check_placeable,
    plan_resources,
    simulated_gpus,
)
from skyreels_batch.control import on_driver_node, start_job_control
from skyreels_batch.dataset import write_dataset_metadata
from skyreels_batch.diffusion_forcing import takes_attention_mask
from skyreels_batch.embeddings import EmbeddingStore, embeddings_dir
from skyreels_batch.gallery import Gallery
from skyreels_batch.groups import PlacementSweeper, remove_placements
from skyreels_batch.lease import Lease
from skyreels_batch.manifest import Manifest, open_manifest, read_batches
from skyreels_batch.models import ModelCard, card_for, check_ranks
from skyreels_batch.progress import Progress
from skyreels_batch.results import ResultsIndex, new_run_id, records_dir, results_dir
from skyreels_batch.segments import segments_dir
from skyreels_batch.stages.admit import AdmitRows
from skyreels_batch.stages.encode import EncodePrompts
from skyreels_batch.stages.render import RenderVideos
from skyreels_batch.stages.render_group import RenderGroup
from skyreels_batch.stages.validate import PLANNED, PlanRows, ValidateRows
from skyreels_batch.stages.write import WriteVideos

# Rows per block of a render pass's source: the object store holds a thousand blocks for a million rows, not a
# million, and each is cut into one-row blocks only as the render pool takes them (AdmitRows).
SOURCE_BLOCK_ROWS = 1024
# A render group's Ray Data actor only hands rows to its rank 0: a sliver of a CPU, anywhere.
GROUP_NUM_CPUS = 0.05


@dataclass(frozen=True)
class JobSummary:
    total: int
    done: int
    failed: int
    skipped: int = 0  # done by an earlier run; counted in `done`
    left: int = 0  # neither done nor failed: what a stopped job leaves to the next run
    stopped: bool = False


@dataclass(frozen=True)
class WorkList:
    """The job's plan, held by the driver: compact (no resolved parameters), one table for a million rows."""

    rows: pa.Table  # the rows to render, in render order: their manifest columns and PLANNED's
    failed: pa.Table  # `id`, `error` (and `prompt`, where it is text) of the rows that failed validation
    skipped: int  # rows an earlier run finished for the same request


def run_job(config: JobConfig, *, log: Callable[[str], None] = print, stop: StopRequest | None = None) -> JobSummary:
    """Render every row of the manifest. Raises UnknownModelError / ManifestError before any Ray work when the
    invocation itself is unusable. Attaches to Ray if it is not initialised (inside a Ray job: the cluster)."""
    card = card_for(config.model)
    check_ranks(card, config.gpus_per_video)
    output = storage.normalize(config.output)
    manifest = open_manifest(config.manifest)
    if not ray.is_initialized():
        ray.init()
    capacity = read_capacity()
    resources = plan_resources(config, capacity, rows=manifest.num_rows, simulated=simulated_gpus())
    check_placeable(resources, capacity)
    log(resources.decision)
    stop = stop or StopRequest()
    stop.listen()
    run = new_run_id()
    with Lease(output, run, log=log, on_lost=stop.request):  # one run per output: taken before anything is written
        # Ray Data's progress bars redraw a line in place, which the job's own progress lines would cut into.
        DataContext.get_current().enable_progress_bars = False
        if manifest.unknown_columns:
            log(f"ignoring manifest columns the schema does not know: {', '.join(manifest.unknown_columns)}")
        log(f"rendering {manifest.num_rows:,} rows of {config.manifest} with {card.name} -> {output}")

        # Folds in what a killed run left (its parts, the records of its last videos); keeps the gallery in step.
        index = ResultsIndex(output, gallery=Gallery(output), run=run)
        finished = index.finished()
        work = plan_work(read_manifest(manifest, resources), card, config, manifest, finished, resources)
        index.retract(pa.concat_arrays([work.failed["id"].combine_chunks(), work.rows["id"].combine_chunks()]))
        index.add(_failed_rows(work.failed))
        index.flush()
        remove_finished_segments(output, finished)
        storage.remove_tree(embeddings_dir(output))  # a killed run's: no row is in flight now
        if work.skipped:
            log(f"skipping {work.skipped:,} rows already done in {output}")

        # Rows waiting for a render actor: enough that none idles, few enough that the pass holds no backlog.
        control = start_job_control(window=2 * resources.max_workers + 2)
        placements = f"render-{index.run}"  # render groups' placement groups (--gpus-per-video)
        try:
            progress = Progress(
                total_videos=work.rows.num_rows,
                total_segments=pc.sum(work.rows["num_segments"]).as_py() or 0,
                log=log,
                note=placement_watch(resources, capacity, placements).note,
            )
            collector = Collector(
                index=index,
                progress=progress,
                control=control,
                stop=stop,
                index_interval_s=config.index_interval_s,
                stop_grace_s=config.stop_grace_s,
                log=log,
            )

            def render_pass(rows: pa.Table) -> Dataset:
                remove_placements(placements)  # the last pass's: its workers are gone
                ray.get(control.pass_started.remote())
                admitted = admit_rows(rows, card, config, output, resources, control)
                encoded = encode_prompts(admitted, card, output, resources, config.pipeline, control)
                rendered = render_videos(encoded, card, output, resources, config.pipeline, control, placements)
                return write_videos(rendered, output, config, resources)

            with PlacementSweeper(placements):
                outcome = collector.run(work.rows, render_pass, config.max_retries)
            loads = ray.get(control.model_loads.remote())
        finally:
            ray.kill(control)
        committed_unseen = index.close()  # a stopped run's last videos: committed, their rows not yet back
        index.record_run(
            {"run": index.run, "model": card.name, "resources": resources.model_dump(), "model_loads": loads}
        )
        if loads:
            log(f"model loads: {describe_loads(loads)}")
        storage.remove_empty_dir(records_dir(output))
        if not outcome.stopped:
            storage.remove_empty_dir(segments_dir(output))
        storage.remove_tree(embeddings_dir(output))  # what rows left in flight needed: cheap to make again
        write_dataset_metadata(output, index.files(), keep_flagged=config.keep_flagged)
        log(f"results index: {results_dir(output)}; gallery: {storage.join(output, 'index.html')}")
        failed = outcome.failed + work.failed.num_rows
        done = outcome.done + committed_unseen + work.skipped
        left = manifest.num_rows - done - failed
        return JobSummary(
            total=manifest.num_rows,
            done=done,
            failed=failed,
            skipped=work.skipped,
            left=left,
            stopped=outcome.stopped and left > 0,  # a signal after the last row came back stops nothing
        )


def read_manifest(manifest: Manifest, resources: Resources) -> Dataset:
    return ray.data.read_parquet(
        manifest.files,
        filesystem=storage.arrow_filesystem(manifest.fs),
        schema=manifest.schema,
        num_cpus=resources.read_num_cpus,
    ).select_columns(manifest.columns)


def plan_work(
    rows: Dataset, card: ModelCard, config: JobConfig, manifest: Manifest, finished: pa.Table, resources: Resources
) -> WorkList:
    """Validate and plan every row (fused into the read tasks), then decide on the driver what to render and in
    which order: rows that failed go to the index, rows an earlier run finished for the same request are skipped,
    the rest are ordered by work, the longest first (`--manifest-order` keeps the manifest's order)."""
    planner = PlanRows(card, **_validation(config), duplicate_ids=manifest.duplicate_ids)
    planned = rows.map_batches(planner, batch_size=None, batch_format="pyarrow", num_cpus=resources.read_num_cpus)
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
    return WorkList(rows=rows, failed=failed, skipped=pc.sum(done).as_py() or 0)


def admit_rows(
    rows: pa.Table, card: ModelCard, config: JobConfig, output: str, resources: Resources, control: ActorHandle
) -> Dataset:
    """The render pass's source: the rows to render in blocks of SOURCE_BLOCK_ROWS, resolved again, then handed out
    one row per block as the render pool takes them. One task at a time, on the driver's node: rows leave in the
    work list's order, and the task lives as long as the pass, so a preemptible node must not hold it."""
    blocks = [rows.slice(start, SOURCE_BLOCK_ROWS) for start in range(0, rows.num_rows, SOURCE_BLOCK_ROWS)]
    with render_pass_context():  # only here: a failed read or validation must fail the job, not drop rows
        source = ray.data.from_arrow([block.drop_columns(["num_segments"]) for block in blocks])
    one_at_a_time = dict(
        batch_size=None,
        batch_format="pyarrow",
        compute=TaskPoolStrategy(size=1),
        num_cpus=resources.read_num_cpus,
        label_selector=on_driver_node(),
    )
    validator = ValidateRows(card, **_validation(config))
    validated = source.map_batches(validator, **one_at_a_time)
    admitter = AdmitRows(control, EmbeddingStore(output, card.name))
    return validated.map_batches(admitter, **one_at_a_time)


def encode_prompts(
    rows: Dataset,
    card: ModelCard,
    output: str,
    resources: Resources,
    options: PipelineOptions,
    control: ActorHandle,
) -> Dataset:
    return on_actor_pool(
        rows,
        EncodePrompts,
        # One torch thread: on CPU the encoder works beside the render actors, on their cores.
        dict(
            card=card, output=output, device=resources.torch_device, options=options, torch_threads=1, control=control
        ),
        # One row at a time per encoder: two encoder tasks that finish within one round of Ray Data's scheduler may
        # leave in either order (seen: manifest order broken once in a few runs), which would undo the work list's.
        pool=ActorPoolStrategy(min_size=1, max_size=resources.text_workers, max_tasks_in_flight_per_actor=1),
        num_gpus=resources.text_num_gpus,
        num_cpus=resources.text_num_cpus,
    )


def render_videos(
    rows: Dataset,
    card: ModelCard,
    output: str,
    resources: Resources,
    options: PipelineOptions,
    control: ActorHandle,
    placements: str,
) -> Dataset:
    """With --gpus-per-video N > 1 each actor of the pool holds a render group of N ranks (RenderGroup) in a
    placement group named `placements-<actor>`; the actor itself only hands rows to the group's rank 0."""
    render_args = dict(
        card=card,
        output=output,
        device=resources.torch_device,
        options=options,
        torch_threads=resources.torch_threads,
        control=control,
    )
    if resources.ranks > 1:
        group_args = dict(placements=placements, bundle=resources.render_bundle, ranks=resources.ranks)
        return on_actor_pool(
            rows,
            RenderGroup,
            {**render_args, **group_args},
            pool=render_pool(resources),
            num_gpus=0,
            num_cpus=GROUP_NUM_CPUS,
        )
    return on_actor_pool(
        rows,
        RenderVideos,
        render_args,
        pool=render_pool(resources),
        num_gpus=resources.render_num_gpus,
        num_cpus=resources.render_num_cpus,
        resources=resources.render_resources or None,
    )


def render_pool(resources: Resources) -> ActorPoolStrategy:
    # One video at a time per actor: a free actor always takes the next waiting video instead of it queueing behind
    # a busy actor's long one.
    return ActorPoolStrategy(
        min_size=resources.min_workers, max_size=resources.max_workers, max_tasks_in_flight_per_actor=1
    )


def write_videos(rows: Dataset, output: str, config: JobConfig, resources: Resources) -> Dataset:
    writer = WriteVideos(
        output=output,
        crf=config.crf,
        lossless=config.lossless,
        save_latents=config.save_latents,
        quality_gate=config.gate(),
    )
    return rows.map_batches(writer, batch_size=1, batch_format="pyarrow", num_cpus=resources.write_num_cpus)


def on_actor_pool(
    rows: Dataset,
    stage: type,
    constructor_kwargs: dict,
    *,
    pool: ActorPoolStrategy,
    num_gpus: float,
    num_cpus: float,
    resources: dict[str, float] | None = None,
) -> Dataset:
    """A stage class on an actor pool, one row per call. A dead actor (preempted node, OOM kill) is replaced; its
    row comes back in the next pass (collect.py). Not retried here: Ray retries against a lost node before it is
    declared dead, which spends every retry in a second.

    Ray 2.60 deprecates the extra keyword arguments (`ray_remote_args`, gone in 2.64) and names no replacement for
    `max_restarts`/`max_task_retries`; its own actor pool documents them as the way to set actor retries, and its
    default, `max_task_retries=-1`, would retry a row forever on a node that is going. So the one warning for these
    two is silenced here, and only here: any other RayDeprecationWarning fails the tests (pyproject.toml), and a
    test fails once map_batches names them, to move to the named parameters then."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=RayDeprecationWarning)
        return rows.map_batches(
            stage,
            fn_constructor_kwargs=constructor_kwargs,
            batch_size=1,
            batch_format="pyarrow",
            compute=pool,
            num_gpus=num_gpus,
            num_cpus=num_cpus,
            resources=resources,
            max_restarts=-1,
            max_task_retries=0,
        )


@contextlib.contextmanager
def render_pass_context() -> Iterator[None]:
    """The Ray Data settings of a render pass. A dataset keeps the context it was created under, and datasets
    derived from it share it, so this wraps the creation of the render pass's own source dataset.

    - A row whose render task gave up loses its block instead of failing the job: the collector retries the
      row, then reports it as failed.
    - Every block a stage outputs holds one row (a block's byte target of 1): AdmitRows yields one row at a time,
      and an actor takes a whole block.
    - The pool grows once every actor is busy. Ray Data's default threshold (175% of one task per actor) is never
      reached with one video per actor, and a `--workers 1:8` pool would stay at one actor.
    - Pools are sized by --workers, not by per-operator resource budgets. Ray Data's budgets split the resources
      the cluster has now between the pass's operators, so a pool never asks for an actor the cluster cannot
      already place, and the cluster autoscaler, which adds nodes for pending actors, never sees a reason to
      grow (seen with the text-encoding pool as a third operator: `--workers 1:2` stayed at one actor).
    """
    context = DataContext.get_current()
    names = ("max_errored_blocks", "autoscaling_config", "op_resource_reservation_enabled", "target_max_block_size")
    saved = {name: getattr(context, name) for name in names}
    context.max_errored_blocks = -1
    context.autoscaling_config = dataclasses.replace(
        saved["autoscaling_config"], actor_pool_util_upscaling_threshold=1.0
    )
    context.op_resource_reservation_enabled = False
    context.target_max_block_size = 1
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(context, name, value)


def remove_finished_segments(output: str, finished: pa.Table) -> None:
    """Segments of videos an earlier run committed but was killed before it removed them."""
    leftovers = pa.array(storage.list_names(segments_dir(output)), pa.string())
    for video_id in leftovers.filter(pc.is_in(leftovers, finished["id"])).to_pylist():
        storage.remove_tree(storage.join(segments_dir(output), video_id))


def plan_job(config: JobConfig) -> Iterator[dict]:
    """--dry-run: each row's segment plan (or its error) and then the totals, without Ray or a GPU."""
    card = card_for(config.model)
    check_ranks(card, config.gpus_per_video)
    manifest = open_manifest(config.manifest)
    planner = PlanRows(card, **_validation(config), duplicate_ids=manifest.duplicate_ids)
    videos = segments = cost = failed = 0
    for batch in read_batches(manifest):
        for raw in batch.to_pylist():
            row = planner.validate(raw)
            if row.get("error"):
                failed += 1
                yield {"id": row["id"], "error": row["error"]}
                continue
            plan = row["plan"]
            videos, segments, cost = videos + 1, segments + len(plan.segments), cost + plan.cost
            yield {**plan.as_json(row["id"]), **_wall_cost(plan.cost, config.gpus_per_video)}
    total = {"videos": videos, "segments": segments, "cost": cost, "failed": failed}
    yield {"total": {**total, **_wall_cost(cost, config.gpus_per_video)}}


def _validation(config: JobConfig) -> dict:
    """What row validation needs of the job config, beside the model card."""
    backend = config.pipeline.attention_backend
    maskless = backend if backend is not None and not takes_attention_mask(backend) else None
    ranks, compiled = config.gpus_per_video, config.pipeline.compile
    return dict(max_frames=config.max_frames, ranks=ranks, maskless_backend=maskless, compiled=compiled)


def placement_watch(resources: Resources, capacity: Capacity, placements: str) -> PlacementWatch:
    """Watches the render pass's actors (render groups: their placement groups) until they are placed."""
    render = {"render groups": f"{resources.ranks} x {resources_text(resources.render_bundle)} on one node"}
    if resources.ranks == 1:
        render = {"RenderVideos": resources_text(resources.render_bundle)}
    asks = {**render, "EncodePrompts": resources_text(resources.text_bundle)}
    return PlacementWatch(capacity, asks, placements=placements, notice_after_s=cluster.NOTICE_AFTER_S)


def _wall_cost(cost: int, ranks: int) -> dict:
    """With --gpus-per-video N, a video's passes split N ways: its wall time in passes, at best (all-to-all aside).
    GPU time, `cost`, stays the same."""
    return {"gpus_per_video": ranks, "wall_cost": round(cost / ranks, 1)} if ranks > 1 else {}


def describe_loads(loads: list[dict]) -> str:
    """`render x2: fetch 3.1 s, read 40.2 s, to device 6.0 s (mean); text x1: ...`"""
    parts = []
    for stage in sorted({load["stage"] for load in loads}, reverse=True):
        mine = [load for load in loads if load["stage"] == stage]
        means = {key: sum(load[key] for load in mine) / len(mine) for key in ("fetch_s", "read_s", "to_device_s")}
        parts.append(
            f"{stage} x{len(mine)}: fetch {means['fetch_s']:.1f} s, read {means['read_s']:.1f} s, "
            f"to device {means['to_device_s']:.1f} s (mean)"
        )
    return "; ".join(parts)


def _request_keys(table: pa.Table) -> pa.Array:
    """`id` and `request_hash` as one key: a row is done only for the request it was made for."""
    return pc.binary_join_element_wise(table["id"], table["request_hash"], "\0")


def _failed_rows(failed: pa.Table) -> list[dict]:
    return [{**row, "status": "failed"} for row in failed.to_pylist()]


def _empty_plan(manifest: Manifest) -> pa.Table:
    manifest_fields = [field for field in manifest.schema if field.name in manifest.columns and field.name != "id"]
    return pa.schema([*PLANNED, *manifest_fields]).empty_table()
