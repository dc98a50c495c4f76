"""The manifest schema and seeds: pure functions, no Ray."""

from __future__ import annotations

import re
import typing

import pytest

from skyreels_batch.models import card_for
from skyreels_batch.schema import ManifestRow, RowError, derive_seed, resolve
from tests.conftest import REPO

CARD = card_for("tiny-df")


def resolve_row(**raw):
    return resolve({"id": "v1", "prompt": "a cat", **raw}, CARD, max_frames=1457)


def test_missing_columns_take_the_model_cards_defaults() -> None:
    params = resolve_row()
    defaults = CARD.defaults
    assert (params.num_frames, params.height, params.width) == (defaults.num_frames, defaults.height, defaults.width)
    assert (params.fps, params.num_inference_steps) == (defaults.fps, defaults.num_inference_steps)
    assert (params.guidance_scale, params.shift, params.mode) == (defaults.guidance_scale, defaults.shift, "t2v")
    assert params.seed == derive_seed("v1")
    assert params.model == "tiny-df"


def test_row_values_override_defaults_and_nulls_do_not() -> None:
    params = resolve_row(num_frames=33, height=128, width=224, seed=5, guidance_scale=0.0, fps=None, shift=3.0)
    assert (params.num_frames, params.height, params.width, params.seed) == (33, 128, 224, 5)
    assert params.guidance_scale == 0.0  # an explicit 0 is a value, not "missing"
    assert params.shift == 3.0
    assert params.fps == CARD.defaults.fps


def test_derived_seed_is_stable_across_releases() -> None:
    # Pinned: changing the derivation would silently change every seedless video ever rendered.
    assert derive_seed("v1") == 3517500556782997196
    assert derive_seed("v1") != derive_seed("v2")
    assert 0 <= derive_seed("anything") < 2**63


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"num_frames": 20}, "num_frames"),
        ({"num_frames": 0}, "num_frames"),
        ({"num_frames": 2001}, "num_frames"),  # above --max-frames
        ({"height": 100}, "height"),
        ({"width": 1000}, "width"),
        ({"height": 1024, "width": 1280}, "height/width"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"guidance_scale": 99.0}, "guidance_scale"),
        ({"mode": "x2v"}, "mode"),
        ({"mode": "v2v"}, "video"),
        ({"mode": "v2v", "video": "clip.mp4", "num_frames": 97}, "num_frames"),  # v2v adds multiples of 4
        ({"mode": "i2v"}, "image"),
        ({"mode": "flf2v", "image": "first.png"}, "last_image"),
        ({"image": "first.png"}, "image"),  # t2v takes no image
        ({"mode": "i2v", "image": "first.png", "height": 64}, "height/width"),
        ({"seed": -3}, "seed"),
        ({"num_frames": "many"}, "num_frames"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"id": "../escape"}, "id"),
        ({"id": "a/b"}, "id"),
        ({"id": ".."}, "id"),
        ({"id": "x" * 129}, "id"),
        ({"num_frames": 257, "overlap_history": 16}, "overlap_history"),
        ({"num_frames": 257, "base_num_frames": 37, "overlap_history": 37}, "overlap_history"),
        ({"base_num_frames": 121}, "base_num_frames"),  # above tiny-df's 97-frame window
        ({"num_frames": 33, "ar_step": 1, "causal_block_size": 4}, "causal_block_size"),
        ({"addnoise_condition": 99.0}, "addnoise_condition"),
        ({"segment_prompts": []}, "segment_prompts"),
        ({"segment_prompts": ["fine", " "]}, "segment_prompts"),
    ],
)
def test_bad_rows_name_the_row_and_the_field(raw: dict, field: str) -> None:
    with pytest.raises(RowError) as error:
        resolve_row(**raw)
    message = str(error.value)
    assert re.search(rf"\b{re.escape(field)}\b", message), message
    expected_label = "row 'v1'" if "id" not in raw else "row"
    assert message.startswith(expected_label), message


def test_production_sizes_are_accepted_in_both_orientations() -> None:
    assert resolve_row(height=720, width=1280).width == 1280
    assert resolve_row(height=1280, width=720).height == 1280


def test_long_video_columns_resolve_with_defaults_and_overrides() -> None:
    params = resolve_row(num_frames=257)
    assert (params.base_num_frames, params.overlap_history, params.ar_step, params.causal_block_size) == (97, 17, 0, 1)
    assert params.addnoise_condition == 0.0 and params.segment_prompts is None
    travel = resolve_row(
        num_frames=257, segment_prompts=["dawn", "noon"], addnoise_condition=20, ar_step=5, causal_block_size=5
    )
    assert [travel.prompt_for(k) for k in range(4)] == ["dawn", "noon", "noon", "noon"]
    assert (travel.addnoise_condition, travel.ar_step, travel.causal_block_size) == (20.0, 5, 5)


def test_image_modes_take_their_size_from_the_image_unless_the_row_sets_it() -> None:
    fitted = resolve_row(mode="i2v", image="s3://bucket/first.png")
    assert (fitted.height, fitted.width, fitted.image) == (None, None, "s3://bucket/first.png")
    fixed = resolve_row(mode="flf2v", image="a.png", last_image="b.png", height=32, width=48)
    assert (fixed.height, fixed.width, fixed.last_image) == (32, 48, "b.png")


def test_modes_a_model_cannot_serve_are_per_row_errors() -> None:
    with pytest.raises(RowError, match="mode: 'i2v' is not served by tiny-t2v"):
        resolve({"id": "v1", "prompt": "p", "mode": "i2v", "image": "a.png"}, card_for("tiny-t2v"), max_frames=97)


def test_long_videos_need_a_diffusion_forcing_model() -> None:
    with pytest.raises(RowError, match="num_frames: .*diffusion-forcing"):
        resolve(
            {"id": "v1", "prompt": "p", "num_frames": 257},
            card_for("Skywork/SkyReels-V2-T2V-14B-540P-Diffusers"),
            max_frames=1457,
        )


def test_max_frames_flag_caps_rows() -> None:
    with pytest.raises(RowError, match="num_frames"):
        resolve({"id": "v1", "prompt": "p", "num_frames": 33}, CARD, max_frames=17)


def docs_manifest_table() -> dict[str, str]:
    """The manifest table in docs/manifest.md: column -> its type cell."""
    section = (REPO / "docs" / "manifest.md").read_text().split("\n## The manifest\n", 1)[1].split("\n## ", 1)[0]
    return {name: kind.strip() for name, kind in re.findall(r"^\| `(\w+)` \| ([^|]+) \|", section, re.MULTILINE)}


def documented_type(annotation: object, required: bool) -> str:
    """A schema field's type as the docs' table writes it."""
    kinds = {str: "string", int: "int", float: "float", list[str]: "list of strings"}
    (kind,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)] or [annotation]
    if typing.get_origin(kind) is typing.Literal:
        kind = type(typing.get_args(kind)[0])
    return kinds[kind] + (", required" if required else "")


def test_the_docs_manifest_table_is_the_schema_in_both_directions() -> None:
    table = docs_manifest_table()
    assert list(table) == list(ManifestRow.model_fields), "the docs' columns, in order, are the schema's"
    for name, field in ManifestRow.model_fields.items():
        assert table[name] == documented_type(field.annotation, field.is_required()), name
