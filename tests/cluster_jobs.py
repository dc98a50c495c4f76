"""Render jobs on throwaway multi-node Ray clusters whose nodes offer logical GPUs, each scenario run as
`python -m tests.cluster_jobs SCENARIO DIR` in its own process (the test session holds its own Ray). Prints one JSON
line of what it saw.

Every job here runs with SKYREELS_BATCH_SIMULATED_GPUS=1: actors are placed on Ray's GPUs exactly as on real ones
(num_gpus, placement-group GPU bundles, the GPU ids Ray assigns) and torch runs on the CPU.

The child is given its own RAY_TMPDIR by the test, so its sessions and its "current cluster" address file never
touch another Ray on the machine; it stops only the processes it started."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import ray
import yaml
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from skyreels_batch.config import JobConfig
from skyreels_batch.job import cluster as cluster_module
from skyreels_batch.job import progress
from skyreels_batch.job.cli import main
from skyreels_batch.job.pipeline import run_job
from skyreels_batch.job.resources import SIMULATED_GPUS_ENV
from skyreels_batch.models import card_for
from skyreels_batch.models.embedded import export_embedded
from skyreels_batch.output.results import runs_dir
from tests.conftest import REPO, write_manifest
from tests.ray_head import free_port, ray_head

# Dead nodes are noticed in ~2 s instead of Ray's default ~30 s.
FAST_HEALTH_CHECKS = {
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 4,
    "health_check_initial_delay_ms": 0,
}
# 241 frames in windows of 17 (overlap 5): 20 chained segments of 3 steps at 32x32, a few seconds a video.
LONG_ROW = {
    "prompt": "a drone flight along a coast",
    "num_frames": 241,
    "base_num_frames": 17,
    "overlap_history": 5,
    "height": 32,
    "width": 32,
    "num_inference_steps": 3,
}
NODE_LOST_ROWS = [{**LONG_ROW, "id": f"take-{seed}", "seed": seed} for seed in range(3)]
ACTOR_KILLED_ROWS = [{**LONG_ROW, "id": "killed", "seed": 7}]
# 32x48: 6 transformer tokens a frame, split 3 and 3 between two ranks.
GROUP_ROWS = [{**LONG_ROW, "id": "pair", "seed": 8, "num_frames": 37, "width": 48}]
# Enough work that the pool grows while the autoscaler adds the second node.
AUTOSCALING_ROWS = [{**LONG_ROW, "id": f"auto-{seed}", "seed": seed} for seed in range(10)]
# The shipped RayJob's rows: sizes of their own (the 1.3B card's defaults are 544x960), everything else the card's.
DEPLOY_ROWS = [{**LONG_ROW, "id": f"deploy-{seed}", "seed": seed, "num_frames": 161} for seed in range(3)]


def render_actors() -> list:
    actors = list_actors(filters=[("state", "=", "ALIVE")], detail=True)
    # A render pool's actors, or a render group's rank 0 (its Ray Data actor is a RenderGroup, which renders nothing).
    return [
        actor for actor in actors if any(name in (actor.class_name or "") for name in ("RenderVideos", "GroupLeader"))
    ]


def alive_nodes() -> list[dict]:
    return [node for node in ray.nodes() if node["Alive"]]


def videos_in_progress(output: Path, *, segments: range) -> int:
    folders = output.glob("_segments/*")
    return sum(len(list(folder.glob("*.safetensors"))) in segments for folder in folders)


def model_loads(output: Path) -> list[dict]:
    """Every model load of the job's runs (`<output>/results/_runs/*.json`): stage, rank, node, GPU ids."""
    return [
        load
        for run in sorted(Path(runs_dir(str(output))).glob("*.json"))
        for load in json.loads(run.read_text())["model_loads"]
    ]


class ClusterWatch(threading.Thread):
    """Samples the cluster every 0.5 s while a job runs: the GPUs of every node seen, the nodes holding render
    actors, and when the first video was committed."""

    def __init__(self, output: Path) -> None:
        super().__init__(daemon=True)
        self.output = output
        self.started = time.monotonic()
        self.node_gpus: dict[str, float] = {}
        self.samples: list[dict] = []
        self.first_video_s: float | None = None
        self.finished = threading.Event()

    def run(self) -> None:
        while not self.finished.wait(0.5):
            nodes = alive_nodes()
            self.node_gpus.update({node["NodeID"]: node["Resources"].get("GPU", 0.0) for node in nodes})
            actors = render_actors()
            self.samples.append(
                {"nodes": len(nodes), "render_actors": len(actors), "render_nodes": sorted({a.node_id for a in actors})}
            )
            if self.first_video_s is None and any((self.output / "videos").glob("*.mp4")):
                self.first_video_s = round(time.monotonic() - self.started, 1)

    def stop(self) -> dict:
        self.finished.set()
        self.join()
        return {
            "node_gpus": self.node_gpus,
            "max_nodes": max(sample["nodes"] for sample in self.samples),
            "max_render_actors": max(sample["render_actors"] for sample in self.samples),
            "render_nodes": sorted({node for sample in self.samples for node in sample["render_nodes"]}),
            "first_video_s": self.first_video_s,
            "job_s": round(time.monotonic() - self.started, 1),
        }


def run_command(command: list[str], output: Path) -> dict:
    """A render job's command line, as a user runs it on the head (RAY_ADDRESS set: it attaches to the cluster)."""
    watch = ClusterWatch(output)
    watch.start()
    env = {**os.environ, SIMULATED_GPUS_ENV: "1"}
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    seen = watch.stop()
    return {
        **seen,
        "exit": completed.returncode,
        "stdout": completed.stdout.splitlines(),
        "stderr": completed.stderr[-3000:],
        "loads": model_loads(output),
    }


def fake_multinode_config(gcs_address: str, max_gpu_nodes: int) -> dict:
    """An autoscaling config for Ray's fake multi-node provider: a head without GPUs and GPU worker nodes from zero
    (local raylets with logical GPUs, started and stopped by the head's autoscaler). Complete, because the monitor
    reads it as is and Ray's wheel does not ship the provider's defaults file."""
    return {
        "cluster_name": "fake-skyreels",
        "max_workers": max_gpu_nodes,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 1,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "auth": {"ssh_user": "ubuntu"},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
            "fake-gpu": {
                "resources": {"CPU": 2, "GPU": 1},
                "node_config": {},
                "min_workers": 0,
                "max_workers": max_gpu_nodes,
            },
        },
        **{key: [] for key in ("cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands")},
        **{key: [] for key in ("setup_commands", "head_setup_commands", "worker_setup_commands")},
        **{key: [] for key in ("head_start_ray_commands", "worker_start_ray_commands")},
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
    }


def deploy_command(base: Path) -> list[str]:
    """deploy/rayjob.yaml's entrypoint (raycronjob.yaml's is the same; a test keeps them equal) with its bucket
    replaced by local folders and the image's path to the project by this checkout."""
    entrypoint = yaml.safe_load((REPO / "deploy" / "rayjob.yaml").read_text())["spec"]["entrypoint"]
    entrypoint = entrypoint.replace("s3://BUCKET", str(base)).replace("/home/ray/skyreels-batch", str(REPO))
    command = shlex.split(entrypoint)
    return [sys.executable, *command[1:]] if command[0] == "python" else command


def gpu_autoscaling(base: Path) -> dict:
    """Ray's fake autoscaler: a head with two CPUs and no GPU, GPU workers {CPU 2, GPU 1} from zero to two. Two jobs
    on it, each as its user runs it: the README's line with defaults only, then the shipped RayJob's entrypoint
    (its Hub checkpoint served from a mirror, SKYREELS_BATCH_MIRROR, holding the embedded model)."""
    gcs_port = free_port()
    config = base / "autoscaling.json"
    gcs_address = f"{ray.util.get_node_ip_address()}:{gcs_port}"
    config.write_text(json.dumps(fake_multinode_config(gcs_address, max_gpu_nodes=2)))
    env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    with ray_head(num_cpus=2, env=env, extra_args=(f"--autoscaling-config={config}",), gcs_port=gcs_port) as head:
        os.environ.update({**head.env, "RAY_ADDRESS": head.address})
        ray.init(log_to_driver=False)
        seen = {"nodes_at_start": len(alive_nodes()), "gpus_at_start": ray.cluster_resources().get("GPU", 0)}
        try:
            manifest = write_manifest(base / "manifest.parquet", AUTOSCALING_ROWS)
            output = base / "defaults"
            readme = [sys.executable, "jobs/render.py", str(manifest), "--output", str(output)]
            seen["defaults"] = run_command(readme, output)

            mirror = base / "hub"
            hub_id = "Skywork/SkyReels-V2-DF-1.3B-540P-Diffusers"
            export_embedded(card_for("tiny-df"), mirror / hub_id)
            (base / "manifests").mkdir()
            write_manifest(base / "manifests" / "2026-12-03.parquet", DEPLOY_ROWS)
            os.environ["SKYREELS_BATCH_MIRROR"] = str(mirror)
            command = deploy_command(base)
            seen["deploy"] = {"command": command, **run_command(command, base / "renders")}
        finally:
            ray.shutdown()  # before the head stops, or this process dies waiting for it and hides any error
    return seen


def kill_newest_render_actor() -> int:
    """SIGKILL the newest render actor process (Ray titles it after its stage) and wait until it is gone."""
    actors = [
        proc
        for proc in psutil.process_iter(["cmdline", "create_time"])
        if any("MapBatches(RenderVideos)" in part for part in proc.info["cmdline"] or [])
    ]
    newest = max(actors, key=lambda proc: proc.info["create_time"])
    os.kill(newest.pid, signal.SIGKILL)
    psutil.wait_procs([newest], timeout=10)
    return newest.pid


def run_in_process(base: Path, name: str, rows: list[dict], during=None, **config) -> dict:
    """A job through run_job in this process (the cluster stays up between jobs), with `during(output)` on a
    thread of its own while it runs."""
    output = base / name
    manifest = write_manifest(base / f"{name}.parquet", rows)
    watch = ClusterWatch(output)
    watch.start()
    helper = threading.Thread(target=during, args=(output,), daemon=True) if during else None
    if helper:
        helper.start()
    lines: list[str] = []
    summary = run_job(JobConfig(manifest=str(manifest), output=str(output), lossless=True, **config), log=lines.append)
    if helper:
        helper.join(timeout=30)
    return {**watch.stop(), "done": summary.done, "failed": summary.failed, "log": lines, "loads": model_loads(output)}


def gpu_cluster(base: Path) -> dict:
    """A `ray.cluster_utils.Cluster`: a head with two CPUs and no GPU, two nodes {CPU 2, GPU 1}. Jobs in turn, each
    on defaults but for what it tests: a GPU node lost mid-job (--workers 2); on the one GPU node left, a render
    actor killed mid-video while the second actor of a 1:2 pool waits to be placed; the door for --gpus-per-video 2
    with no two-GPU node; then, with a node {CPU 3, GPU 2} added, --gpus-per-video 2."""
    os.environ[SIMULATED_GPUS_ENV] = "1"
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0, "_system_config": FAST_HEALTH_CHECKS}
    )
    gpu_nodes = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address  # the state API's address too: other Rays may run on the machine
    ray.init(log_to_driver=False)
    seen: dict = {"gpu_node_ids": [node.node_id for node in gpu_nodes]}

    def remove_a_gpu_node(output: Path) -> None:
        # Both actors mid-video with segments persisted: whichever node goes, its video is still rendering.
        while (
            len(nodes := {actor.node_id for actor in render_actors()}) < 2
            or videos_in_progress(output, segments=range(2, 12)) < 2
        ):
            time.sleep(0.1)
        victim = next(node for node in gpu_nodes if node.node_id in nodes)
        seen["removed_node"] = victim.node_id
        cluster.remove_node(victim, allow_graceful=False)

    # Two render actors from the start (--workers 2), so that both are mid-video when a node goes.
    fixed_pool = {"min_workers": 2, "max_workers": 2}
    seen["node_lost"] = run_in_process(base, "node-lost", NODE_LOST_ROWS, remove_a_gpu_node, **fixed_pool)

    def kill_mid_video(output: Path) -> None:
        while len(list((output / "_segments" / "killed").glob("*.safetensors"))) < 10:
            time.sleep(0.05)
        seen["killed_pid"] = kill_newest_render_actor()

    # The note on actors waiting to be placed after a second instead of two minutes, reported every second.
    cluster_module.NOTICE_AFTER_S, progress.INTERVAL_S = 1.0, 1.0
    seen["actor_killed"] = run_in_process(base, "actor-killed", ACTOR_KILLED_ROWS, kill_mid_video, max_workers=2)

    started, errors = time.monotonic(), io.StringIO()
    door = [str(write_manifest(base / "door.parquet", GROUP_ROWS)), "--output", str(base / "door")]
    with contextlib.redirect_stderr(errors):
        code = main([*door, "--gpus-per-video", "2"])
    seen["door"] = {"exit": code, "seconds": time.monotonic() - started, "stderr": errors.getvalue()}
    seen["door"]["wrote"] = (base / "door").exists()

    cluster.add_node(num_cpus=3, num_gpus=2)
    cluster.wait_for_nodes()
    seen["group"] = run_in_process(base, "group", GROUP_ROWS, gpus_per_video=2)
    ray.shutdown()
    cluster.shutdown()
    return seen


if __name__ == "__main__":
    scenario, directory = sys.argv[1], Path(sys.argv[2])
    print(json.dumps({"gpu-autoscaling": gpu_autoscaling, "gpu-cluster": gpu_cluster}[scenario](directory)), flush=True)
