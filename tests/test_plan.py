"""The segment plan: a pure function, checked against the arithmetic diffusers actually performs."""

from __future__ import annotations

import pytest
import torch
from diffusers import SkyReelsV2DiffusionForcingPipeline

from skyreels_batch.models import card_for
from skyreels_batch.models.embedded import materialize
from skyreels_batch.plan import denoising_iterations, plan_video


@pytest.mark.parametrize(("num_frames", "segments"), [(257, 3), (377, 5), (737, 9), (1457, 18)])
def test_recommended_lengths_give_the_documented_segment_counts(num_frames: int, segments: int) -> None:
    plan = plan_video(
        num_frames=num_frames, base_num_frames=97, overlap_history=17, num_inference_steps=30, guidance_scale=6.0
    )
    assert len(plan.segments) == segments
    assert sum(segment.new_frames for segment in plan.segments) == num_frames  # overlaps appear once
    assert plan.segments[0].latent_start == 0 and plan.segments[-1].latent_end == (num_frames - 1) // 4 + 1
    for before, after in zip(plan.segments, plan.segments[1:], strict=False):
        assert after.latent_start == before.latent_end - 5  # 17 frames of overlap = 5 latent frames
        assert after.overlap == 5 and before.length == 25
    assert plan.cost == segments * 30 * 2  # synchronous: 30 iterations a window, twice with guidance


def test_short_video_is_one_window_and_guidance_off_halves_the_cost() -> None:
    plan = plan_video(num_frames=97, base_num_frames=97, overlap_history=17, num_inference_steps=30, guidance_scale=1.0)
    assert [(s.latent_start, s.latent_end, s.new_frames) for s in plan.segments] == [(0, 25, 97)]
    assert plan.cost == 30


def test_overlap_must_be_shorter_than_the_window() -> None:
    with pytest.raises(ValueError, match="overlap_history"):
        plan_video(num_frames=201, base_num_frames=17, overlap_history=17, num_inference_steps=2, guidance_scale=1.0)


def test_the_pass_count_is_the_length_of_diffusers_timestep_matrix() -> None:
    """plan.py counts the rows of diffusers' `generate_timestep_matrix` in closed form; here is diffusers' loop."""
    checked = 0
    for steps in (1, 2, 3, 5, 8):
        template = torch.arange(steps, 0, -1) * (1000 // steps)
        for frames in range(1, 14):
            for block in (1, 2, 3, 5):
                for ar_step in (0, 1, 2, 3, 7, 10):
                    for ready in range(frames + 1):
                        try:
                            matrix, *_ = SkyReelsV2DiffusionForcingPipeline.generate_timestep_matrix(
                                None, frames, template, frames, ar_step, ready, block
                            )
                        except RuntimeError:  # every block ready: diffusers stacks an empty list of rows
                            matrix = []
                        counted = denoising_iterations(
                            num_latent_frames=frames,
                            num_inference_steps=steps,
                            ar_step=ar_step,
                            num_pre_ready=ready,
                            causal_block_size=block,
                        )
                        assert counted == len(matrix), (steps, frames, block, ar_step, ready)
                        checked += 1
    assert checked > 10_000


def test_cached_plans_are_the_plans_computed_afresh() -> None:
    cases = [
        dict(num_frames=257, base_num_frames=97, overlap_history=17, num_inference_steps=30, guidance_scale=6.0),
        dict(
            num_frames=77,
            base_num_frames=37,
            overlap_history=17,
            num_inference_steps=4,
            guidance_scale=1.0,
            ar_step=2,
            causal_block_size=5,
        ),
        dict(
            num_frames=96,
            base_num_frames=37,
            overlap_history=17,
            num_inference_steps=3,
            guidance_scale=5.0,
            continues_clip=True,
        ),
        dict(
            num_frames=121,
            base_num_frames=41,
            overlap_history=9,
            num_inference_steps=3,
            guidance_scale=5.0,
            first_frame=True,
            last_frame=True,
        ),
    ]
    for case in cases:
        cached = plan_video(**case)
        assert plan_video(**case) is cached, "a second request is served from the cache"
        assert plan_video.__wrapped__(**case) == cached


@pytest.fixture(scope="module")
def pipeline() -> SkyReelsV2DiffusionForcingPipeline:
    pipe = SkyReelsV2DiffusionForcingPipeline.from_pretrained(materialize(card_for("tiny-df")))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(
    "case",
    [
        dict(num_frames=57, base_num_frames=17, overlap_history=5, ar_step=0, causal_block_size=1),
        dict(num_frames=77, base_num_frames=37, overlap_history=17, ar_step=0, causal_block_size=1),
        dict(num_frames=77, base_num_frames=37, overlap_history=17, ar_step=2, causal_block_size=5),
        dict(num_frames=33, base_num_frames=97, overlap_history=17, ar_step=1, causal_block_size=3),
    ],
)
def test_plan_matches_the_windows_and_transformer_passes_diffusers_makes(pipeline, case: dict) -> None:
    windows: list[int] = []
    passes = 0
    original_prepare = pipeline.prepare_latents

    def recording_prepare(*args, **kwargs):
        result = original_prepare(*args, **kwargs)
        windows.append(result[1])
        return result

    def count_pass(module, inputs, output):
        nonlocal passes
        passes += 1

    hook = pipeline.transformer.register_forward_hook(count_pass)
    pipeline.prepare_latents = recording_prepare
    try:
        pipeline(
            "a test",
            height=16,
            width=16,
            num_inference_steps=3,
            guidance_scale=5.0,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            **case,
        )
    finally:
        hook.remove()
        del pipeline.prepare_latents
        pipeline.transformer._set_ar_attention(1)

    plan = plan_video(num_inference_steps=3, guidance_scale=5.0, **case)
    assert [segment.length for segment in plan.segments] == windows
    assert plan.cost == passes


def test_dry_run_prints_one_plan_per_video_and_the_totals(tmp_path) -> None:
    import json
    import subprocess
    import sys

    from tests.conftest import REPO, write_manifest

    manifest = write_manifest(
        tmp_path / "m.parquet",
        [
            {"id": "long", "prompt": "p", "num_frames": 257, "num_inference_steps": 30},
            {"id": "short", "prompt": "p", "num_frames": 17, "num_inference_steps": 30, "guidance_scale": 1.0},
            {"id": "bad", "prompt": "p", "num_frames": 18},
        ],
    )
    result = subprocess.run(
        [sys.executable, "jobs/render.py", str(manifest), "--dry-run", "--output", str(tmp_path / "out")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1  # one row is invalid
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    long, short, bad, total = lines
    assert long["id"] == "long" and len(long["segments"]) == 3 and long["cost"] == 3 * 30 * 2
    assert long["segments"][1] == {"index": 1, "latent_start": 20, "latent_end": 45, "new_frames": 80}
    assert short["segments"] == [{"index": 0, "latent_start": 0, "latent_end": 5, "new_frames": 17}]
    assert short["cost"] == 30
    assert bad["id"] == "bad" and "num_frames" in bad["error"]
    assert total == {"total": {"videos": 2, "segments": 4, "cost": 210, "failed": 1}}
    assert not (tmp_path / "out").exists(), "a dry run writes nothing"
