"""One video over several ranks (--gpus-per-video): on CPU, two gloo processes render what one process renders."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import ray
from safetensors.torch import load_file

from skyreels_batch.config import JobConfig
from skyreels_batch.job.cluster import Capacity
from skyreels_batch.job.pipeline import run_job
from skyreels_batch.job.resources import plan_resources
from skyreels_batch.job.work import plan_job
from skyreels_batch.models import card_for
from skyreels_batch.models.embedded import materialize
from skyreels_batch.render.diffusion_forcing import check_heads
from skyreels_batch.schema import RowError, check_split, split_width
from tests.conftest import decode, noise_image, write_manifest

pytestmark = pytest.mark.slow

# 32x48: 6 transformer tokens a frame, split 3 and 3. Guidance on, so both branches cross the ranks.
BASE = {
    "prompt": "a lighthouse in a storm",
    "base_num_frames": 37,
    "overlap_history": 17,
    "height": 32,
    "width": 48,
    "num_inference_steps": 3,
    "guidance_scale": 4.0,
    "shift": 6.0,
}
ROWS = [
    {**BASE, "id": "sync", "num_frames": 37, "seed": 1},
    # SkyReels' asynchronous setting: causal blocks of 5 latent frames (the attention mask crosses the ranks).
    {**BASE, "id": "async", "num_frames": 57, "seed": 2, "ar_step": 5, "causal_block_size": 5},
    {**BASE, "id": "long", "num_frames": 97, "seed": 3},  # 4 segments chained by their overlap
]
LONG_SEGMENTS = 4


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sp")
    i2v = {**BASE, "id": "i2v", "num_frames": 37, "seed": 4, "mode": "i2v", "image": noise_image(folder / "i.png", 4)}
    return write_manifest(folder / "m.parquet", [*ROWS, i2v])


@pytest.fixture(scope="module")
def one_rank(ray_local: None, manifest: Path) -> Path:
    output = manifest.parent / "one"
    config = JobConfig(manifest=str(manifest), output=str(output), save_latents=True, lossless=True)
    summary = run_job(config, log=lambda _: None)
    assert (summary.done, summary.failed) == (4, 0)
    return output


@pytest.fixture(scope="module")
def two_ranks(ray_local: None, manifest: Path) -> Path:
    output = manifest.parent / "two"
    config = JobConfig(manifest=str(manifest), output=str(output), save_latents=True, lossless=True, gpus_per_video=2)
    summary = run_job(config, log=lambda _: None)
    assert (summary.done, summary.failed) == (4, 0)
    return output


@pytest.mark.parametrize("video_id", ["sync", "async", "long", "i2v"])
def test_two_ranks_render_the_latents_and_frames_of_one(one_rank: Path, two_ranks: Path, video_id: str) -> None:
    one = load_file(one_rank / "latents" / f"{video_id}.safetensors")["latents"]
    two = load_file(two_ranks / "latents" / f"{video_id}.safetensors")["latents"]
    assert one.shape == two.shape
    assert float((one - two).abs().max() / one.abs().max()) < 1e-5
    frames_one, _ = decode(one_rank / "videos" / f"{video_id}.mp4")
    frames_two, _ = decode(two_ranks / "videos" / f"{video_id}.mp4")
    assert frames_one.shape == frames_two.shape
    # Lossless MP4s hold the rendered frames exactly: float32 sums in another order move a pixel by one level at
    # most, and rarely (a lossy encoder would make more of it).
    difference = np.abs(frames_one.astype(np.int16) - frames_two.astype(np.int16))
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3


def test_the_index_and_the_cluster_after_a_two_rank_job(two_ranks: Path) -> None:
    index = pd.read_parquet(two_ranks / "results").set_index("id")
    assert sorted(index.index) == ["async", "i2v", "long", "sync"] and set(index.status) == {"done"}
    assert index.loc["long"].num_segments == LONG_SEGMENTS
    # Every render group's placement group was removed: no GPU (here, CPU) stays reserved after the job.
    groups = [info for info in ray.util.placement_group_table().values() if info["name"].startswith("render-")]
    assert groups and {info["state"] for info in groups} == {"REMOVED"}
    deadline = time.monotonic() + 30
    while proc_title("ray::OtherRank") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not proc_title("ray::OtherRank"), "a rank outlived its job"


def proc_title(title: str) -> list[psutil.Process]:
    return [
        proc
        for proc in psutil.process_iter(["cmdline", "create_time"])
        if any(part.startswith(title) for part in proc.info["cmdline"] or [])
    ]


def test_a_rank_killed_mid_video_is_a_lost_worker_and_the_video_resumes(
    ray_local: None, manifest: Path, two_ranks: Path, tmp_path: Path
) -> None:
    long_only = write_manifest(tmp_path / "m.parquet", [ROWS[2]])
    output = tmp_path / "out"
    segments = output / "_segments" / "long"
    killed: list[int] = []

    def kill_rank_one() -> None:
        while not (segments / "00001.safetensors").exists():
            time.sleep(0.01)
        rank = max(proc_title("ray::OtherRank"), key=lambda proc: proc.info["create_time"])
        os.kill(rank.pid, signal.SIGKILL)
        killed.append(rank.pid)

    threading.Thread(target=kill_rank_one, daemon=True).start()
    config = JobConfig(manifest=str(long_only), output=str(output), lossless=True, gpus_per_video=2)
    summary = run_job(config, log=lambda _: None)
    assert killed, "no rank was killed"
    assert (summary.done, summary.failed) == (1, 0)
    index = pd.read_parquet(output / "results").set_index("id")
    resumed = index.loc["long"].resumed_segments
    assert 2 <= resumed < LONG_SEGMENTS, resumed
    # Resumed from its persisted segments, it is the video the uninterrupted two-rank job made, bit for bit.
    assert (output / "videos" / "long.mp4").read_bytes() == (two_ranks / "videos" / "long.mp4").read_bytes()


def test_a_size_the_ranks_cannot_split_fails_its_row_at_the_door(tmp_path: Path) -> None:
    rows = [{**ROWS[0], "id": "odd", "height": 48, "width": 48}, ROWS[0]]  # 3 x 3 = 9 tokens a frame
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    config = JobConfig(manifest=str(manifest), output=str(tmp_path / "out"), gpus_per_video=2)
    lines = list(plan_job(config))
    assert "height/width: 48x48 makes 9 transformer tokens a frame" in lines[0]["error"]
    assert lines[1]["wall_cost"] == lines[1]["cost"] / 2 and lines[1]["gpus_per_video"] == 2
    assert lines[-1]["total"]["failed"] == 1 and lines[-1]["total"]["wall_cost"] == lines[1]["cost"] / 2


def test_split_checks_and_resources() -> None:
    check_split(544, 960, 8, "row 'x'")  # 34 x 60 tokens
    check_split(720, 1280, 8, "row 'x'")  # 45 x 80
    with pytest.raises(RowError, match="row 'x': height/width: 48x80 makes 15 transformer tokens"):
        check_split(48, 80, 2, "row 'x'")
    assert split_width(48, 80, 2) == 64 and split_width(32, 48, 2) == 48 and split_width(48, 16, 4) == 64
    tiny = card_for("tiny-df")
    from diffusers import SkyReelsV2Transformer3DModel

    transformer = SkyReelsV2Transformer3DModel.from_pretrained(materialize(tiny), subfolder="transformer")
    check_heads(transformer, 2)  # the embedded model has 2 heads
    with pytest.raises(ValueError, match="--gpus-per-video 4 does not divide the transformer's 2 attention heads"):
        check_heads(transformer, 4)
    cpu = plan_resources(JobConfig(manifest="m", gpus_per_video=2), Capacity(nodes=({"CPU": 2.0},)))
    assert (cpu.ranks, cpu.max_workers, cpu.torch_threads) == (2, 1, 1)
    assert cpu.render_num_cpus * cpu.ranks <= 0.75 * 2
    gpu = plan_resources(JobConfig(manifest="m", gpus_per_video=4), Capacity(nodes=({"CPU": 64.0, "GPU": 8.0},)))
    assert (gpu.ranks, gpu.max_workers, gpu.device) == (4, 2, "cuda")  # two groups of four on eight GPUs


def test_the_sweeper_removes_placement_groups_no_rank_uses_and_only_those(ray_local: None) -> None:
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from skyreels_batch.render.groups import PlacementSweeper

    used, left = (placement_group([{"CPU": 0.1}] * 2, name=f"render-sweep-{name}") for name in ("used", "left"))
    ray.get([used.ready(), left.ready()])

    @ray.remote(num_cpus=0.1)
    class Rank:
        def ping(self) -> int:
            return 1

    ranks = [Rank.options(scheduling_strategy=PlacementGroupSchedulingStrategy(used, i)).remote() for i in (0, 1)]
    assert ray.get([rank.ping.remote() for rank in ranks]) == [1, 1]
    sweeper = PlacementSweeper("render-sweep", grace_s=0.5)
    assert sweeper.sweep() == 0  # the unused one is only seen unused so far
    time.sleep(0.6)
    assert sweeper.sweep() == 1
    states = {info["name"]: info["state"] for info in ray.util.placement_group_table().values()}
    assert states["render-sweep-left"] == "REMOVED" and states["render-sweep-used"] == "CREATED"
    with sweeper:  # leaving it removes the rest: a pass has ended
        pass
    assert ray.util.placement_group_table(used)["state"] == "REMOVED"
