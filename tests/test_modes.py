"""Model families and modes on the embedded models, through the real stages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from diffusers import SkyReelsV2Pipeline, UniPCMultistepScheduler

from skyreels_batch.embedded import materialize
from skyreels_batch.models import ModelCard, card_for
from skyreels_batch.segments import SegmentStore
from skyreels_batch.stages.render import RenderVideos
from skyreels_batch.stages.validate import ValidateRows
from skyreels_batch.stages.write import WriteVideos
from skyreels_batch.video import to_uint8
from tests.conftest import decode

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
    return RenderVideos(card_for("tiny-df"), output=str(tmp_path_factory.mktemp("df")), device="cpu", torch_threads=2)


def test_plain_t2v_checkpoints_render_exactly_what_skyreels_v2_pipeline_returns(tmp_path: Path) -> None:
    card = card_for("tiny-t2v")
    stage = RenderVideos(card, output=str(tmp_path), device="cpu", torch_threads=2)
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
        RenderVideos(card_for("tiny-df"), output=str(tmp_path), device="cpu", torch_threads=2),
        card_for("tiny-df"),
        long_row,
    )
    async_row = {**long_row, "id": "async", "ar_step": 2, "causal_block_size": 5}
    async_frames = render(df_stage, card_for("tiny-df"), async_row)
    after = render(df_stage, card_for("tiny-df"), long_row)
    assert not np.array_equal(async_frames, alone)  # the async mode really ran
    np.testing.assert_array_equal(after, alone)
    assert df_stage.pipeline.transformer.config.num_frame_per_block == 1
