"""The GPU cluster path on multi-node clusters with logical GPUs (SKYREELS_BATCH_SIMULATED_GPUS=1: placed as on GPUs,
torch on the CPU): a job on defaults only against Ray's fake autoscaler with GPU nodes from zero, the shipped RayJob's
entrypoint on it, and on a `ray.cluster_utils.Cluster` a GPU node lost mid-job, a render actor killed, the door and
a render group over two GPUs of one node."""

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
import yaml

from skyreels_batch.models import card_for
from tests.cluster_jobs import AUTOSCALING_ROWS, DEPLOY_ROWS, GROUP_ROWS, NODE_LOST_ROWS, deploy_command
from tests.conftest import REPO, EncodeThenRender, decode
from tests.test_modes import render

pytestmark = pytest.mark.slow
SIMULATED = " (simulated GPUs: placed on Ray's GPUs, torch on the CPU)"


def run_scenario(scenario: str, directory: Path, timeout_s: int = 900) -> dict:
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


@pytest.fixture(scope="module")
def autoscaled(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    directory = tmp_path_factory.mktemp("autoscaling")
    return run_scenario("gpu-autoscaling", directory), directory


@pytest.fixture(scope="module")
def gpu_cluster(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    directory = tmp_path_factory.mktemp("gpu-cluster")
    return run_scenario("gpu-cluster", directory), directory


def gpu_nodes(job: dict) -> set[str]:
    return {node for node, gpus in job["node_gpus"].items() if gpus >= 1}


def assert_on_gpu_nodes(job: dict, stages: tuple[str, ...] = ("render", "text")) -> list[dict]:
    """Every model load of these stages happened on a GPU node, in a process Ray gave one GPU; returns them."""
    loads = [load for load in job["loads"] if load["stage"] in stages]
    assert {load["stage"] for load in loads} == set(stages), job["loads"]
    for load in loads:
        assert load["node"] in gpu_nodes(job), load
        assert len(load["gpu_ids"]) == 1 and load["visible_devices"] == load["gpu_ids"][0], load
    assert set(job["render_nodes"]) <= gpu_nodes(job)
    return loads


def assert_frames_are_the_cpu_renders(output: Path, rows: list[dict], reference: Path) -> None:
    """Simulated GPUs render on the CPU with the job's torch threads (1): the frames are the in-process render's.
    set_num_threads also sizes process-wide pools (MKL, oneDNN), so the session gets its threads back."""
    threads = torch.get_num_threads()
    try:
        stage = EncodeThenRender(card_for("tiny-df"), output=str(reference), torch_threads=1)
        for row in rows:
            frames = decode(output / "videos" / f"{row['id']}.mp4")[0]
            assert np.array_equal(frames, render(stage, stage.card, row)), row["id"]
    finally:
        torch.set_num_threads(threads)


def test_a_job_on_defaults_renders_on_the_gpu_nodes_the_autoscaler_adds_from_zero(
    autoscaled: tuple[dict, Path],
) -> None:
    seen, base = autoscaled
    assert (seen["nodes_at_start"], seen["gpus_at_start"]) == (1, 0), "only the head, without a GPU, at the start"
    job = seen["defaults"]
    assert job["exit"] == 0, job["stderr"]
    assert job["stdout"][0] == (
        f"cuda: the autoscaler can add 2 fake-gpu nodes with 1 GPU each (the autoscaler's config "
        f"{base / 'autoscaling.json'}); render actors 1-2{SIMULATED}"
    )
    assert job["max_nodes"] == 3, "the autoscaler added both GPU nodes"
    assert job["max_render_actors"] == 2, "the pool grew to what auto said"
    assert_on_gpu_nodes(job)
    results = pd.read_parquet(base / "defaults" / "results")
    assert sorted(results.id) == sorted(row["id"] for row in AUTOSCALING_ROWS) and set(results.status) == {"done"}


def test_the_shipped_rayjob_entrypoint_renders_on_the_gpu_nodes(autoscaled: tuple[dict, Path]) -> None:
    seen, base = autoscaled
    job = seen["deploy"]
    assert job["command"] == deploy_command(base)
    shipped = yaml.safe_load((REPO / "deploy" / "rayjob.yaml").read_text())["spec"]["entrypoint"].split()
    assert job["command"][2:] == [arg.replace("s3://BUCKET", str(base)) for arg in shipped[2:]], "the flags as shipped"
    assert job["exit"] == 0, job["stderr"]
    assert job["stdout"][0].startswith("cuda: ") and job["stdout"][0].endswith(f"render actors 1-64{SIMULATED}")
    assert "with Skywork/SkyReels-V2-DF-1.3B-540P-Diffusers" in job["stdout"][1]
    assert_on_gpu_nodes(job)
    results = pd.read_parquet(base / "renders" / "results").set_index("id")
    assert sorted(results.index) == sorted(row["id"] for row in DEPLOY_ROWS) and set(results.status) == {"done"}
    frames, fps = decode(base / "renders" / "videos" / "deploy-0.mp4")
    assert frames.shape == (161, 32, 32, 3) and fps == 24, "the rows' size, the 1.3B card's frame rate"


def test_a_gpu_node_lost_mid_job_does_not_stop_it(gpu_cluster: tuple[dict, Path], tmp_path: Path) -> None:
    seen, base = gpu_cluster
    job = seen["node_lost"]
    assert job["log"][0] == f"cuda: 2 GPUs now; render actors 2-2{SIMULATED}"
    assert (job["done"], job["failed"]) == (len(NODE_LOST_ROWS), 0), job["log"]
    assert seen["removed_node"] in seen["gpu_node_ids"] and job["max_render_actors"] == 2
    assert any("rows lost in the last pass; attempt 2" in line for line in job["log"]), job["log"]
    assert_on_gpu_nodes(job)
    results = pd.read_parquet(base / "node-lost" / "results").set_index("id")
    assert (results.status == "done").all() and results.resumed_segments.max() > 0
    assert_frames_are_the_cpu_renders(base / "node-lost", NODE_LOST_ROWS, tmp_path)


def test_a_render_actor_killed_is_replaced_on_a_gpu_and_a_waiting_actor_is_reported(
    gpu_cluster: tuple[dict, Path],
) -> None:
    seen, base = gpu_cluster
    job = seen["actor_killed"]
    assert seen["killed_pid"] and (job["done"], job["failed"]) == (1, 0), job["log"]
    assert any("rows lost in the last pass; attempt 2" in line for line in job["log"]), job["log"]
    renders = assert_on_gpu_nodes(job)
    # The killed actor and its replacement at least (Ray may also restart the killed one before the pass ends).
    assert len([load for load in renders if load["stage"] == "render"]) >= 2, renders
    assert pd.read_parquet(base / "actor-killed" / "results").resumed_segments.iloc[0] >= 10
    # --workers 1:2 on one GPU node: the second render actor can never be placed, and the progress line says so.
    notes = [line for line in job["log"] if "not placed for" in line]
    assert notes, job["log"]
    assert "1 render actors asking {CPU: 1, GPU: 0.8} each; nodes now: " in notes[0]
    assert "no autoscaler node types found" in notes[0]


def test_gpus_per_video_larger_than_any_node_exits_2_at_the_door(gpu_cluster: tuple[dict, Path]) -> None:
    seen, _ = gpu_cluster
    door = seen["door"]
    assert (door["exit"], door["wrote"]) == (2, False) and door["seconds"] < 60
    (line,) = door["stderr"].splitlines()
    assert line.startswith(
        "error: the job cannot be placed on cuda: a render group (--gpus-per-video 2) asks for 2 x {CPU: 1, GPU: 0.8} "
        "on one node, which no node of this cluster holds"
    ), line


def test_a_render_group_shares_the_gpus_of_its_node_in_rank_order(
    gpu_cluster: tuple[dict, Path], tmp_path: Path
) -> None:
    seen, base = gpu_cluster
    job = seen["group"]
    assert job["log"][0] == f"cuda: 3 GPUs now; render groups of 2 GPUs 1-1{SIMULATED}"
    assert (job["done"], job["failed"]) == (1, 0), job["log"]
    ranks = sorted((load for load in job["loads"] if load["stage"] == "render"), key=lambda load: load["rank"])
    assert [load["rank"] for load in ranks] == [0, 1]
    (node,) = {load["node"] for load in ranks}
    assert job["node_gpus"][node] == 2, "the two-GPU node"
    own = [load["gpu_ids"] for load in ranks]
    assert all(len(ids) == 1 for ids in own) and own[0] != own[1], "a GPU each"
    # Before CUDA starts, every rank sees the group's GPUs in rank order (Ray shows each only its own).
    assert {load["visible_devices"] for load in ranks} == {f"{own[0][0]},{own[1][0]}"}
    # Two ranks render what one process renders (float32 sums in another order: a level at most, rarely).
    threads = torch.get_num_threads()
    try:
        stage = EncodeThenRender(card_for("tiny-df"), output=str(tmp_path), torch_threads=1)
        one = render(stage, stage.card, GROUP_ROWS[0]).astype(np.int16)
    finally:
        torch.set_num_threads(threads)
    two = decode(base / "group" / "videos" / "pair.mp4")[0].astype(np.int16)
    assert one.shape == two.shape and np.abs(one - two).max() <= 1 and (one != two).mean() < 1e-3
