"""Multi-node clusters on this machine: a render node lost mid-job (`ray.cluster_utils.Cluster`), and a render
pool that grows as the autoscaler adds nodes (a `ray start --head` with Ray's fake multi-node provider)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from skyreels_batch.models import card_for
from tests.cluster_jobs import AUTOSCALING_ROWS, NODE_REMOVAL_ROWS
from tests.conftest import REPO, EncodeThenRender, decode
from tests.test_modes import render

pytestmark = pytest.mark.slow


def run_scenario(scenario: str, directory: Path, timeout_s: int = 420) -> dict:
    # A short private RAY_TMPDIR: Ray's socket paths are length-limited, and the child's cluster must not be
    # found by (or find) any other Ray on the machine.
    ray_tmp = tempfile.mkdtemp(prefix="rc-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    log = directory / f"{scenario}.log"
    with log.open("w") as stderr:
        completed = subprocess.run(
            [sys.executable, "-m", "tests.cluster_jobs", scenario, str(directory)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            timeout=timeout_s,
        )
    assert completed.returncode == 0, f"{scenario} failed; its log ends:\n{log.read_text()[-6000:]}"
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_a_render_node_lost_mid_job_does_not_stop_it(tmp_path: Path) -> None:
    seen = run_scenario("node-removal", tmp_path)
    assert seen["render_nodes_before"] == 2
    assert (seen["done"], seen["failed"]) == (3, 0), seen["log"]
    assert seen["alive_nodes_after"] == 2, "the head and the surviving render node"
    assert any("rows lost in the last pass; attempt 2" in line for line in seen["log"]), seen["log"]
    results = pd.read_parquet(tmp_path / "out" / "results").set_index("id")
    assert (results.status == "done").all()
    assert results.resumed_segments.max() > 0, "the lost video resumed from its persisted segments"
    # Every video, including the one that moved nodes, is exactly what an uninterrupted render makes.
    # With the job's torch threads (3 CPUs over 2 actors: 1 each): CPU kernels split their sums by thread count, so
    # the same row rendered with 2 threads differs in the last bit (up to 1/255 in 0.01% of the pixels here).
    # set_num_threads also sizes process-wide pools (MKL, oneDNN), so the test gives the rest of the session its
    # threads back.
    threads = torch.get_num_threads()
    try:
        stage = EncodeThenRender(card_for("tiny-df"), output=str(tmp_path / "reference"), torch_threads=1)
        for row in NODE_REMOVAL_ROWS:
            frames = decode(tmp_path / "out" / "videos" / f"{row['id']}.mp4")[0]
            assert np.array_equal(frames, render(stage, stage.card, row)), row["id"]
    finally:
        torch.set_num_threads(threads)


def test_the_render_pool_grows_as_the_autoscaler_adds_gpu_nodes(tmp_path: Path) -> None:
    seen = run_scenario("autoscaling", tmp_path)
    assert (seen["nodes_at_start"], seen["gpus_at_start"]) == (1, 0), "only the head at the start"
    assert seen["max_nodes"] == 3, "the autoscaler added both fake GPU nodes"
    assert seen["max_render_actors"] == 2, "the pool grew from --workers 1:2's one actor to two"
    assert (seen["done"], seen["failed"]) == (len(AUTOSCALING_ROWS), 0), seen["log"]
