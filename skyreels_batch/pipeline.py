"""The whole render job, top to bottom: read -> validate -> encode prompts -> render -> write -> index."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import ray
from ray import ObjectRef
from ray.actor import ActorHandle
from ray.data import ActorPoolStrategy, DataContext, Dataset

from skyreels_batch import storage
from skyreels_batch.config import JobConfig, PipelineOptions, Resources, plan_resources
from skyreels_batch.embeddings import embeddings_dir
from skyreels_batch.manifest import Manifest, open_manifest, read_rows
from skyreels_batch.models import ModelCard, card_for
from skyreels_batch.progress import start_segment_counter
from skyreels_batch.results import finished_requests, result_row, write_index
from skyreels_batch.schema import RenderParams, plan_for
from skyreels_batch.stages.encode import EncodePrompts
from skyreels_batch.stages.render import RenderVideos
from skyreels_batch.stages.validate import ValidateRows
from skyreels_batch.stages.write import WriteVideos

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 15.0

Video = tuple[dict, ObjectRef]  # a validated row and its one-row block in the object store


@dataclass(frozen=True)
class JobSummary:
    total: int
    done: int
    failed: int
    index_uri: str
    errors: list[str]
    skipped: int = 0


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

    return _run(config, card, output, manifest, resources, log)


@contextlib.contextmanager
def render_pass_context() -> Iterator[None]:
    """The Ray Data settings of a render pass. A dataset keeps the context it was created under, and datasets
    derived from it share it, so this wraps the creation of the render pass's own source dataset.

    - A row whose render task gave up loses its block instead of failing the job: collect_results retries the
      row, then reports it as failed.
    - The pool grows once every actor is busy. Ray Data's default threshold (175% of one task per actor) is never
      reached with one video per actor, and a `--workers 1:8` pool would stay at one actor.
    - Pools are sized by --workers, not by per-operator resource budgets. Ray Data's budgets split the resources
      the cluster has now between the pass's operators, so a pool never asks for an actor the cluster cannot
      already place, and the cluster autoscaler, which adds nodes for pending actors, never sees a reason to
      grow (seen with the text-encoding pool as a third operator: `--workers 1:2` stayed at one actor).
    """
    context = DataContext.get_current()
    saved = context.max_errored_blocks, context.autoscaling_config, context.op_resource_reservation_enabled
    context.max_errored_blocks = -1
    context.autoscaling_config = dataclasses.replace(saved[1], actor_pool_util_upscaling_threshold=1.0)
    context.op_resource_reservation_enabled = False
    try:
        yield
    finally:
        context.max_errored_blocks, context.autoscaling_config, context.op_resource_reservation_enabled = saved


def _run(
    config: JobConfig,
    card: ModelCard,
    output: str,
    manifest: Manifest,
    resources: Resources,
    log: Callable[[str], None],
) -> JobSummary:
    done = finished_requests(output)
    rows = read_manifest(manifest, resources).map_batches(
        ValidateRows(card, max_frames=config.max_frames, duplicate_ids=manifest.duplicate_ids, done=done),
        batch_format="pyarrow",
        num_cpus=resources.read_num_cpus,  # the read's: Ray Data fuses reading and validating into one task
    )
    videos = rows_on_driver(rows)  # rows an earlier run finished keep their index rows and are not rendered again
    skipped = manifest.num_rows - len(videos)
    if skipped:
        log(f"skipping {skipped} rows already done in {output}")
    segments = sum(row["num_segments"] or 0 for row, _ in videos)
    progress = Progress(total_videos=len(videos), total_segments=segments, log=log)
    writer = WriteVideos(output=output, crf=config.crf, lossless=config.lossless, save_latents=config.save_latents)

    def render_and_write(pending: list[Video]) -> Dataset:
        blocks = [block for _, block in schedule(pending, longest_first=config.longest_first)]
        with render_pass_context():  # only here: a failed read or validation must fail the job, not drop rows
            source = ray.data.from_arrow_refs(blocks)
        encoded = encode_prompts(source, card, output, resources, config.pipeline)
        rendered = render_videos(encoded, card, output, resources, config.pipeline, progress.counter)
        return rendered.map_batches(writer, batch_size=1, batch_format="pyarrow", num_cpus=resources.write_num_cpus)

    summary = collect_results(videos, render_and_write, output, progress, log, config.max_retries)
    return dataclasses.replace(summary, total=manifest.num_rows, done=summary.done + skipped, skipped=skipped)


def rows_on_driver(rows: Dataset) -> list[Video]:
    """Each validated row still to render, with a one-row block of its own in the object store. The rows are small
    (id, parameters, plan), so the driver keeps them: scheduling, progress totals and retries then need no further
    Ray Data passes over them. One row per block: a block is one actor task, so this is what spreads videos over
    the pool (and confines a task that gives up to its own row)."""
    videos = []
    for table in rows.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in table.to_pylist():
            if not row["skipped"]:
                # A table of its own, not a slice: a slice serializes its parent's whole buffers (10 MB a row for a
                # 10k-row block).
                videos.append((row, ray.put(pa.Table.from_pylist([row], schema=table.schema))))
    return videos


def schedule(videos: list[Video], *, longest_first: bool) -> list[Video]:
    """The order videos reach the render pool in. Longest first: the most work (transformer passes from the plan
    times pixels per frame) starts first, so a long video does not start last and run alone while the other
    actors idle. Failed rows cost nothing and go last; ties keep the order the rows were read in."""
    if not longest_first:
        return videos
    return sorted(videos, key=lambda video: -render_work(video[0]))


def render_work(row: dict) -> int:
    if row["error"]:
        return 0
    params = json.loads(row["params"])
    return row["cost"] * params["height"] * params["width"]


def plan_job(config: JobConfig) -> Iterator[dict]:
    """--dry-run: each row's segment plan (or its error) and then the totals, without Ray or a GPU."""
    card = card_for(config.model)
    manifest = open_manifest(config.manifest)
    validate = ValidateRows(card, max_frames=config.max_frames, duplicate_ids=manifest.duplicate_ids)
    videos = segments = cost = failed = 0
    for raw in read_rows(manifest):
        row = validate.validate(raw)
        if row.get("error"):
            failed += 1
            yield {"id": row["id"], "error": row["error"]}
            continue
        plan = plan_for(RenderParams.model_validate_json(row["params"]))
        videos, segments, cost = videos + 1, segments + len(plan.segments), cost + plan.cost
        yield plan.as_json(row["id"])
    yield {"total": {"videos": videos, "segments": segments, "cost": cost, "failed": failed}}


def read_manifest(manifest: Manifest, resources: Resources) -> Dataset:
    return ray.data.read_parquet(
        manifest.files,
        filesystem=storage.arrow_filesystem(manifest.fs),
        columns=manifest.columns,
        schema=manifest.schema,
        num_cpus=resources.read_num_cpus,
    )


def encode_prompts(
    rows: Dataset, card: ModelCard, output: str, resources: Resources, options: PipelineOptions
) -> Dataset:
    return on_actor_pool(
        rows,
        EncodePrompts,
        # One torch thread: on CPU the encoder works beside the render actors, on their cores.
        dict(card=card, output=output, device=resources.device, options=options, torch_threads=1),
        pool=ActorPoolStrategy(min_size=1, max_size=resources.text_workers),
        num_gpus=resources.text_num_gpus,
        num_cpus=resources.text_num_cpus,
    )


def render_videos(
    rows: Dataset,
    card: ModelCard,
    output: str,
    resources: Resources,
    options: PipelineOptions,
    progress: ActorHandle,
) -> Dataset:
    return on_actor_pool(
        rows,
        RenderVideos,
        dict(
            card=card,
            output=output,
            device=resources.device,
            options=options,
            torch_threads=resources.torch_threads,
            progress=progress,
        ),
        # One video at a time per actor: a free actor always takes the next waiting video instead of it queueing
        # behind a busy actor's long one.
        pool=ActorPoolStrategy(
            min_size=resources.min_workers, max_size=resources.max_workers, max_tasks_in_flight_per_actor=1
        ),
        num_gpus=resources.render_num_gpus,
        num_cpus=resources.render_num_cpus,
        resources=resources.render_resources or None,
    )


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
    row comes back in the next round of collect_results. Not retried here: Ray retries against a lost node before
    it is declared dead, which spends every retry in a second."""
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


class Progress:
    """Videos and segments done, printed as they finish (stdout, so `ray job logs` shows it too)."""

    def __init__(self, *, total_videos: int, total_segments: int, log: Callable[[str], None]) -> None:
        self.total_videos = total_videos
        self.total_segments = total_segments
        self.log = log
        self.counter = start_segment_counter()
        self.counts: Counter[str] = Counter()
        self._stop = threading.Event()
        self._last_line = ""
        self._ticker = threading.Thread(target=self._tick, daemon=True)
        self._ticker.start()

    def video_finished(self, status: str) -> None:
        self.counts[status] += 1
        self._report()

    def close(self) -> None:
        self._stop.set()
        self._report()

    def _tick(self) -> None:
        while not self._stop.wait(PROGRESS_INTERVAL_S):
            self._report()

    def _report(self) -> None:
        segments = ray.get(self.counter.value.remote())
        videos = self.counts["done"] + self.counts["failed"]
        line = (
            f"videos {videos}/{self.total_videos} ({self.counts['failed']} failed), "
            f"segments {segments}/{self.total_segments}"
        )
        if line != self._last_line:
            self._last_line = line
            self.log(line)


def record(results: list[dict], result: dict, progress: Progress, log: Callable[[str], None]) -> None:
    results.append(result)
    if result["error"]:
        log(f"failed: {result['error']}")
    progress.video_finished(result["status"])


def collect_results(
    videos: list[Video],
    render_and_write: Callable[[list[Video]], Dataset],
    output: str,
    progress: Progress,
    log: Callable[[str], None],
    max_retries: int,
) -> JobSummary:
    """Stream the (small) result rows to the driver, report progress, write the index.

    A row whose render actor died (a lost node, OOM, a crash) never comes back from its round; it goes into the
    next round, up to max_retries more, resuming from its persisted segments, and is then recorded as failed.
    """
    results: list[dict] = []
    lost = {row["id"] for row, _ in videos}
    try:
        for attempt in range(max_retries + 1):
            if not lost:
                break
            if attempt:
                log(f"{len(lost)} rows lost their render actor; attempt {attempt + 1} of {max_retries + 1}")
            pending = [video for video in videos if video[0]["id"] in lost]
            for batch in render_and_write(pending).iter_batches(batch_size=None, batch_format="pyarrow"):
                for row in batch.to_pylist():
                    record(results, result_row(row), progress, log)
            lost -= {result["id"] for result in results}
        for video_id in sorted(lost):
            message = (
                f"row {video_id!r}: render actor died {max_retries + 1} times while rendering this row "
                "(out of memory, a lost node or a crash); gave up (--max-retries)"
            )
            record(results, result_row({"id": video_id, "error": message}), progress, log)
    finally:
        progress.close()
    index_uri = write_index(output, results)
    storage.remove_empty_dir(storage.join(output, "_segments"))
    storage.remove_tree(embeddings_dir(output))  # cheap to make again for a row that failed
    log(f"results index: {index_uri}")
    failed = [result["error"] for result in results if result["error"]]
    return JobSummary(
        total=progress.total_videos,
        done=len(results) - len(failed),
        failed=len(failed),
        index_uri=index_uri,
        errors=failed,
    )
