"""Long videos and long runs through the whole job on a real local Ray: the driver SIGKILLed after some videos are
committed and mid-video, a clean stop on SIGTERM, and the results index read while a run goes on."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec
import pandas as pd
import pytest
import ray

from skyreels_batch.config import JobConfig
from skyreels_batch.job.collect import StopRequest
from skyreels_batch.job.pipeline import run_job
from skyreels_batch.output.results import read_index
from tests.conftest import BUCKET, REPO, decode, distinct, write_manifest
from tests.ray_head import stop_processes_under

pytestmark = pytest.mark.slow

# 20 segments of 3 new latent frames (17-frame windows, 5 frames of overlap).
LONG = {
    "id": "long-take",
    "prompt": "a drone flight along a coast",
    "num_frames": 241,
    "base_num_frames": 17,
    "overlap_history": 5,
    "height": 64,
    "width": 64,
    "seed": 9,
    "num_inference_steps": 4,
}
SHORT = {"id": "short", "prompt": "a candle flame", "num_frames": 9, "height": 32, "width": 32}
# Rendered before LONG with --manifest-order and one render actor.
SHORTS = [{**SHORT, "id": f"short-{number}", "seed": number, "num_inference_steps": 2} for number in range(3)]
# The job's own stdout lines; Ray's go to stderr.
OWN_LINE = re.compile(
    r"((?:cuda|cpu): .*; render (?:actors|groups of) |rendering [\d,]+ rows of |videos [\d,]+/[\d,]+ |stopping: "
    r"|results index: |model loads: |stopped: [\d,]+ rows left; run the same command to resume$"
    r"|[\d,]+ done(?: \([\d,]+ already done\))?, [\d,]+ failed of [\d,]+$|skipping )"
)


def test_long_and_short_videos_render_with_exact_frame_counts_and_segment_progress(
    ray_local: None, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path / "m.parquet", [LONG, SHORT])
    lines: list[str] = []
    summary = run_job(JobConfig(manifest=str(manifest), output=str(tmp_path / "out")), log=lines.append)
    assert (summary.done, summary.failed) == (2, 0)
    assert any(line.startswith("videos 2/2 (0 failed), segments 21/21, ") for line in lines), lines
    assert decode(tmp_path / "out" / "videos" / "long-take.mp4")[0].shape == (241, 64, 64, 3)
    assert decode(tmp_path / "out" / "videos" / "short.mp4")[0].shape == (9, 32, 32, 3)
    results = pd.read_parquet(tmp_path / "out" / "results").set_index("id")
    assert results.loc["long-take"].num_segments == 20 and results.loc["short"].num_segments == 1


@contextmanager
def driver(manifest: Path, output: str, *args: str) -> Iterator[subprocess.Popen]:
    """`python jobs/render.py` in a session of its own, with a Ray of its own (stopped afterwards, whatever
    happened to the driver)."""
    ray_tmp = tempfile.mkdtemp(prefix="rk-", dir="/tmp")  # short: Ray's socket paths live under it
    process = subprocess.Popen(
        [sys.executable, "jobs/render.py", str(manifest), "--output", output, "--manifest-order", *args],
        cwd=REPO,
        env={**os.environ, "RAY_TMPDIR": ray_tmp},
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        stop_processes_under(ray_tmp)


def wait_for(fs: fsspec.AbstractFileSystem, path: str, process: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not fs.exists(path):
        assert process.poll() is None, "the job ended before it could be interrupted"
        assert time.monotonic() < deadline, f"{path} did not appear in time"
        fs.invalidate_cache()
        time.sleep(0.02)


def committed(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, tuple[bytes, object]]:
    """Videos whose MP4 and record are both there: their bytes and modification time."""
    fs.invalidate_cache()
    videos = {}
    for video_id in (path.rsplit("/", 1)[-1].removesuffix(".json") for path in fs.glob(f"{root}/_records/*.json")):
        path = f"{root}/videos/{video_id}.mp4"
        if fs.exists(path):
            videos[video_id] = (fs.cat_file(path), fs.modified(path))
    return videos


@pytest.fixture(scope="module")
def long_reference(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """LONG's MP4 from one uninterrupted run."""
    folder = tmp_path_factory.mktemp("reference")
    long_only = write_manifest(folder / "long.parquet", [LONG])
    run_job(JobConfig(manifest=str(long_only), output=str(folder / "out")), log=lambda _: None)
    return (folder / "out" / "videos" / f"{LONG['id']}.mp4").read_bytes()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_driver_killed_after_some_videos_and_mid_video_renders_only_the_rest(
    long_reference: bytes, tmp_path: Path, where: str
) -> None:
    manifest = write_manifest(tmp_path / "m.parquet", [*SHORTS, LONG])

    output = str(tmp_path / "out") if where == "local" else f"s3://{BUCKET}/killed-{tmp_path.name}"
    fs, root = fsspec.core.url_to_fs(output)
    # No fold into the index before the kill: what proves the short videos done is their records alone.
    with driver(manifest, output, "--index-interval", "3600") as process:
        for row in SHORTS:  # committed while the long video renders (their writers' pace varies, on S3 most)
            wait_for(fs, f"{root}/_records/{row['id']}.json", process)
        wait_for(fs, f"{root}/_segments/{LONG['id']}/00002.safetensors", process)
        os.killpg(process.pid, signal.SIGKILL)  # the driver and everything it started, mid-video
    before = committed(fs, root)
    assert sorted(before) == [row["id"] for row in SHORTS] and not fs.exists(f"{root}/results")

    lines: list[str] = []
    summary = run_job(JobConfig(manifest=str(manifest), output=output), log=lines.append)
    assert (summary.done, summary.skipped, summary.failed) == (4, 3, 0)
    assert f"skipping 3 rows already done in {output}" in lines
    fs.invalidate_cache()
    for video_id, (data, modified) in before.items():  # their records are folded into the index by now
        path = f"{root}/videos/{video_id}.mp4"
        assert (fs.cat_file(path), fs.modified(path)) == (data, modified), f"{video_id} was rendered again"
    results = pd.read_parquet(f"{output}/results").set_index("id")
    assert sorted(results.index) == sorted(row["id"] for row in [*SHORTS, LONG]) and set(results.status) == {"done"}
    assert 2 <= results.loc[LONG["id"]].resumed_segments < 20
    assert fs.cat_file(f"{root}/videos/{LONG['id']}.mp4") == long_reference


def test_sigterm_stops_cleanly_and_the_same_command_finishes_every_row_once(ray_local: None, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.parquet", [*SHORTS, LONG])
    output = tmp_path / "out"
    segments = output / "_segments" / LONG["id"]
    fs = fsspec.filesystem("file")
    with driver(manifest, str(output)) as process:
        wait_for(fs, str(segments / "00002.safetensors"), process)
        at_signal = len(list(segments.glob("*.safetensors")))
        process.send_signal(signal.SIGTERM)  # the driver alone, as `ray job stop` or a pod deletion signals it
        stdout, _ = process.communicate(timeout=120)
    lines = stdout.splitlines()
    assert process.returncode == 3, stdout
    assert lines[-1] == "stopped: 1 rows left; run the same command to resume"
    assert all(OWN_LINE.match(line) for line in lines), f"a line that is not the job's own: {lines}"
    persisted = len(list(segments.glob("*.safetensors")))
    assert at_signal < persisted < 20, "the segment in flight persisted, and no new one started after it"
    assert not (output / "videos" / f"{LONG['id']}.mp4").exists()
    stopped = pd.read_parquet(output / "results")
    assert sorted(stopped.id) == [row["id"] for row in SHORTS] and set(stopped.status) == {"done"}
    shorts = {path.name: path.stat().st_mtime_ns for path in (output / "videos").glob("*.mp4")}
    # A stopped job leaves no embeddings (the run that resumes encodes the row's few texts again): work folders
    # hold only the rows in flight, and a stopped run has none.
    assert not (output / "_embeddings").exists()

    lines = []
    summary = run_job(JobConfig(manifest=str(manifest), output=str(output)), log=lines.append)
    assert (summary.done, summary.skipped, summary.failed, summary.stopped) == (4, 3, 0, False)
    progress = [line for line in lines if line.startswith("videos ")]
    assert progress[-1].startswith("videos 1/1 (0 failed), segments 20/20"), progress  # resumed ones counted too
    assert all((output / "videos" / name).stat().st_mtime_ns == mtime for name, mtime in shorts.items())
    results = pd.read_parquet(output / "results").set_index("id")
    assert sorted(results.index) == sorted(row["id"] for row in [*SHORTS, LONG]) and set(results.status) == {"done"}
    assert results.loc[LONG["id"]].resumed_segments == persisted
    assert decode(output / "videos" / f"{LONG['id']}.mp4")[0].shape == (241, 64, 64, 3)


def test_a_second_stop_request_stops_at_once_with_the_index_written(ray_local: None, tmp_path: Path) -> None:
    # Segments of several seconds each, so that "at once" is told apart from "after the segment in flight".
    slow = {**LONG, "id": "slow", "height": 192, "width": 320, "num_inference_steps": 12}
    manifest = write_manifest(tmp_path / "m.parquet", [*SHORTS, slow])
    output = tmp_path / "out"
    segments = output / "_segments" / "slow"
    stop, at_request = StopRequest(), []

    def interrupt() -> None:
        while not (segments / "00000.safetensors").exists():
            time.sleep(0.02)
        at_request.append(len(list(segments.glob("*.safetensors"))))
        stop.request()
        stop.request()  # Ctrl-C twice

    threading.Thread(target=interrupt, daemon=True).start()
    config = JobConfig(manifest=str(manifest), output=str(output), longest_first=False, stop_grace_s=600)
    summary = run_job(config, log=lambda _: None, stop=stop)
    assert len(list(segments.glob("*.safetensors"))) == at_request[0], "it did not wait for the segment in flight"
    assert (summary.stopped, summary.done, summary.left) == (True, 3, 1)
    index = pd.read_parquet(output / "results")
    assert sorted(index.id) == [row["id"] for row in SHORTS] and set(index.status) == {"done"}


def ray_data_count(path: str) -> int:
    """Ray Data lists the parts, then reads them in tasks: a part merged away in between is read again, as the
    docs tell a plain reader to (docs/operations.md, the results index)."""
    for attempt in range(3):
        try:
            return ray.data.read_parquet(path).count()
        except Exception as error:  # noqa: BLE001 - Ray wraps the FileNotFoundError of its read task
            if "No such file" not in str(error) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def test_the_index_read_while_a_run_goes_on_lists_what_it_has_committed(ray_local: None, tmp_path: Path) -> None:
    rows = [{**SHORT, "id": f"clip-{number}", "seed": number} for number in range(8)]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    output = tmp_path / "out"
    config = JobConfig(manifest=str(manifest), output=str(output), index_interval_s=1.0)
    job = threading.Thread(target=run_job, args=(config,), kwargs={"log": lambda _: None})
    job.start()
    snapshots, ray_data_reads = [], []
    while job.is_alive():
        time.sleep(0.5)
        try:
            index = pd.read_parquet(output / "results")
        except FileNotFoundError:
            continue
        now = time.time()
        videos = {path.stem: path.stat().st_mtime for path in (output / "videos").glob("*.mp4")}
        # A plain read lists an id twice only as the same row twice: a fold (here, the run's last) has copied its
        # part into its shard and not yet deleted the part. read_index lists it once.
        assert distinct(index).id.is_unique
        exact = read_index(str(output))
        assert set(index.id) <= set(videos) and set(exact.id) <= set(videos), "the index lists only committed videos"
        # Folded every second here (15 s by default): anything committed 20 s ago is listed.
        assert {video for video, mtime in videos.items() if now - mtime > 20} <= set(exact.id)
        snapshots.append(index.id.nunique())
        if 0 < len(index) < len(rows) and not ray_data_reads:
            ray_data_reads.append(ray_data_count(str(output / "results")))
    job.join()
    assert any(0 < count < len(rows) for count in snapshots), f"no read while the run was going on: {snapshots}"
    assert ray_data_reads and 0 < ray_data_reads[0] < len(rows)
    assert len(pd.read_parquet(output / "results")) == len(rows)
