"""What the cluster holds now and can become: `--device auto`, `--workers MIN:auto`, the door and the placement note,
from node types as each source gives them (an autoscaling config, Ray's own KubeRay converter on the shipped
RayJob, the cluster config in a real GCS)."""

from __future__ import annotations

import shlex
import time
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

from skyreels_batch.config import JobConfig, JobRefused
from skyreels_batch.job.cli import build_parser, job_config, main
from skyreels_batch.job.cluster import HEAD, Capacity, NodeType, node_types_of, read_capacity
from skyreels_batch.job.resources import check_placeable, check_ranks, plan_resources
from skyreels_batch.job.work import plan_job
from skyreels_batch.models import attention_heads, card_for
from skyreels_batch.models.embedded import export_embedded
from skyreels_batch.render.diffusion_forcing import takes_attention_mask
from tests.conftest import REPO, write_manifest

HEAD_NODE = {"CPU": 2.0, HEAD: 1.0, "memory": 8e9, "node:10.0.0.1": 1.0}
FAKE_GPU = NodeType("fake-gpu", {"CPU": 2, "GPU": 1}, 2)
SOURCE = "the autoscaler's config /tmp/fake.json"
# Ray's fake autoscaler as the cluster tests run it: a head without GPUs, GPU workers from zero to two.
FROM_ZERO = Capacity(nodes=(HEAD_NODE,), node_types=(FAKE_GPU,), max_worker_nodes=2, source=SOURCE)
NO_AUTOSCALER = Capacity(nodes=(HEAD_NODE,))


def plan(capacity: Capacity, rows: int | None = None, **config) -> object:
    return plan_resources(JobConfig(manifest="m", **config), capacity, rows=rows)


def test_auto_is_cuda_when_the_autoscaler_can_add_gpu_nodes_and_the_pool_is_what_they_can_hold() -> None:
    resources = plan(FROM_ZERO, rows=10)
    assert (resources.device, resources.torch_device) == ("cuda", "cuda")
    assert (resources.min_workers, resources.max_workers) == (1, 2)
    assert resources.decision == (
        f"cuda: the autoscaler can add 2 fake-gpu nodes with 1 GPU each ({SOURCE}); render actors 1-2"
    )
    # Once the autoscaler has added both, they count as its nodes, not as more: the pool is still two.
    gpu_node = {"CPU": 2.0, "GPU": 1.0, "memory": 4e9, "node:10.0.0.2": 1.0, "accelerator_type:A10G": 1.0}
    scaled = Capacity(nodes=(HEAD_NODE, gpu_node, gpu_node), node_types=(FAKE_GPU,), max_worker_nodes=2, source=SOURCE)
    assert scaled.addable() == [] and plan(scaled, rows=10).max_workers == 2
    assert plan(scaled).decision.startswith("cuda: 2 GPUs now; render actors 1-2")
    # One of two added: one more can come.
    half = Capacity(nodes=(HEAD_NODE, gpu_node), node_types=(FAKE_GPU,), max_worker_nodes=2, source=SOURCE)
    assert half.addable() == [(FAKE_GPU, 1)]
    assert plan(half).decision.startswith("cuda: 1 GPU now, and the autoscaler can add 1 fake-gpu node with 1 GPU")
    # No more render actors than rows, and the pool is the user's when given.
    assert plan(FROM_ZERO, rows=1).max_workers == 1
    assert plan(FROM_ZERO, rows=10, min_workers=1, max_workers=5).max_workers == 5
    # Simulated GPUs: placed as on GPUs, torch on the CPU with one thread.
    simulated = plan_resources(JobConfig(manifest="m"), FROM_ZERO, rows=10, simulated=True)
    assert (simulated.device, simulated.torch_device, simulated.render_num_gpus, simulated.torch_threads) == (
        "cuda",
        "cpu",
        0.8,
        1,
    )
    assert simulated.decision.endswith("(simulated GPUs: placed on Ray's GPUs, torch on the CPU)")


def test_auto_is_cpu_without_gpus_now_or_addable_and_says_why() -> None:
    assert plan(NO_AUTOSCALER).decision == "cpu: no GPU now, and no autoscaler node types found; render actors 1-1"
    cpu_only = Capacity(nodes=(HEAD_NODE,), node_types=(NodeType("cpu", {"CPU": 16}, 4),), source=SOURCE)
    assert plan(cpu_only).decision.startswith(f"cpu: no GPU now, and the autoscaler's node types offer none ({SOURCE})")
    # A source that exists but cannot be read (a RayCluster the service account may not read): nothing is refused.
    unknown = Capacity(nodes=(HEAD_NODE,), unreadable="the RayCluster resource: HTTPError: 403")
    assert plan(unknown).device == "cpu" and "--device cuda waits for GPU nodes" in plan(unknown).decision
    check_placeable(plan(unknown, device="cuda"), unknown)


def test_cluster_yaml_as_ray_up_bootstraps_it() -> None:
    """`ray up` fills each worker type's resources from its instance type before it writes the head's config."""
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    assert node_types_of(config) == ([], 200), "types whose resources are not declared are left out"
    filled = {"gpu-a10g": {"CPU": 8, "GPU": 1, "memory": 2.3e10}, "gpu-h100x8": {"CPU": 192, "GPU": 8, "memory": 1e12}}
    for name, resources in filled.items():
        config["available_node_types"][name]["resources"] = resources
    types, cap = node_types_of(config)
    capacity = Capacity(nodes=({"CPU": 8.0, "GPU": 0.0, HEAD: 1.0},), node_types=tuple(types), max_worker_nodes=cap)
    # Within 200 worker nodes: the 25 8-GPU nodes first, then 175 one-GPU nodes.
    assert capacity.most_workers(1) == 25 * 8 + 175
    assert capacity.most_workers(2) == 25 * 4 and capacity.most_workers(8) == 25
    resources = plan(capacity, rows=100_000)
    assert (resources.device, resources.max_workers) == ("cuda", 375)
    assert "the autoscaler can add 200 gpu-a10g nodes with 1 GPU each and 25 gpu-h100x8 nodes with 8 GPUs each" in (
        resources.decision
    )
    check_placeable(plan(capacity, gpus_per_video=8), capacity)


def test_the_shipped_kuberay_jobs_render_on_the_gpu_group_through_rays_own_converter() -> None:
    job = yaml.safe_load((REPO / "deploy" / "rayjob.yaml").read_text())
    ray_cluster = {"metadata": {"name": "skyreels", "namespace": "default"}, "spec": job["spec"]["rayClusterSpec"]}
    types, cap = node_types_of(_derive_autoscaling_config_from_ray_cr(ray_cluster))
    assert [(node_type.name, node_type.gpus, node_type.max_count) for node_type in types] == [("gpu", 1, 64)]
    head = {"CPU": 4.0, "GPU": 0.0, HEAD: 1.0}
    capacity = Capacity(nodes=(head,), node_types=tuple(types), max_worker_nodes=cap, source="RayCluster default/x")
    config = job_config(build_parser().parse_args(shlex.split(job["spec"]["entrypoint"])[2:]))
    resources = plan_resources(config, capacity, rows=1000)
    assert (resources.device, resources.min_workers, resources.max_workers) == ("cuda", 1, 64)
    check_placeable(resources, capacity)
    assert plan(capacity, rows=1000).max_workers == 64, "--workers 1:auto: one per GPU the group can have"


def test_the_door_refuses_what_no_node_can_ever_hold() -> None:
    with pytest.raises(JobRefused, match=r"cannot be placed on cuda: a render actor asks for \{CPU: 1, GPU: 0.8\}"):
        check_placeable(plan(NO_AUTOSCALER, device="cuda"), NO_AUTOSCALER)
    two_gpu_nodes = Capacity(nodes=(HEAD_NODE,), node_types=(NodeType("a100x2", {"CPU": 8, "GPU": 2}, 3),))
    check_placeable(plan(two_gpu_nodes, gpus_per_video=2), two_gpu_nodes)
    assert plan(two_gpu_nodes, rows=9, gpus_per_video=2).max_workers == 3
    with pytest.raises(JobRefused, match=r"a render group \(--gpus-per-video 4\) asks for 4 x \{CPU: 1, GPU: 0.8\}"):
        check_placeable(plan(two_gpu_nodes, gpus_per_video=4), two_gpu_nodes)
    # A node there now counts as much as one that can be added.
    eight = Capacity(nodes=(HEAD_NODE, {"CPU": 64.0, "GPU": 8.0}))
    check_placeable(plan(eight, gpus_per_video=4), eight)
    with pytest.raises(JobRefused, match=r"a render actor asks for \{CPU: 0.75, render: 1\}"):
        check_placeable(plan(NO_AUTOSCALER, render_resources={"render": 1}), NO_AUTOSCALER)
    offered = Capacity(nodes=(HEAD_NODE,), node_types=(NodeType("render", {"CPU": 4, "render": 1}, None),))
    check_placeable(plan(offered, render_resources={"render": 1}), offered)
    # A fraction of a GPU takes its share of one GPU: 0.8 of a GPU each, eight fit on eight GPUs, not ten.
    assert eight.holds({"CPU": 1, "GPU": 0.8}, 8) and not eight.holds({"CPU": 1, "GPU": 0.8}, 9)


def test_the_door_reads_the_transformers_heads_for_gpus_per_video(tmp_path: Path) -> None:
    tiny = card_for("tiny-df")
    assert attention_heads(tiny) == 2
    check_ranks(tiny, 2)
    with pytest.raises(JobRefused, match="--gpus-per-video 4 does not divide tiny-df's 2 attention heads"):
        check_ranks(tiny, 4)
    exported = card_for(str(export_embedded(tiny, tmp_path / "tiny")))  # read from transformer/config.json
    assert exported.embedded is None and attention_heads(exported) == 2
    with pytest.raises(JobRefused, match="does not divide"):
        check_ranks(exported, 8)


def test_a_backend_without_masks_fails_the_asynchronous_rows_of_split_videos_only(tmp_path: Path) -> None:
    """One rank attends through flex attention's BlockMask whatever the backend; ranks of a split video attend through
    the dense mask, which flash does not take."""
    assert [takes_attention_mask(name) for name in ("flash", "_flash_3", "sage")] == [False] * 3
    assert [takes_attention_mask(name) for name in ("native", "_native_math", "flex")] == [True] * 3
    size = {"height": 32, "width": 48}
    rows = [
        {"id": "sync", "prompt": "a harbour", "num_frames": 37, "base_num_frames": 37, **size},
        {"id": "async", "prompt": "a harbour", "num_frames": 37, "ar_step": 5, "causal_block_size": 5, **size},
    ]
    manifest = str(write_manifest(tmp_path / "m.parquet", rows))
    one_rank = job_config(build_parser().parse_args([manifest, "--attention-backend", "flash"]))
    assert all("error" not in line for line in plan_job(one_rank))
    split = job_config(build_parser().parse_args([manifest, "--attention-backend", "flash", "--gpus-per-video", "2"]))
    lines = {line.get("id"): line for line in plan_job(split)}
    assert "error" not in lines["sync"]
    assert lines["async"]["error"] == (
        "row 'async': causal_block_size: 5 with --gpus-per-video 2 makes the transformer attend with a dense mask "
        "(flex attention's BlockMask has no context parallelism), which --attention-backend flash does not take; use "
        "causal_block_size 1, or a backend that takes a mask (native, ...)"
    )
    native = job_config(build_parser().parse_args([manifest, "--attention-backend", "native", "--gpus-per-video", "2"]))
    assert all("error" not in line for line in plan_job(native))


def run_at_the_door(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str], float]:
    started = time.monotonic()
    code = main(args)
    return code, capsys.readouterr().err.splitlines(), time.monotonic() - started


def test_jobs_that_can_never_run_exit_2_at_the_door_with_one_line(
    ray_local: None, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """On the session's Ray (two CPUs, no GPU, no autoscaler): each refusal is one line on stderr, no traceback,
    nothing written, and no waiting (a job waiting for a GPU that never comes used to wait silently forever)."""
    manifest = str(write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "a harbour"}]))
    output = tmp_path / "out"
    for flags, message in (
        (["--device", "cuda"], "error: the job cannot be placed on cuda: a render actor asks for {CPU: 1, GPU: 0.8}"),
        (["--gpus-per-video", "4"], "error: --gpus-per-video 4 does not divide tiny-df's 2 attention heads"),
        (["--render-resource", "nowhere=1"], "error: the job cannot be placed on cpu: a render actor asks for"),
    ):
        code, errors, seconds = run_at_the_door([manifest, "--output", str(output), *flags], capsys)
        assert (code, len(errors)) == (2, 1), errors
        assert errors[0].startswith(message), errors[0]
        assert "no autoscaler node types found" in errors[0] or "attention heads" in errors[0]
        assert not output.exists() and seconds < 60


def test_node_types_are_read_from_the_gcs_cluster_config_as_ray_data_reads_them(ray_local: None) -> None:
    import ray
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    gcs = GcsClient(address=ray.get_runtime_context().gcs_address)
    assert read_capacity().node_types == () and read_capacity().source is None
    config = autoscaler_pb2.ClusterConfig(
        node_group_configs=[
            autoscaler_pb2.NodeGroupConfig(name="gpu-l4", resources={"CPU": 8, "GPU": 1}, max_count=3),
            autoscaler_pb2.NodeGroupConfig(name="disabled", resources={"CPU": 8, "GPU": 8}, max_count=0),
        ]
    )
    gcs.report_cluster_config(config.SerializeToString())
    try:
        capacity = read_capacity()
    finally:
        gcs.report_cluster_config(b"")  # as the session's Ray started: no cluster config
    assert capacity.source == "the cluster config in the GCS"
    assert capacity.node_types == (NodeType("gpu-l4", {"CPU": 8, "GPU": 1}, 3),)
    assert plan(capacity, rows=10).decision.startswith("cuda: the autoscaler can add 3 gpu-l4 nodes with 1 GPU each")
    assert read_capacity().node_types == ()
