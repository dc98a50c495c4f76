"""Model families and modes on the embedded models, through the real stages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from diffusers import (
    SkyReelsV2DiffusionForcingImageToVideoPipeline,
    SkyReelsV2DiffusionForcingVideoToVideoPipeline,
    SkyReelsV2ImageToVideoPipeline,
    SkyReelsV2Pipeline,
    UniPCMultistepScheduler,
)
from PIL import Image
from safetensors.torch import load_file

from skyreels_batch.models import ModelCard, card_for
from skyreels_batch.models.embedded import materialize
from skyreels_batch.output.video import to_uint8
from skyreels_batch.render.inputs import crop_to_aspect
from skyreels_batch.render.segments import SegmentStore
from skyreels_batch.schema import RenderParams
from skyreels_batch.stages.render import RenderVideos
from skyreels_batch.stages.validate import ValidateRows
from skyreels_batch.stages.write import WriteVideos
from tests.conftest import EncodeThenRender, decode, noise_image, write_clip

ROW = {
    "id": "clip",
    "prompt": "a windmill on a hill",
    "num_frames": 9,
    "height": 32,
    "width": 48,
    "seed": 21,
    "num_inference_steps": 3,
    "guidance_scale": 4.0,
    "shift": 7.0,
}


def render(stage: RenderVideos, card: ModelCard, row: dict) -> np.ndarray:
    """The row through validate -> render -> write (lossless), decoded back."""
    SegmentStore(stage.output, row["id"]).remove()
    validated = ValidateRows(card, max_frames=1457, duplicate_ids=())(pa.Table.from_pylist([row]))
    result = WriteVideos(output=stage.output, crf=0, lossless=True)(stage(validated)).to_pylist()[0]
    assert result["error"] is None, result["error"]
    return decode(result["uri"])[0]


@pytest.fixture(scope="module")
def df_stage(tmp_path_factory: pytest.TempPathFactory) -> RenderVideos:
    return EncodeThenRender(card_for("tiny-df"), output=str(tmp_path_factory.mktemp("df")))


def test_plain_t2v_checkpoints_render_exactly_what_skyreels_v2_pipeline_returns(tmp_path: Path) -> None:
    card = card_for("tiny-t2v")
    stage = EncodeThenRender(card, output=str(tmp_path))
    assert type(stage.pipeline).__name__ == "SkyReelsV2Pipeline"
    frames = render(stage, card, ROW)

    pipe = SkyReelsV2Pipeline.from_pretrained(materialize(card))
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=7.0)
    expected = pipe(
        prompt=ROW["prompt"],
        negative_prompt="",
        height=32,
        width=48,
        num_frames=9,
        num_inference_steps=3,
        guidance_scale=4.0,
        generator=torch.Generator("cpu").manual_seed(21),
    ).frames[0]
    np.testing.assert_array_equal(frames, to_uint8(expected))


def test_long_rows_are_refused_for_plain_t2v_checkpoints() -> None:
    validated = ValidateRows(card_for("tiny-t2v"), max_frames=1457, duplicate_ids=())(
        pa.Table.from_pylist([{**ROW, "num_frames": 201}])
    ).to_pylist()[0]
    assert "diffusion-forcing" in validated["error"]


def test_a_sync_row_after_an_async_row_renders_exactly_as_it_does_alone(df_stage, tmp_path: Path) -> None:
    long_row = {**ROW, "num_frames": 57, "base_num_frames": 37, "overlap_history": 17}
    alone = render(
        EncodeThenRender(card_for("tiny-df"), output=str(tmp_path)),
        card_for("tiny-df"),
        long_row,
    )
    async_row = {**long_row, "id": "async", "ar_step": 2, "causal_block_size": 5}
    async_frames = render(df_stage, card_for("tiny-df"), async_row)
    after = render(df_stage, card_for("tiny-df"), long_row)
    assert not np.array_equal(async_frames, alone)  # the async mode really ran
    np.testing.assert_array_equal(after, alone)
    assert df_stage.pipeline.transformer.config.num_frame_per_block == 1


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("images")
    return {
        "first": noise_image(folder / "first.png", 1),
        "other": noise_image(folder / "other.png", 2),
        "last": noise_image(folder / "last.png", 3, size=(64, 64)),
        "wide": noise_image(folder / "wide.png", 4, size=(200, 100)),
    }


def with_text_encoder(stage: EncodeThenRender) -> dict:
    """The text-encoding stage's components, to make the render actor's pipeline whole again for diffusers."""
    return {"text_encoder": stage.encode.pipeline.text_encoder, "tokenizer": stage.encode.pipeline.tokenizer}


def diffusers_image_to_video(stage: EncodeThenRender, row: dict, **extra) -> torch.Tensor | np.ndarray:
    """diffusers' own SkyReelsV2DiffusionForcingImageToVideoPipeline, sharing the stages' loaded components."""
    pipe = SkyReelsV2DiffusionForcingImageToVideoPipeline.from_pipe(stage.pipeline, **with_text_encoder(stage))
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=row["shift"])
    kwargs = {k: row[k] for k in ("prompt", "height", "width", "num_frames", "num_inference_steps", "guidance_scale")}
    return pipe(
        **kwargs,
        **extra,
        negative_prompt="",
        generator=torch.Generator("cpu").manual_seed(row["seed"]),
    ).frames


def test_i2v_renders_exactly_what_diffusers_image_to_video_returns(df_stage, images) -> None:
    row = {**ROW, "id": "i2v", "mode": "i2v", "image": images["first"]}
    frames = render(df_stage, card_for("tiny-df"), row)
    expected = diffusers_image_to_video(df_stage, row, image=Image.open(images["first"]).convert("RGB"))[0]
    np.testing.assert_array_equal(frames, to_uint8(expected))


def test_flf2v_renders_exactly_what_diffusers_returns_with_a_last_image(df_stage, images) -> None:
    row = {**ROW, "id": "flf2v", "mode": "flf2v", "image": images["first"], "last_image": images["last"]}
    frames = render(df_stage, card_for("tiny-df"), row)
    # The last image (64x64) fitted to the video's 32x48 as SkyReels-V2's own inference code does (`resizecrop`):
    # the whole width and the centred int(64 * 32 / 48) = 42 rows, 11 to 53; the pipeline resizes that. (The
    # diffusers docs' example means the same but passes [width, height] to torchvision's center_crop as
    # [height, width] and never resizes.)
    last = Image.open(images["last"]).convert("RGB").crop((0, 11, 64, 53))
    expected = diffusers_image_to_video(
        df_stage, row, image=Image.open(images["first"]).convert("RGB"), last_image=last
    )[0]
    assert frames.shape == (9, 32, 48, 3)
    np.testing.assert_array_equal(frames, to_uint8(expected))


def test_a_last_image_is_cropped_to_the_videos_aspect_ratio_around_its_centre(images) -> None:
    wide = Image.open(images["wide"])  # 200x100 into 32x48: the whole height, the centred 150 columns
    np.testing.assert_array_equal(np.asarray(crop_to_aspect(wide, 32, 48)), np.asarray(wide)[:, 25:175])
    square = Image.open(images["last"])  # 64x64 into 32x48: the whole width, rows 11 to 53
    np.testing.assert_array_equal(np.asarray(crop_to_aspect(square, 32, 48)), np.asarray(square)[11:53])
    assert crop_to_aspect(square, 48, 48).size == (64, 64)


def test_long_i2v_chains_segments_with_diffusers_latents(df_stage, images, tmp_path: Path) -> None:
    # 77 frames in 37-frame windows with 17 of overlap: three full windows, where diffusers' long i2v is sound.
    row = {
        **ROW,
        "id": "long-i2v",
        "mode": "i2v",
        "image": images["first"],
        "num_frames": 77,
        "base_num_frames": 37,
        "overlap_history": 17,
    }
    SegmentStore(df_stage.output, row["id"]).remove()
    validated = ValidateRows(card_for("tiny-df"), max_frames=1457, duplicate_ids=())(pa.Table.from_pylist([row]))
    writer = WriteVideos(output=df_stage.output, crf=0, lossless=True, save_latents=True)
    result = writer(df_stage(validated)).to_pylist()[0]
    assert result["error"] is None and result["num_segments"] == 3
    expected = diffusers_image_to_video(
        df_stage,
        row,
        image=Image.open(images["first"]).convert("RGB"),
        base_num_frames=37,
        overlap_history=17,
        output_type="latent",
    )
    torch.testing.assert_close(load_file(result["latents_uri"])["latents"], expected, rtol=1e-5, atol=1e-5)
    whole_video = diffusers_image_to_video(
        df_stage, row, image=Image.open(images["first"]).convert("RGB"), base_num_frames=37, overlap_history=17
    )[0]
    np.testing.assert_array_equal(decode(result["uri"])[0], to_uint8(whole_video))


def test_conditioning_is_real(df_stage, images) -> None:
    card = card_for("tiny-df")
    one = render(df_stage, card, {**ROW, "id": "a", "mode": "i2v", "image": images["first"]})
    again = render(df_stage, card, {**ROW, "id": "b", "mode": "i2v", "image": images["first"]})
    other = render(df_stage, card, {**ROW, "id": "c", "mode": "i2v", "image": images["other"]})
    np.testing.assert_array_equal(one, again)
    assert not np.array_equal(one, other)
    long_flf = {
        **ROW,
        "mode": "flf2v",
        "image": images["first"],
        "num_frames": 57,
        "base_num_frames": 37,
        "overlap_history": 17,
    }
    with_last = render(df_stage, card, {**long_flf, "id": "d", "last_image": images["last"]})
    with_other_last = render(df_stage, card, {**long_flf, "id": "e", "last_image": images["other"]})
    assert with_last.shape == (57, 32, 48, 3)
    np.testing.assert_array_equal(with_last[:37], with_other_last[:37])  # the last frame steers only the end
    assert not np.array_equal(with_last[37:], with_other_last[37:])


def test_size_follows_the_image_fitted_to_the_models_area(df_stage, images) -> None:
    card = card_for("tiny-df")
    row = {k: v for k, v in ROW.items() if k not in ("height", "width")}
    frames = render(df_stage, card, {**row, "id": "wide", "mode": "i2v", "image": images["wide"]})
    # 2:1 into tiny-df's 64x96 area at multiples of 16: sqrt(6144 / 2) = 55 -> 48 high, sqrt(6144 * 2) = 111 -> 96.
    assert frames.shape == (9, 48, 96, 3)


def test_an_unreachable_image_is_a_per_row_error_naming_the_field(df_stage, tmp_path: Path) -> None:
    card = card_for("tiny-df")
    rows = [
        {**ROW, "id": "missing", "mode": "i2v", "image": str(tmp_path / "nope.png")},
        {**ROW, "id": "corrupt", "mode": "i2v", "image": str(tmp_path / "junk.png")},
    ]
    (tmp_path / "junk.png").write_bytes(b"not an image")
    validated = ValidateRows(card, max_frames=1457, duplicate_ids=())(pa.Table.from_pylist(rows))
    missing, corrupt = df_stage(validated).to_pylist()
    assert missing["error"].startswith("row 'missing': image: cannot fetch")
    assert corrupt["error"].startswith("row 'corrupt': image:") and "not a readable image" in corrupt["error"]


V2V = {**ROW, "mode": "v2v", "num_frames": 40, "base_num_frames": 37, "overlap_history": 17}


def test_v2v_is_the_clip_then_exactly_the_new_frames_diffusers_makes(df_stage, tmp_path: Path) -> None:
    clip_uri = write_clip(tmp_path / "clip.mp4", 5)
    clip = decode(clip_uri)[0]
    row = {**V2V, "id": "v2v", "video": clip_uri}
    SegmentStore(df_stage.output, row["id"]).remove()
    validated = ValidateRows(card_for("tiny-df"), max_frames=1457, duplicate_ids=())(pa.Table.from_pylist([row]))
    writer = WriteVideos(output=df_stage.output, crf=0, lossless=True, save_latents=True)
    result = writer(df_stage(validated)).to_pylist()[0]
    assert result["error"] is None, result["error"]
    frames = decode(result["uri"])[0]
    assert frames.shape == (21 + 40, 32, 48, 3)  # nothing repeated
    np.testing.assert_array_equal(frames[:21], clip)  # begins with the input clip, untouched

    pipe = SkyReelsV2DiffusionForcingVideoToVideoPipeline.from_pipe(df_stage.pipeline, **with_text_encoder(df_stage))
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=row["shift"])
    call = dict(
        video=[Image.fromarray(frame) for frame in clip],
        prompt=row["prompt"],
        negative_prompt="",
        height=32,
        width=48,
        num_frames=57,
        base_num_frames=37,
        overlap_history=17,
        num_inference_steps=3,
        guidance_scale=4.0,
    )
    latents = pipe(**call, generator=torch.Generator("cpu").manual_seed(21), output_type="latent").frames
    video = pipe(**call, generator=torch.Generator("cpu").manual_seed(21)).frames[0]
    # diffusers returns the clip, then its decode of [overlap latents + new latents]: the overlap twice.
    overlap_frames = (5 - 1) * 4 + 1
    np.testing.assert_array_equal(frames[21:], to_uint8(video[21 + overlap_frames :]))
    torch.testing.assert_close(load_file(result["latents_uri"])["latents"], latents[:, :, 5:], rtol=1e-5, atol=1e-5)


def test_v2v_conditioning_is_real_and_bad_clips_fail_their_row(df_stage, tmp_path: Path) -> None:
    card = card_for("tiny-df")
    one = render(df_stage, card, {**V2V, "id": "v-a", "video": write_clip(tmp_path / "a.mp4", 5)})
    other = render(df_stage, card, {**V2V, "id": "v-b", "video": write_clip(tmp_path / "b.mp4", 6)})
    assert not np.array_equal(one[21:], other[21:])

    short = {**V2V, "id": "short-clip", "video": write_clip(tmp_path / "short.mp4", 7, frames=9)}
    validated = ValidateRows(card, max_frames=1457, duplicate_ids=())(pa.Table.from_pylist([short]))
    assert "video: has 9 frames, fewer than overlap_history (17)" in df_stage(validated).to_pylist()[0]["error"]
    odd = ValidateRows(card, max_frames=1457, duplicate_ids=())(pa.Table.from_pylist([{**short, "num_frames": 41}]))
    assert "multiple of 4" in odd.to_pylist()[0]["error"]


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A LoRA for the embedded transformer in diffusers' format, with random (not zero) up-projections."""
    from diffusers import SkyReelsV2DiffusionForcingPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = SkyReelsV2DiffusionForcingPipeline.from_pretrained(materialize(card_for("tiny-df")))
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    pipe.transformer.add_adapter(config, adapter_name="style")
    folder = tmp_path_factory.mktemp("lora")
    SkyReelsV2DiffusionForcingPipeline.save_lora_weights(
        folder, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer, adapter_name="style")
    )
    return str(folder)


def test_lora_changes_the_video_scale_0_does_not_and_it_is_loaded_once(lora_dir, tmp_path: Path) -> None:
    card = card_for("tiny-df")
    stage = EncodeThenRender(card, output=str(tmp_path))
    plain = render(stage, card, {**ROW, "id": "plain"})
    styled = render(stage, card, {**ROW, "id": "styled", "lora": lora_dir})
    half = render(stage, card, {**ROW, "id": "half", "lora": lora_dir, "lora_scale": 0.5})
    off = render(stage, card, {**ROW, "id": "off", "lora": lora_dir, "lora_scale": 0.0})
    after = render(stage, card, {**ROW, "id": "after"})
    file_uri = render(stage, card, {**ROW, "id": "by-file", "lora": f"{lora_dir}/pytorch_lora_weights.safetensors"})
    assert not np.array_equal(styled, plain) and not np.array_equal(half, styled)
    np.testing.assert_array_equal(off, plain)
    np.testing.assert_array_equal(after, plain)  # a LoRA row leaves nothing behind
    np.testing.assert_array_equal(file_uri, styled)
    assert list(stage.denoiser.adapters) == [lora_dir, f"{lora_dir}/pytorch_lora_weights.safetensors"]
    assert stage.pipeline.get_list_adapters() == {"transformer": ["lora0", "lora1"]}


def test_a_missing_lora_fails_its_row_naming_the_field(df_stage, tmp_path: Path) -> None:
    validated = ValidateRows(card_for("tiny-df"), max_frames=1457, duplicate_ids=())(
        pa.Table.from_pylist([{**ROW, "id": "no-lora", "lora": str(tmp_path / "missing")}])
    )
    assert df_stage(validated).to_pylist()[0]["error"].startswith("row 'no-lora': lora: cannot fetch")


def test_plain_i2v_checkpoints_render_exactly_what_skyreels_v2_image_to_video_returns(images, tmp_path: Path) -> None:
    card = card_for("tiny-i2v")
    stage = EncodeThenRender(card, output=str(tmp_path))
    assert type(stage.pipeline).__name__ == "SkyReelsV2ImageToVideoPipeline"
    row = {**ROW, "id": "plain-i2v", "mode": "i2v", "image": images["first"]}
    frames = render(stage, card, row)

    pipe = SkyReelsV2ImageToVideoPipeline.from_pretrained(materialize(card))
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=7.0)
    expected = pipe(
        image=Image.open(images["first"]).convert("RGB"),
        prompt=ROW["prompt"],
        negative_prompt="",
        height=32,
        width=48,
        num_frames=9,
        num_inference_steps=3,
        guidance_scale=4.0,
        generator=torch.Generator("cpu").manual_seed(21),
    ).frames[0]
    np.testing.assert_array_equal(frames, to_uint8(expected))
    other = render(stage, card, {**row, "id": "plain-i2v-2", "image": images["other"]})
    assert not np.array_equal(frames, other)


def test_flf2v_on_i2v_checkpoints_without_a_last_frame_embedding_is_a_per_row_error(images) -> None:
    for name in ("tiny-i2v", "Skywork/SkyReels-V2-I2V-14B-540P-Diffusers"):
        row = {**ROW, "mode": "flf2v", "image": images["first"], "last_image": images["last"]}
        validated = ValidateRows(card_for(name), max_frames=1457, duplicate_ids=())(pa.Table.from_pylist([row]))
        assert "use a diffusion-forcing checkpoint" in validated.to_pylist()[0]["error"]


def test_a_v2v_row_holds_only_the_frames_it_conditions_on_and_lets_go_of_them(df_stage, tmp_path: Path) -> None:
    row = {**V2V, "id": "v2v-memory", "video": write_clip(tmp_path / "clip.mp4", 6)}
    validated = ValidateRows(card_for("tiny-df"), max_frames=1457, duplicate_ids=())(pa.Table.from_pylist([row]))
    _, conditioning = df_stage.denoiser.prepare(RenderParams.model_validate_json(validated["params"][0].as_py()))
    assert conditioning["video"].shape[2] == row["overlap_history"] and len(conditioning["clip_frames"]) == 21
    assert df_stage(validated).to_pylist()[0]["error"] is None
    assert df_stage.denoiser.video is None, "nothing of the row stays on the actor"


def test_a_rank_keeps_the_most_recently_used_loras_and_a_reloaded_one_renders_the_same(
    lora_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("skyreels_batch.render.denoiser.MAX_ADAPTERS", 1)
    card = card_for("tiny-df")
    stage = EncodeThenRender(card, output=str(tmp_path))
    by_file = f"{lora_dir}/pytorch_lora_weights.safetensors"
    first = render(stage, card, {**ROW, "id": "first", "lora": lora_dir, "lora_scale": 0.5})
    render(stage, card, {**ROW, "id": "other", "lora": by_file})
    assert list(stage.denoiser.adapters) == [by_file]
    assert stage.pipeline.get_list_adapters() == {"transformer": ["lora1"]}, "the least recently used one left"
    again = render(stage, card, {**ROW, "id": "again", "lora": lora_dir, "lora_scale": 0.5})
    assert stage.pipeline.get_list_adapters() == {"transformer": ["lora2"]}
    np.testing.assert_array_equal(again, first)
