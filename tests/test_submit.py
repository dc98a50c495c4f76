"""`ray job submit --working-dir . --runtime-env deploy/runtime_env.yaml -- python jobs/render.py ...` against a real
`ray start --head`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml
from ray.job_submission import JobSubmissionClient

from tests.conftest import REPO, decode
from tests.ray_head import ray_head

pytestmark = pytest.mark.slow


def test_job_submission_renders_the_example_manifest(tmp_path: Path, model_cache: Path) -> None:
    output = tmp_path / "renders"
    with ray_head(env={"SKYREELS_BATCH_CACHE": str(model_cache)}) as head:
        result = subprocess.run(
            [
                "ray",
                "job",
                "submit",
                "--address",
                head.dashboard,
                "--working-dir",
                ".",
                "--runtime-env",
                "deploy/runtime_env.yaml",
                "--",
                "python",
                "jobs/render.py",
                "examples/manifest.parquet",
                "--output",
                str(output),
            ],
            cwd=REPO,
            env={**os.environ, **head.env},
            capture_output=True,
            text=True,
            timeout=600,
        )
        (job,) = JobSubmissionClient(head.dashboard).list_jobs()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The job's own output reaches `ray job submit` (and `ray job logs`).
    assert "videos 5/5 (0 failed), segments 7/7" in result.stdout
    assert "succeeded" in result.stdout
    # The job ran under the runtime env file, merged with the uploaded working dir.
    runtime_env = yaml.safe_load((REPO / "deploy" / "runtime_env.yaml").read_text())
    assert job.runtime_env["env_vars"] == runtime_env["env_vars"]
    assert job.runtime_env["excludes"] == runtime_env["excludes"]
    assert job.runtime_env["working_dir"].startswith("gcs://")
    manifest = pd.read_parquet(REPO / "examples" / "manifest.parquet")
    results = pd.read_parquet(output / "results").set_index("id")
    assert sorted(results.index) == sorted(manifest.id) and set(results.status) == {"done"}
    for video_id, row in results.iterrows():
        frames, fps = decode(output / "videos" / f"{video_id}.mp4")
        assert frames.shape == (row.num_frames, row.height, row.width, 3) and fps == row.fps
