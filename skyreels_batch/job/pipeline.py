"""The whole render job, top to bottom: the door -> plan -> render passes (validate and admit -> encode prompts ->
render -> write) -> what the run leaves (the index, the gallery, the dataset's metadata)."""

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

from skyreels_batch import storage
from skyreels_batch.config import JobConfig
from skyreels_batch.control import on_driver_node, start_job_control
from skyreels_batch.job import cluster
from skyreels_batch.job.cluster import Capacity, PlacementWatch, resources_text
from skyreels_batch.job.collect import Collector, Outcome, StopRequest
from skyreels_batch.job.door import Job, open_job
from skyreels_batch.job.lease import Lease
from skyreels_batch.job.progress import Progress
from skyreels_batch.job.resources import Resources
from skyreels_batch.job.work import WorkList, plan_work, validation
from skyreels_batch.output.dataset import write_dataset_metadata
from skyreels_batch.output.gallery import Gallery
from skyreels_batch.output.results import ResultsIndex, new_run_id, records_dir, results_dir
from skyreels_batch.render.embeddings import EmbeddingStore, embeddings_dir
from skyreels_batch.render.groups import PlacementSweeper, remove_placements
from skyreels_batch.render.segments import segments_dir
from skyreels_batch.stages.admit import AdmitRows
from skyreels_batch.stages.encode import EncodePrompts
from skyreels_batch.stages.render import RenderVideos
from skyreels_batch.stages.render_group import RenderGroup
from skyreels_batch.stages.validate import ValidateRows
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


def run_job(config: JobConfig, *, log: Callable[[str], None] = print, stop: StopRequest | None = None) -> JobSummary:
    """Render every row of the manifest. Raises UnknownModelError, ManifestError or JobRefused before any work when
    the invocation itself is unusable. Attaches to Ray if it is not initialised (inside a Ray job: the cluster)."""
    # 1. The door: the model, the manifest, and a cluster that can place the job, now or once it has grown.
    job = open_job(config, log)
    stop = stop or StopRequest()
    stop.listen()
    run = new_run_id()
    # 2. One run per output, taken before anything is written.
    with Lease(job.output, run, log=log, on_lost=stop.request):
        announce(job, log)
        # 3. The index, with what a killed run left folded in; the gallery follows it.
        index, gallery = ResultsIndex(job.output, run=run), Gallery(job.output)
        # 4. Every row validated and planned; what is done for the same request is skipped; failed rows indexed.
        work = plan_work(job, index.finished())
        record_plan(job, work, index, gallery, log)
        # 5. Render passes until every row is done or failed, or the job stops.
        outcome, loads = render_rows(job, work.rows, index, gallery, stop, log)
        # 6. What the run leaves: the index folded, the run's record, the dataset's metadata.
        committed_unseen = finish_run(job, index, gallery, outcome, loads, log)
    return summarize(job, work, outcome, committed_unseen)


def summarize(job: Job, work: WorkList, outcome: Outcome, committed_unseen: int) -> JobSummary:
    failed = outcome.failed + work.failed.num_rows
    done = outcome.done + committed_unseen + work.skipped
    left = job.manifest.num_rows - done - failed
    return JobSummary(
        total=job.manifest.num_rows,
        done=done,
        failed=failed,
        skipped=work.skipped,
        left=left,
        stopped=outcome.stopped and left > 0,  # a signal after the last row came back stops nothing
    )


def announce(job: Job, log: Callable[[str], None]) -> None:
    if job.manifest.unknown_columns:
        log(f"ignoring manifest columns the schema does not know: {', '.join(job.manifest.unknown_columns)}")
    log(f"rendering {job.manifest.num_rows:,} rows of {job.config.manifest} with {job.card.name} -> {job.output}")


def record_plan(job: Job, work: WorkList, index: ResultsIndex, gallery: Gallery, log: Callable[[str], None]) -> None:
    """The index as the plan has it: the rows this run writes taken out of it, the failed ones in; what earlier runs
    left that no row needs now removed."""
    index.retract(pa.concat_arrays([work.failed["id"].combine_chunks(), work.rows["id"].combine_chunks()]))
    index.add([{**row, "status": "failed"} for row in work.failed.to_pylist()])
    index.flush()
    gallery.follow(index)
    remove_finished_segments(job.output, work.finished)
    storage.remove_tree(embeddings_dir(job.output))  # a killed run's: no row is in flight now
    if work.skipped:
        log(f"skipping {work.skipped:,} rows already done in {job.output}")


def render_rows(
    job: Job, rows: pa.Table, index: ResultsIndex, gallery: Gallery, stop: StopRequest, log: Callable[[str], None]
) -> tuple[Outcome, list[dict]]:
    """Render passes over `rows` (collect.py) until each is done or failed, or the job stops; returns the outcome
    and the actors' model loads."""
    # Rows waiting for a render actor: enough that none idles, few enough that the pass holds no backlog.
    control = start_job_control(window=2 * job.resources.max_workers + 2)
    placements = f"render-{index.run}"  # render groups' placement groups (--gpus-per-video)
    try:
        progress = Progress(
            total_videos=rows.num_rows,
            total_segments=pc.sum(rows["num_segments"]).as_py() or 0,
            log=log,
            note=placement_watch(job.resources, job.capacity, placements).note,
        )
        collector = Collector(
            index=index,
            gallery=gallery,
            progress=progress,
            control=control,
            stop=stop,
            index_interval_s=job.config.index_interval_s,
            stop_grace_s=job.config.stop_grace_s,
            log=log,
        )

        def next_pass(pass_rows: pa.Table) -> Dataset:
            remove_placements(placements)  # the last pass's: its workers are gone
            ray.get(control.pass_started.remote())
            return render_pass(pass_rows, job, control, placements)

        with PlacementSweeper(placements):
            outcome = collector.run(rows, next_pass, job.config.max_retries)
        return outcome, ray.get(control.model_loads.remote())
    finally:
        ray.kill(control)


def render_pass(rows: pa.Table, job: Job, control: ActorHandle, placements: str) -> Dataset:
    """One pass of the pipeline over `rows`: validate and admit -> encode prompts -> render -> write."""
    admitted = admit_rows(rows, job, control)
    encoded = encode_prompts(admitted, job, control)
    rendered = render_videos(encoded, job, control, placements)
    return write_videos(rendered, job)


def finish_run(
    job: Job, index: ResultsIndex, gallery: Gallery, outcome: Outcome, loads: list[dict], log: Callable[[str], None]
) -> int:
    """Fold the run into the index and leave the output tidy; returns how many videos were committed whose rows
    never came back (a stopped run's last ones)."""
    committed_unseen = index.close()
    gallery.follow(index, running=False)
    resources = job.resources.model_dump()
    index.record_run({"run": index.run, "model": job.card.name, "resources": resources, "model_loads": loads})
    if loads:
        log(f"model loads: {describe_loads(loads)}")
    storage.remove_empty_dir(records_dir(job.output))
    if not outcome.stopped:
        storage.remove_empty_dir(segments_dir(job.output))
    storage.remove_tree(embeddings_dir(job.output))  # what rows left in flight needed: cheap to make again
    write_dataset_metadata(job.output, index.files(), keep_flagged=job.config.keep_flagged)
    log(f"results index: {results_dir(job.output)}; gallery: {storage.join(job.output, 'index.html')}")
    return committed_unseen


def admit_rows(rows: pa.Table, job: Job, control: ActorHandle) -> Dataset:
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
        num_cpus=job.resources.read_num_cpus,
        label_selector=on_driver_node(),
    )
    validator = ValidateRows(job.card, **validation(job.config))
    validated = source.map_batches(validator, **one_at_a_time)
    admitter = AdmitRows(control, EmbeddingStore(job.output, job.card.name))
    return validated.map_batches(admitter, **one_at_a_time)


def encode_prompts(rows: Dataset, job: Job, control: ActorHandle) -> Dataset:
    resources = job.resources
    return on_actor_pool(
        rows,
        EncodePrompts,
        # One torch thread: on CPU the encoder works beside the render actors, on their cores.
        dict(
            card=job.card,
            output=job.output,
            device=resources.torch_device,
            options=job.config.pipeline,
            torch_threads=1,
            control=control,
        ),
        # One row at a time per encoder: two encoder tasks that finish within one round of Ray Data's scheduler may
        # leave in either order (seen: manifest order broken once in a few runs), which would undo the work list's.
        pool=ActorPoolStrategy(min_size=1, max_size=resources.text_workers, max_tasks_in_flight_per_actor=1),
        num_gpus=resources.text_num_gpus,
        num_cpus=resources.text_num_cpus,
    )


def render_videos(rows: Dataset, job: Job, control: ActorHandle, placements: str) -> Dataset:
    """With --gpus-per-video N > 1 each actor of the pool holds a render group of N ranks (RenderGroup) in a
    placement group named `placements-<actor>`; the actor itself only hands rows to the group's rank 0."""
    resources = job.resources
    render_args = dict(
        card=job.card,
        output=job.output,
        device=resources.torch_device,
        options=job.config.pipeline,
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


def write_videos(rows: Dataset, job: Job) -> Dataset:
    config, resources = job.config, job.resources
    writer = WriteVideos(
        output=job.output,
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


def placement_watch(resources: Resources, capacity: Capacity, placements: str) -> PlacementWatch:
    """Watches the render pass's actors (render groups: their placement groups) until they are placed."""
    render = {"render groups": f"{resources.ranks} x {resources_text(resources.render_bundle)} on one node"}
    if resources.ranks == 1:
        render = {"RenderVideos": resources_text(resources.render_bundle)}
    asks = {**render, "EncodePrompts": resources_text(resources.text_bundle)}
    return PlacementWatch(capacity, asks, placements=placements, notice_after_s=cluster.NOTICE_AFTER_S)


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
