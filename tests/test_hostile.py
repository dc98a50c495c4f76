"""Hostile manifests and secrets: bad rows cost nothing but themselves, nothing escapes --output, credentials
never appear in what the job prints or writes."""

from __future__ import annotations

import os
from pathlib import Path

import fsspec
import pandas as pd
import pytest

from skyreels_batch.config import JobConfig
from skyreels_batch.pipeline import run_job
from tests.conftest import BUCKET, write_manifest

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


def test_credentials_never_reach_logs_results_or_config(ray_local: None, tmp_path: Path, capfd) -> None:
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    manifest = write_manifest(tmp_path / "m.parquet", [FINE, {**FINE, "id": "bad", "num_frames": 6}])
    lines: list[str] = []
    output = f"s3://{BUCKET}/secrets-check"
    config = JobConfig(manifest=str(manifest), output=output)
    summary = run_job(config, log=lines.append)
    assert (summary.done, summary.failed) == (1, 1)
    printed = "\n".join(lines) + capfd.readouterr().out + capfd.readouterr().err + repr(config)
    assert secret not in printed
    fs = fsspec.filesystem("s3")
    for path in fs.find(f"{BUCKET}/secrets-check"):
        assert secret.encode() not in fs.cat_file(path), path
