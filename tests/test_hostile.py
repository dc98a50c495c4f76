"""Hostile manifests and secrets: bad rows cost nothing but themselves, nothing escapes --output, credentials
never appear in what the job prints or writes."""

from __future__ import annotations

import os
from pathlib import Path

import fsspec
import pandas as pd
import pytest

from skyreels_batch.config import JobConfig
from skyreels_batch.job.pipeline import run_job
from tests.conftest import BUCKET, write_manifest
from tests.ray_head import run_with_own_ray

pytestmark = pytest.mark.slow

FINE = {"id": "fine", "prompt": "a quiet lake", "num_frames": 5, "height": 32, "width": 32}


def snapshot(root: Path) -> dict[str, float]:
    return {str(path): path.stat().st_mtime for path in root.rglob("*")}


def test_hostile_rows_fail_alone_and_nothing_is_written_outside_the_output(ray_local: None, tmp_path: Path) -> None:
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / "precious.txt").write_text("keep me")
    hostile = [
        {**FINE, "id": "../escape"},
        {**FINE, "id": "/etc/passwd"},
        {**FINE, "id": "a/b"},
        {**FINE, "id": "..."},  # legal, stays inside
        {**FINE, "id": "huge", "height": 4096, "width": 4096},
        {**FINE, "id": "steps", "num_inference_steps": 0},
        {**FINE, "id": "cfg", "guidance_scale": 1e9},
        {**FINE, "id": "mode", "mode": "teleport"},
        {**FINE, "id": "img", "mode": "i2v", "image": str(workspace / "absent.png")},
        {**FINE, "id": "frames", "num_frames": 10**6},
        {**FINE, "id": "twice"},
        {**FINE, "id": "twice"},
        FINE,
    ]
    manifest = write_manifest(tmp_path / "m.parquet", hostile)
    output = workspace / "out"
    before = snapshot(tmp_path)
    summary = run_job(JobConfig(manifest=str(manifest), output=str(output)), log=lambda _: None)
    assert (summary.done, summary.failed) == (2, len(hostile) - 2)
    changed = {path for path, mtime in snapshot(tmp_path).items() if before.get(path) != mtime}
    changed -= {str(parent) for parent in output.parents}  # creating out/ touches its parent directory
    assert changed and all(path.startswith(str(output)) for path in changed), changed
    assert (workspace / "precious.txt").read_text() == "keep me"
    results = pd.read_parquet(output / "results")
    assert sorted(results[results.status == "done"].id) == ["...", "fine"]
    errors = dict(zip(results.id, results.error, strict=True))
    for video_id, field in [
        ("../escape", "id"),
        ("/etc/passwd", "id"),
        ("a/b", "id"),
        ("huge", "height/width"),
        ("steps", "num_inference_steps"),
        ("cfg", "guidance_scale"),
        ("mode", "mode"),
        ("img", "image"),
        ("frames", "num_frames"),
        ("twice", "id"),
    ]:
        assert f": {field}: " in errors[video_id], (video_id, errors[video_id])


def test_credentials_never_reach_what_the_driver_and_workers_print_or_write(s3_endpoint: str, tmp_path: Path) -> None:
    """The job as run by hand: `ray.init()` streams every worker's output to the driver, so what the driver prints
    includes what the render, encoder and writer workers print."""
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    manifest = write_manifest(tmp_path / "m.parquet", [FINE, {**FINE, "id": "bad", "num_frames": 6}])
    output = f"s3://{BUCKET}/secrets-check"
    job = run_with_own_ray(["jobs/render.py", str(manifest), "--output", output])
    printed = job.stdout + job.stderr
    assert job.returncode == 1 and "1 done, 1 failed of 2" in printed, printed
    assert secret not in printed
    assert secret not in repr(JobConfig(manifest="m.parquet", output=output))
    fs = fsspec.filesystem("s3")
    written = fs.find(f"{BUCKET}/secrets-check")
    assert any(path.endswith(".mp4") for path in written)
    for path in written:
        assert secret.encode() not in fs.cat_file(path), path


def test_the_credentials_check_sees_a_secret_a_worker_prints(s3_endpoint: str) -> None:
    """The control: in a process that starts Ray as the job does, a worker printing the secret is caught."""
    leak = (
        "import os, time, ray\n"
        "ray.init()\n"
        "print_secret = ray.remote(lambda: print('AWS_SECRET_ACCESS_KEY=' + os.environ['AWS_SECRET_ACCESS_KEY']))\n"
        "ray.get(print_secret.remote())\n"
        "time.sleep(3)  # Ray streams worker output to the driver about once a second\n"
    )
    printed = run_with_own_ray(["-c", leak])
    assert os.environ["AWS_SECRET_ACCESS_KEY"] in printed.stdout + printed.stderr
