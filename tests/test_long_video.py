"""Long videos as chains of segment tasks, on the embedded model, through the real stages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from diffusers import SkyReelsV2DiffusionForcingPipeline, UniPCMultistepScheduler
from safetensors.torch import load_file

from skyreels_batch.models import card_for
from skyreels_batch.models.embedded import materialize
from skyreels_batch.output.video import to_uint8
from skyreels_batch.render.segments import SegmentStore
from skyreels_batch.stages.render import RenderVideos
from skyreels_batch.stages.validate import ValidateRows
from skyreels_batch.stages.write import WriteVideos
from tests.conftest import EncodeThenRender, noise_image, write_clip
from tests.conftest import decode as decode_mp4

CARD = card_for("tiny-df")
# 4 segments: windows of 9 latent frames continuing from 5 (37 frames, 17 of overlap).
LONG = {
    "id": "long",
    "prompt": "a train crossing a bridge",
    "num_frames": 97,
    "base_num_frames": 37,
    "overlap_history": 17,
    "height": 32,
    "width": 48,
    "seed": 5,
    "num_inference_steps": 3,
    "guidance_scale": 4.0,
    "shift": 6.0,
}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def pipeline() -> SkyReelsV2DiffusionForcingPipeline:
    pipe = SkyReelsV2DiffusionForcingPipeline.from_pretrained(materialize(CARD))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> RenderVideos:
    return EncodeThenRender(CARD, output=str(tmp_path_factory.mktemp("long")))


def render(stage: RenderVideos, row: dict, *, save_latents: bool = True) -> dict:
    SegmentStore(stage.output, row["id"]).remove()
    validated = ValidateRows(CARD, max_frames=1457, duplicate_ids=())(pa.Table.from_pylist([row]))
    writer = WriteVideos(output=stage.output, crf=18, lossless=True, save_latents=save_latents)
    result = writer(stage(validated)).to_pylist()[0]
    assert result["error"] is None, result["error"]
    return result


def diffusers_video(pipeline, row: dict, output_type: str = "latent") -> torch.Tensor | np.ndarray:
    """diffusers' own in-process long video, as its docs call it."""
    pipeline.scheduler = UniPCMultistepScheduler.from_config(pipeline.scheduler.config, flow_shift=row["shift"])
    return pipeline(
        prompt=row["prompt"],
        negative_prompt=CARD.defaults.negative_prompt,
        height=row["height"],
        width=row["width"],
        num_frames=row["num_frames"],
        base_num_frames=row["base_num_frames"],
        overlap_history=row["overlap_history"],
        num_inference_steps=row["num_inference_steps"],
        guidance_scale=row["guidance_scale"],
        ar_step=row.get("ar_step", 0),
        causal_block_size=row.get("causal_block_size"),
        generator=torch.Generator("cpu").manual_seed(row["seed"]),
        output_type=output_type,
    ).frames


def test_chained_latents_equal_diffusers_in_process_long_video(stage, pipeline) -> None:
    result = render(stage, LONG)
    assert result["num_segments"] == 4 and result["resumed_segments"] == 0
    chained = load_file(result["latents_uri"])["latents"]
    expected = diffusers_video(pipeline, LONG)
    assert chained.shape == expected.shape == (1, 16, 25, 4, 6)
    torch.testing.assert_close(chained, expected, rtol=1e-5, atol=1e-5)


def test_streamed_mp4_has_exactly_num_frames_and_matches_a_whole_video_decode(stage, pipeline) -> None:
    result = render(stage, LONG)
    frames, _ = decode_mp4(result["uri"])
    assert frames.shape == (97, 32, 48, 3)  # overlap frames appear once
    whole = to_uint8(diffusers_video(pipeline, LONG, output_type="np")[0])  # diffusers' whole-video decode
    seam_psnr = psnr(frames, whole)
    print(f"streamed decode vs whole-video decode: PSNR {seam_psnr} dB")
    assert seam_psnr > 40
    np.testing.assert_array_equal(frames, whole)  # the decoder's causal cache is carried: seams are exact
    assert not Path(stage.output, "_segments", "long").exists()


def test_addnoise_condition_draws_from_the_seeded_stream(stage) -> None:
    noisy = {**LONG, "id": "noisy", "addnoise_condition": 20.0}
    first = decode_mp4(render(stage, noisy, save_latents=False)["uri"])[0]
    torch.manual_seed(1234)  # diffusers would take this noise from the global RNG; we must not
    second = decode_mp4(render(stage, noisy, save_latents=False)["uri"])[0]
    plain = decode_mp4(render(stage, {**LONG, "id": "plain"}, save_latents=False)["uri"])[0]
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, plain)
    np.testing.assert_array_equal(first[:37], plain[:37])  # the first window has no overlap to noise


def test_prompt_travel_uses_prompt_k_for_segment_k_and_repeats_the_last(stage) -> None:
    base = decode_mp4(render(stage, {**LONG, "id": "one-prompt"}, save_latents=False)["uri"])[0]
    same = decode_mp4(
        render(stage, {**LONG, "id": "same", "segment_prompts": [LONG["prompt"]]}, save_latents=False)["uri"]
    )[0]
    travel = {**LONG, "id": "travel", "segment_prompts": [LONG["prompt"], "a ship at sea"]}
    travelled = decode_mp4(render(stage, travel, save_latents=False)["uri"])[0]
    np.testing.assert_array_equal(base, same)
    np.testing.assert_array_equal(travelled[:37], base[:37])  # segment 0: prompt 0
    assert not np.array_equal(travelled[37:], base[37:])  # segments 1-3: the last prompt, repeated


# SkyReels' own asynchronous setting (ar_step 5, causal_block_size 5): one window of 10 latent frames (two blocks),
# and a chain of two such windows, the second continuing from 5 (every window divides into blocks of 5).
ASYNC_ROWS = {
    "short": {**LONG, "id": "async-short", "num_frames": 37, "ar_step": 5, "causal_block_size": 5},
    "chained": {**LONG, "id": "async-chained", "num_frames": 57, "ar_step": 5, "causal_block_size": 5},
}


@pytest.mark.parametrize("length", ASYNC_ROWS)
def test_asynchronous_diffusion_forcing_renders_diffusers_latents_and_frames(stage, length: str) -> None:
    row = ASYNC_ROWS[length]
    result = render(stage, row)
    assert result["num_segments"] == (1 if length == "short" else 2)
    # A pipeline of its own: diffusers keeps a call's causal_block_size on the transformer it was given.
    pipe = SkyReelsV2DiffusionForcingPipeline.from_pretrained(materialize(CARD))
    pipe.set_progress_bar_config(disable=True)
    torch.testing.assert_close(
        load_file(result["latents_uri"])["latents"], diffusers_video(pipe, row), rtol=1e-5, atol=1e-5
    )
    frames, _ = decode_mp4(result["uri"])
    # diffusers attends through a dense mask, this job through flex attention's BlockMask: the same latents to float
    # tolerance, so a few pixels round the other way.
    difference = np.abs(frames.astype(int) - to_uint8(diffusers_video(pipe, row, output_type="np")[0]))
    assert difference.max() <= 1 and np.count_nonzero(difference) < 1e-3 * difference.size
    synchronous = decode_mp4(render(stage, {**row, "id": "sync", "ar_step": 0, "causal_block_size": 1})["uri"])[0]
    assert not np.array_equal(frames, synchronous)  # the asynchronous schedule really ran


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("inputs")
    return {
        "first": noise_image(folder / "first.png", 1),
        "last": noise_image(folder / "last.png", 3, size=(64, 64)),
        "clip": write_clip(folder / "clip.mp4", 5),
    }


# Every kind of chained video, each in four or three segments; input names are those of the `inputs` fixture.
CHAINS = {
    "t2v": {},
    "prompt-travel": {"segment_prompts": [LONG["prompt"], "a ship at sea"]},
    "i2v": {"mode": "i2v", "image": "first"},
    "flf2v": {"mode": "flf2v", "image": "first", "last_image": "last"},
    "v2v": {"mode": "v2v", "video": "clip", "num_frames": 60},
}


@pytest.mark.parametrize("kind", CHAINS)
def test_a_video_resumed_mid_chain_by_another_actor_is_identical(stage, inputs, tmp_path: Path, kind: str) -> None:
    named = {key: inputs[value] for key, value in CHAINS[kind].items() if key in ("image", "last_image", "video")}
    row = {**LONG, "id": kind, **CHAINS[kind], **named}
    uninterrupted = render(stage, row)
    assert uninterrupted["num_segments"] >= 3

    validated = ValidateRows(CARD, max_frames=1457, duplicate_ids=())(pa.Table.from_pylist([row]))
    EncodeThenRender(CARD, output=str(tmp_path))(validated)
    store = SegmentStore(str(tmp_path), kind)
    for index in range(2, uninterrupted["num_segments"]):  # as if the job died after two segments
        Path(store.state_uri(index)).unlink()
        Path(store.frames_uri(index)).unlink()
    resumed = EncodeThenRender(CARD, output=str(tmp_path))(validated).to_pylist()[0]  # a fresh actor
    assert resumed["resumed_segments"] == 2
    writer = WriteVideos(output=str(tmp_path), crf=18, lossless=True, save_latents=True)
    result = writer(pa.Table.from_pylist([resumed])).to_pylist()[0]
    assert Path(result["uri"]).read_bytes() == Path(uninterrupted["uri"]).read_bytes()
    torch.testing.assert_close(
        load_file(result["latents_uri"])["latents"], load_file(uninterrupted["latents_uri"])["latents"], rtol=0, atol=0
    )


def test_segments_of_a_changed_row_are_discarded_not_mixed_in(stage) -> None:
    row = {**LONG, "id": "changed"}
    validated = ValidateRows(CARD, max_frames=1457, duplicate_ids=())
    stage(validated(pa.Table.from_pylist([row])))
    again = stage(validated(pa.Table.from_pylist([{**row, "seed": 6}]))).to_pylist()[0]
    assert again["resumed_segments"] == 0
    done = stage(validated(pa.Table.from_pylist([{**row, "seed": 6}]))).to_pylist()[0]
    assert done["resumed_segments"] == 4
