"""Step caches per row (the `cache` column): diffusers' own hooks, reset for every window, refused where they cannot
apply."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import torch
from diffusers import SkyReelsV2DiffusionForcingPipeline
from safetensors.torch import load_file

from skyreels_batch.job.cli import build_parser, job_config
from skyreels_batch.job.manifest import write_manifest
from skyreels_batch.job.work import plan_job
from skyreels_batch.models import card_for
from skyreels_batch.models.embedded import materialize
from skyreels_batch.render.diffusion_forcing import use_step_cache
from skyreels_batch.render.segments import SegmentStore
from skyreels_batch.render.timing import PassCounter
from skyreels_batch.schema import RowError, resolve
from skyreels_batch.stages.validate import ValidateRows
from skyreels_batch.stages.write import WriteVideos
from skyreels_batch.step_cache import parse_cache
from tests.conftest import EncodeThenRender, noise_image
from tests.test_long_video import LONG, diffusers_video, render

CARD = card_for("tiny-df")
# One window, 8 steps: enough for both caches to skip passes on the embedded model's random weights.
SHORT = {**LONG, "id": "short", "num_frames": 17, "base_num_frames": 17, "num_inference_steps": 8}
SKIPPING = ["first_block:0.2", "taylorseer:2"]


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> EncodeThenRender:
    return EncodeThenRender(CARD, output=str(tmp_path_factory.mktemp("step-cache")))


@pytest.fixture(scope="module")
def counter(stage) -> PassCounter:
    return PassCounter(stage.pipeline.transformer)


def latents(result: dict) -> torch.Tensor:
    return load_file(result["latents_uri"])["latents"]


@pytest.mark.parametrize(
    "spec, problem",
    [
        ("mag:0.1", "calibrated"),
        ("first_block:-0.1", ">= 0"),
        ("first_block:fast", "first_block:THRESHOLD"),
        ("taylorseer:0", "at least 1"),
        ("teacache:0.1", "first_block:THRESHOLD"),
    ],
)
def test_a_cache_the_project_cannot_apply_fails_its_row_naming_cache(spec: str, problem: str) -> None:
    with pytest.raises(RowError, match=rf"row 'x': cache: .*{problem}"):
        resolve({"id": "x", "prompt": "p", "cache": spec}, CARD, max_frames=97)
    rows = ValidateRows(CARD, max_frames=97)(pa.Table.from_pylist([{"id": "x", "prompt": "p", "cache": spec}]))
    assert "cache" in rows.column("error")[0].as_py()


def test_a_cache_with_a_split_video_is_refused_at_validation() -> None:
    row = {"id": "x", "prompt": "p", "cache": "first_block:0.1", "height": 32, "width": 64}
    error = ValidateRows(CARD, max_frames=97, ranks=2)(pa.Table.from_pylist([row])).column("error")[0].as_py()
    assert error.startswith("row 'x': cache: not with --gpus-per-video 2")


def test_a_cache_with_compiled_blocks_is_refused_at_validation(tmp_path: Path) -> None:
    """diffusers' hooks cannot run inside a block compiled with fullgraph (tried: FirstBlockCache fails on a hasattr,
    TaylorSeer on its torch.compiler.disable'd step count), so a job with --compile refuses cached rows."""
    rows = [{"id": "x", "prompt": "p", "cache": "first_block:0.1"}, {"id": "y", "prompt": "p"}]
    manifest = str(write_manifest(tmp_path / "m.parquet", rows))
    lines = {line.get("id"): line for line in plan_job(job_config(build_parser().parse_args([manifest, "--compile"])))}
    assert lines["x"]["error"].startswith("row 'x': cache: not with --compile") and "error" not in lines["y"]


def test_rows_without_a_cache_keep_their_request_json() -> None:
    plain = resolve({"id": "x", "prompt": "p"}, CARD, max_frames=97)
    assert "cache" not in plain.model_dump_json()  # so their request hash, and finished videos, stay as they were
    cached = resolve({"id": "x", "prompt": "p", "cache": "first_block:0.1"}, CARD, max_frames=97)
    assert cached.model_dump_json() != plain.model_dump_json()


@pytest.mark.parametrize("spec", SKIPPING)
def test_a_cached_row_equals_diffusers_pipeline_with_the_same_hook(stage, counter, spec: str) -> None:
    before = (counter.passes, counter.full)
    ours = latents(render(stage, {**SHORT, "id": "cached", "cache": spec}))
    passes, full = counter.passes - before[0], counter.full - before[1]
    assert passes == 16 and full < passes  # 8 steps, cond and uncond: the cache skipped some

    pipe = SkyReelsV2DiffusionForcingPipeline.from_pretrained(materialize(CARD))
    pipe.set_progress_bar_config(disable=True)
    use_step_cache(pipe.transformer, parse_cache(spec))
    reference = diffusers_video(pipe, SHORT)
    assert (ours - reference).abs().max() <= 1e-4 * reference.abs().max()
    assert not torch.equal(ours, latents(render(stage, {**SHORT, "id": "plain"})))  # the cache changed the result


def test_first_block_zero_equals_no_cache_exactly(stage, counter) -> None:
    plain = latents(render(stage, {**SHORT, "id": "plain"}))
    before = counter.full
    zero = latents(render(stage, {**SHORT, "id": "zero", "cache": "first_block:0"}))
    assert counter.full - before == 16
    assert torch.equal(zero, plain)


def test_each_row_gets_its_own_cache_or_none(stage) -> None:
    cached = latents(render(stage, {**SHORT, "id": "cached", "cache": "first_block:0.2"}))
    after_cached = latents(render(stage, {**SHORT, "id": "plain-after"}))  # the same actor, the hooks removed
    fresh = EncodeThenRender(CARD, output=stage.output)
    assert torch.equal(after_cached, latents(render(fresh, {**SHORT, "id": "plain-fresh"})))
    assert not torch.equal(cached, after_cached)


@pytest.mark.parametrize("spec", SKIPPING)
def test_a_cached_chain_resumed_mid_video_is_identical(stage, counter, tmp_path: Path, spec: str) -> None:
    """The hooks start every window afresh: a video resumed at segment 2 by a fresh actor renders what the
    uninterrupted one did. (Without the reset, TaylorSeer's step count and factors run on from the last window,
    which the resumed video's actor never saw: the taylorseer case fails.)"""
    row = {**LONG, "id": "chain", "num_inference_steps": 6, "cache": spec}
    before = (counter.passes, counter.full)
    uninterrupted = render(stage, row)
    assert counter.full - before[1] < counter.passes - before[0]

    validated = ValidateRows(CARD, max_frames=1457)(pa.Table.from_pylist([row]))
    EncodeThenRender(CARD, output=str(tmp_path))(validated)
    store = SegmentStore(str(tmp_path), "chain")
    for index in range(2, uninterrupted["num_segments"]):  # as if the job died after two segments
        Path(store.state_uri(index)).unlink()
        Path(store.frames_uri(index)).unlink()
    resumed = EncodeThenRender(CARD, output=str(tmp_path))(validated).to_pylist()[0]
    assert resumed["resumed_segments"] == 2
    writer = WriteVideos(output=str(tmp_path), crf=18, lossless=True, save_latents=True)
    result = writer(pa.Table.from_pylist([resumed])).to_pylist()[0]
    assert torch.equal(latents(result), latents(uninterrupted))
    assert Path(result["uri"]).read_bytes() == Path(uninterrupted["uri"]).read_bytes()


@pytest.mark.parametrize("model", ["tiny-t2v", "tiny-i2v"])
def test_plain_checkpoints_take_a_cache_through_their_pipeline_call(tmp_path: Path, model: str) -> None:
    card = card_for(model)
    stage = EncodeThenRender(card, output=str(tmp_path))
    counter = PassCounter(stage.pipeline.transformer)
    row = {"id": "plain", "prompt": "a harbour", "num_frames": 9, "height": 32, "width": 48, "num_inference_steps": 8}
    if model == "tiny-i2v":
        row |= {"mode": "i2v", "image": noise_image(tmp_path / "first.png", 1)}
    for cache in (None, "first_block:0.2"):
        validated = ValidateRows(card, max_frames=97)(pa.Table.from_pylist([{**row, "cache": cache}]))
        before = (counter.passes, counter.skipped)
        (result,) = stage(validated).to_pylist()
        assert result["error"] is None, result["error"]
        passes, skipped = counter.passes - before[0], counter.skipped - before[1]
        assert passes == 16 and (skipped > 0) == (cache is not None)
