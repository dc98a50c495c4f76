"""Long videos through the whole job on a real local Ray, including a driver SIGKILLed mid-video."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import pandas as pd
import pytest

from skyreels_batch.config import JobConfig
from skyreels_batch.pipeline import run_job
from tests.conftest import BUCKET, REPO, decode, write_manifest
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


def test_long_and_short_videos_render_with_exact_frame_counts_and_segment_progress(
    ray_local: None, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path / "m.parquet", [LONG, SHORT])
    lines: list[str] = []
    summary = run_job(JobConfig(manifest=str(manifest), output=str(tmp_path / "out")), log=lines.append)
    assert (summary.done, summary.failed) == (2, 0)
    assert "videos 2/2 (0 failed), segments 21/21" in lines
    assert decode(tmp_path / "out" / "videos" / "long-take.mp4")[0].shape == (241, 64, 64, 3)
    assert decode(tmp_path / "out" / "videos" / "short.mp4")[0].shape == (9, 32, 32, 3)
    results = pd.read_parquet(tmp_path / "out" / "results").set_index("id")
    assert results.loc["long-take"].num_segments == 20 and results.loc["short"].num_segments == 1


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_job_killed_mid_video_resumes_from_its_persisted_segments(
    ray_local: None, tmp_path: Path, where: str
) -> None:
    manifest = write_manifest(tmp_path / "m.parquet", [LONG])
    reference = tmp_path / "reference"
    run_job(JobConfig(manifest=str(manifest), output=str(reference)), log=lambda _: None)

    output = str(tmp_path / "out") if where == "local" else f"s3://{BUCKET}/killed-{tmp_path.name}"
    fs, root = fsspec.core.url_to_fs(output)
    marker = f"{root}/_segments/{LONG['id']}/00002.safetensors"
    ray_tmp = tempfile.mkdtemp(prefix="rk-", dir="/tmp")  # short: Ray's socket paths live under it
    driver = subprocess.Popen(
        [sys.executable, "jobs/render.py", str(manifest), "--output", output],
        cwd=REPO,
        env={**os.environ, "RAY_TMPDIR": ray_tmp},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not fs.exists(marker):
            assert driver.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline, "no segment was persisted in time"
            fs.invalidate_cache()
            time.sleep(0.02)
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and everything it started, mid-video
        driver.wait()
    finally:
        stop_processes_under(ray_tmp)
    assert not fs.exists(f"{root}/videos/{LONG['id']}.mp4")

    run_job(JobConfig(manifest=str(manifest), output=output), log=lambda _: None)
    results = pd.read_parquet(f"{output}/results").set_index("id")
    assert 2 <= results.loc[LONG["id"]].resumed_segments < 20
    name = f"videos/{LONG['id']}.mp4"
    assert fs.cat_file(f"{root}/{name}") == (reference / name).read_bytes()
