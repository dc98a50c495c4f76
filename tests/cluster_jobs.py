"""Render jobs on throwaway multi-node Ray clusters, each run as `python -m tests.cluster_jobs SCENARIO DIR` in its
own process (the test session holds its own Ray). Prints one JSON line of what it saw.

The child is given its own RAY_TMPDIR by the test, so its sessions and its "current cluster" address file never
touch another Ray on the machine; it stops only the processes it started."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from skyreels_batch.config import JobConfig
from skyreels_batch.pipeline import run_job
from tests.conftest import write_manifest
from tests.ray_head import free_port, ray_head

# Dead nodes are noticed in ~2 s instead of Ray's default ~30 s.
FAST_HEALTH_CHECKS = {
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 4,
    "health_check_initial_delay_ms": 0,
}
NODE_REMOVAL_ROWS = [
    {
        "id": f"take-{seed}",
        "prompt": "a drone flight along a coast",
        "num_frames": 241,
        "base_num_frames": 17,
        "overlap_history": 5,
        "height": 32,
        "width": 32,
        "seed": seed,
        "num_inference_steps": 3,
    }
    for seed in range(3)
]


def render_actors() -> list:
    actors = list_actors(filters=[("state", "=", "ALIVE")], detail=True)
    return [actor for actor in actors if "RenderVideos" in (actor.class_name or "")]


def render_actor_nodes() -> set[str]:
    return {actor.node_id for actor in render_actors()}


def videos_in_progress(output: Path, *, segments: range) -> int:
    folders = output.glob("_segments/*")
    return sum(len(list(folder.glob("*.safetensors"))) in segments for folder in folders)


def node_removal(base: Path) -> dict:
    """Two render nodes (custom resource `render`) and a head that takes no render work; once segments are being
    written, one render node is killed without warning, as a preempted instance is."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": FAST_HEALTH_CHECKS})
    workers = [cluster.add_node(num_cpus=1, resources={"render": 1}) for _ in range(2)]
    os.environ["RAY_ADDRESS"] = cluster.address  # the state API's address too: other Rays may run on the machine
    ray.init(log_to_driver=False)
    output = base / "out"
    seen: dict = {}

    def remove_a_render_node() -> None:
        # Both actors mid-video (20 segments each) with segments persisted: whichever node goes, its video is
        # still rendering and has some to resume.
        while len(hosts := render_actor_nodes()) < 2 or videos_in_progress(output, segments=range(2, 17)) < 2:
            time.sleep(0.1)
        victim = next(node for node in workers if node.node_id in hosts)
        seen["render_nodes_before"] = len(hosts)
        cluster.remove_node(victim, allow_graceful=False)
        seen["removed_at_segments"] = len(list(output.glob("_segments/*/*.safetensors")))

    remover = threading.Thread(target=remove_a_render_node, daemon=True)
    remover.start()
    lines: list[str] = []
    manifest = write_manifest(base / "manifest.parquet", NODE_REMOVAL_ROWS)
    config = JobConfig(
        manifest=str(manifest),
        output=str(output),
        min_workers=2,
        max_workers=2,
        lossless=True,
        render_resources={"render": 1},
    )
    summary = run_job(config, log=lines.append)
    remover.join(timeout=1)
    seen["alive_nodes_after"] = sum(node["Alive"] for node in ray.nodes())
    ray.shutdown()
    cluster.shutdown()
    return {**seen, "done": summary.done, "failed": summary.failed, "log": lines}


AUTOSCALING_ROWS = [{**NODE_REMOVAL_ROWS[0], "id": f"auto-{seed}", "seed": seed} for seed in range(10)]


def fake_multinode_config(gcs_address: str, max_render_nodes: int) -> dict:
    """An autoscaling config for Ray's fake multi-node provider: worker nodes are local raylets with logical GPUs
    (and a `render` resource), started and stopped by the head's autoscaler. Complete, because the monitor reads
    it as is and Ray's wheel does not ship the provider's defaults file."""
    return {
        "cluster_name": "fake-skyreels",
        "max_workers": max_render_nodes,
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
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "fake-gpu": {
                "resources": {"CPU": 1, "GPU": 1, "render": 1},
                "node_config": {},
                "min_workers": 0,
                "max_workers": max_render_nodes,
            },
        },
        **{key: [] for key in ("cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands")},
        **{key: [] for key in ("setup_commands", "head_setup_commands", "worker_setup_commands")},
        **{key: [] for key in ("head_start_ray_commands", "worker_start_ray_commands")},
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
    }


def autoscaling(base: Path) -> dict:
    """A head with no render nodes; the render pool (--workers 1:2 on the `render` resource) makes the autoscaler
    add fake GPU nodes, and grows as they arrive."""
    gcs_port = free_port()
    config = base / "autoscaling.json"
    gcs_address = f"{ray.util.get_node_ip_address()}:{gcs_port}"
    config.write_text(json.dumps(fake_multinode_config(gcs_address, max_render_nodes=2)))
    env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    with ray_head(num_cpus=1, env=env, extra_args=(f"--autoscaling-config={config}",), gcs_port=gcs_port) as head:
        os.environ.update({**head.env, "RAY_ADDRESS": head.address})
        ray.init(log_to_driver=False)
        seen = {"nodes_at_start": len(alive_nodes()), "gpus_at_start": ray.cluster_resources().get("GPU", 0)}
        samples: list[tuple[int, int]] = []
        finished = threading.Event()

        def watch() -> None:
            while not finished.wait(0.5):
                samples.append((len(alive_nodes()), len(render_actors())))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        lines: list[str] = []
        manifest = write_manifest(base / "manifest.parquet", AUTOSCALING_ROWS)
        job = JobConfig(
            manifest=str(manifest),
            output=str(base / "out"),
            min_workers=1,
            max_workers=2,
            device="cpu",
            render_resources={"render": 1},
        )
        try:
            summary = run_job(job, log=lines.append)
        finally:
            finished.set()
            watcher.join()
            ray.shutdown()  # before the head stops, or this process dies waiting for it and hides any error
    return {
        **seen,
        "max_nodes": max(nodes for nodes, _ in samples),
        "max_render_actors": max(actors for _, actors in samples),
        "done": summary.done,
        "failed": summary.failed,
        "log": lines,
    }


def alive_nodes() -> list[dict]:
    return [node for node in ray.nodes() if node["Alive"]]


if __name__ == "__main__":
    scenario, directory = sys.argv[1], Path(sys.argv[2])
    print(json.dumps({"node-removal": node_removal, "autoscaling": autoscaling}[scenario](directory)), flush=True)
