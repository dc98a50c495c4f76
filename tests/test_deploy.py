"""Deployment files: cluster.yaml against Ray's own schema, the runtime env, and the KubeRay manifests."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import jsonschema
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

from skyreels_batch.job.cli import build_parser
from tests.conftest import REPO

TORCH_PIN = "torch==2.13.0"  # the README's and .ci/run's pin


def load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


def test_cluster_yaml_is_a_valid_ray_cluster_launcher_config() -> None:
    config = load("cluster.yaml")
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # Ray's own checks after merging its AWS defaults
    assert config["provider"]["type"] == "aws"


def test_cluster_yaml_has_a_head_without_render_work_and_gpu_workers_that_scale_from_zero() -> None:
    config = load("cluster.yaml")
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"GPU": 0}
    workers = {name: spec for name, spec in types.items() if name != config["head_node_type"]}
    assert workers and all(spec["min_workers"] == 0 and spec["max_workers"] > 0 for spec in workers.values())
    assert all(spec["node_config"]["InstanceType"].startswith(("g", "p")) for spec in workers.values()), "GPU types"
    # The project goes to every node and is installed there, with the README's torch pin.
    mounted = next(path for path, source in config["file_mounts"].items() if source == ".")
    assert any(TORCH_PIN in command and f"-e {mounted}" in command for command in config["setup_commands"])


def test_runtime_env_file_is_a_valid_ray_runtime_env() -> None:
    runtime_env = RuntimeEnv(**load("deploy/runtime_env.yaml"))
    assert ".git/" in runtime_env["excludes"]
    assert all(isinstance(value, str) for value in runtime_env["env_vars"].values())


def test_kuberay_manifests_run_the_render_job_with_valid_flags_and_the_same_runtime_env() -> None:
    job = load("deploy/rayjob.yaml")
    cron = load("deploy/raycronjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert (cron["apiVersion"], cron["kind"]) == ("ray.io/v1", "RayCronJob")
    assert len(cron["spec"]["schedule"].split()) == 5
    assert cron["spec"]["jobTemplate"] == job["spec"], "the nightly job is the RayJob, scheduled"

    spec = job["spec"]
    command = shlex.split(spec["entrypoint"])
    assert command[:2] == ["python", "/home/ray/skyreels-batch/jobs/render.py"]
    args = build_parser().parse_args(command[2:])  # exits on a flag the CLI does not know
    assert args.manifest.endswith("/") and args.output.startswith("s3://")
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == load("deploy/runtime_env.yaml")

    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] and spec["shutdownAfterJobFinishes"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] > 0
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert cluster["rayVersion"] == ray.__version__


def test_the_image_installs_the_project_with_the_readmes_torch_pin() -> None:
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert f"rayproject/ray:{ray.__version__}-" in dockerfile
    assert TORCH_PIN in dockerfile and TORCH_PIN in (REPO / ".ci" / "run").read_text()


def test_ray_job_stop_waits_longer_than_the_jobs_clean_stop_on_every_head() -> None:
    """`ray job stop` SIGTERMs the driver and SIGKILLs it RAY_JOB_STOP_WAIT_TIME_S later (Ray's default: 3 s)."""
    grace = build_parser().get_default("stop_grace")
    head = load("deploy/rayjob.yaml")["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    env = {item["name"]: item["value"] for item in head["containers"][0]["env"]}
    assert float(env["RAY_JOB_STOP_WAIT_TIME_S"]) >= grace + 20
    assert head["terminationGracePeriodSeconds"] > float(env["RAY_JOB_STOP_WAIT_TIME_S"])
    (start,) = [command for command in load("cluster.yaml")["head_start_ray_commands"] if "ray start" in command]
    wait = float(start.split("RAY_JOB_STOP_WAIT_TIME_S=")[1].split(";")[0])
    assert wait >= grace + 20 and start.index("RAY_JOB_STOP_WAIT_TIME_S") < start.index("ray start")
