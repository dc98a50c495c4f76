"""The text-encoding stage: its own actors, each unique text encoded once, render actors without a text encoder."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import torch
from diffusers import SkyReelsV2DiffusionForcingPipeline

from skyreels_batch.models import card_for
from skyreels_batch.models.embedded import materialize
from skyreels_batch.render.embeddings import EmbeddingStore, texts_for
from skyreels_batch.schema import RenderParams
from skyreels_batch.stages.encode import EncodePrompts
from skyreels_batch.stages.render import RenderVideos
from skyreels_batch.stages.validate import ValidateRows

CARD = card_for("tiny-df")
SHORT = {"height": 32, "width": 48, "num_frames": 9, "num_inference_steps": 2, "guidance_scale": 4.0}
ROWS = [
    {**SHORT, "id": "a", "prompt": "a cat"},
    {**SHORT, "id": "b", "prompt": "a cat", "seed": 7},  # the same prompt as row a
    {**SHORT, "id": "c", "prompt": "a dog", "guidance_scale": 1.0},  # no guidance: no negative prompt
    # 3 segments, prompt travel: "a cat" then "a bird" twice
    {
        **SHORT,
        "id": "d",
        "prompt": "x",
        "segment_prompts": ["a cat", "a bird"],
        "num_frames": 45,
        "base_num_frames": 21,
        "overlap_history": 9,
    },
    {**SHORT, "id": "bad", "prompt": "a cat", "num_frames": 10},  # fails validation: passes through untouched
]


def validated(rows: list[dict]) -> pa.Table:
    columns = list(dict.fromkeys(key for row in rows for key in row))  # from_pylist takes the first row's keys
    table = pa.Table.from_pylist([{column: row.get(column) for column in columns} for row in rows])
    return ValidateRows(CARD, max_frames=1457, duplicate_ids=frozenset())(table)


def test_texts_of_a_row_are_its_segment_prompts_and_negative_prompt_once_each() -> None:
    params = [RenderParams.model_validate_json(row["params"]) for row in validated(ROWS[:4]).to_pylist()]
    negative = CARD.defaults.negative_prompt
    assert [texts_for(p) for p in params] == [
        ["a cat", negative],
        ["a cat", negative],
        ["a dog"],
        ["a cat", "a bird", negative],
    ]


def test_each_unique_text_is_encoded_once_as_the_pipeline_encodes_it(tmp_path: Path) -> None:
    stage = EncodePrompts(CARD, output=str(tmp_path), device="cpu", torch_threads=2)
    rows = validated(ROWS)
    assert stage(rows).to_pylist() == rows.to_pylist()  # rows pass through, the failed one untouched
    assert stage.encoded == 4  # "a cat", the negative prompt, "a dog", "a bird"
    assert len(list((tmp_path / "_embeddings").iterdir())) == 4

    pipe = SkyReelsV2DiffusionForcingPipeline.from_pretrained(materialize(CARD))
    with torch.no_grad():  # as in a pipeline call
        positive, negative = pipe.encode_prompt(
            prompt="a cat", negative_prompt=CARD.defaults.negative_prompt, device="cpu", max_sequence_length=512
        )
    store = EmbeddingStore(str(tmp_path), CARD.name)
    assert torch.equal(store.load("a cat"), positive)
    assert torch.equal(store.load(CARD.defaults.negative_prompt), negative)

    again = EncodePrompts(CARD, output=str(tmp_path), device="cpu", torch_threads=2)
    again(rows)  # a retried or resumed row: its texts are already stored
    assert again.encoded == 0


def test_render_actors_hold_no_text_encoder_and_a_row_without_embeddings_fails_alone(tmp_path: Path) -> None:
    stage = RenderVideos(CARD, output=str(tmp_path), device="cpu", torch_threads=2)
    assert stage.pipeline.text_encoder is None and stage.pipeline.tokenizer is None
    (result,) = stage(validated(ROWS[:1])).to_pylist()
    assert result["error"].startswith("row 'a': prompt: no text embeddings for 'a cat'")
