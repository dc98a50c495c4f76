"""Stage classes called directly on pyarrow batches: no Ray, the real embedded model, real MP4s."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray
import torch
from diffusers import SkyReelsV2DiffusionForcingPipeline, UniPCMultistepScheduler

from skyreels_batch import storage
from skyreels_batch.models import card_for
from skyreels_batch.models.embedded import materialize
from skyreels_batch.output.results import record_uri
from skyreels_batch.output.video import encode_mp4, to_uint8
from skyreels_batch.render.segments import SegmentStore
from skyreels_batch.stages.render import RenderVideos
from skyreels_batch.stages.validate import ValidateRows
from skyreels_batch.stages.write import WriteVideos
from tests.conftest import EncodeThenRender, decode

CARD = card_for("tiny-df")
ROW = {
    "id": "clip",
    "prompt": "a lighthouse in a storm",
    "num_frames": 9,
    "height": 32,
    "width": 48,
    "seed": 11,
    "fps": 16,
    "shift": 5.0,
    "guidance_scale": 4.0,
    "num_inference_steps": 3,
}


def validated(rows: list[dict], duplicates: frozenset[str] = frozenset()) -> pa.Table:
    return ValidateRows(CARD, max_frames=1457, duplicate_ids=duplicates)(pa.Table.from_pylist(rows))


@pytest.fixture(scope="module")
def render_stage(tmp_path_factory: pytest.TempPathFactory) -> RenderVideos:
    return EncodeThenRender(CARD, output=str(tmp_path_factory.mktemp("out")))


def test_validate_passes_good_rows_and_turns_bad_ones_into_errors() -> None:
    rows = validated(
        [ROW, {**ROW, "id": "bad", "num_frames": 10}, {**ROW, "id": "twice"}, {**ROW, "id": "twice"}],
        duplicates=frozenset({"twice"}),
    ).to_pylist()
    good, bad, first, second = rows
    assert good["error"] is None and json.loads(good["params"])["seed"] == 11
    assert bad["params"] is None and "row 'bad'" in bad["error"] and "num_frames" in bad["error"]
    assert "appears more than once" in first["error"] and "appears more than once" in second["error"]


def test_rendered_video_is_exactly_what_diffusers_returns(render_stage: RenderVideos, tmp_path: Path) -> None:
    rendered = render_stage(validated([ROW]))
    row = rendered.to_pylist()[0]
    assert row["error"] is None and row["render_s"] > 0 and row["num_segments"] == 1
    written = WriteVideos(output=render_stage.output, crf=18, lossless=True)(rendered).to_pylist()[0]
    frames, fps = decode(written["uri"])

    # The reference: diffusers called by hand, the way its docs show, with the row's parameters.
    pipe = SkyReelsV2DiffusionForcingPipeline.from_pretrained(materialize(CARD))
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=5.0)
    expected = pipe(
        prompt=ROW["prompt"],
        negative_prompt=CARD.defaults.negative_prompt,
        height=32,
        width=48,
        num_frames=9,
        num_inference_steps=3,
        guidance_scale=4.0,
        fps=16,
        generator=torch.Generator("cpu").manual_seed(11),
    ).frames[0]
    assert fps == 16
    assert frames.shape == (9, 32, 48, 3)
    np.testing.assert_array_equal(frames, to_uint8(expected))  # lossless RGB: bit-exact
    assert not Path(render_stage.output, "_segments", "clip").exists(), "segments are removed once committed"


def test_default_encoding_is_yuv420p_h264_with_the_rows_fps(render_stage: RenderVideos) -> None:
    row = {**ROW, "id": "plain", "fps": 24}
    written = WriteVideos(output=render_stage.output, crf=18, lossless=False)(render_stage(validated([row])))
    uri = written.to_pylist()[0]["uri"]
    import av

    with av.open(uri) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.codec_context.pix_fmt) == ("h264", "yuv420p")
    frames, fps = decode(uri)
    assert frames.shape == (9, 32, 48, 3) and fps == 24


def test_failed_rows_pass_through_render_and_write_untouched(render_stage: RenderVideos) -> None:
    bad = validated([{**ROW, "id": "bad", "height": 33}])
    written = WriteVideos(output=render_stage.output, crf=18, lossless=False)(render_stage(bad)).to_pylist()[0]
    assert written["uri"] is None and "height" in written["error"]
    assert not Path(render_stage.output, "videos", "bad.mp4").exists()


def test_a_row_whose_output_cannot_be_written_fails_alone(render_stage: RenderVideos, tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    (blocked / "videos").mkdir(parents=True)
    (blocked / "videos" / "stuck.mp4").mkdir()  # a directory where the MP4 must go: the commit fails
    stage = EncodeThenRender(CARD, output=str(blocked))
    rendered = stage(validated([{**ROW, "id": "stuck"}, {**ROW, "id": "fine"}]))
    writer = WriteVideos(output=str(blocked), crf=18, lossless=False)
    stuck, fine = writer(rendered).to_pylist()
    assert stuck["uri"] is None and stuck["error"].startswith("row 'stuck': writing the MP4 failed:")
    assert fine["error"] is None and Path(fine["uri"]).is_file()


def rendered_frames(stage: RenderVideos, row: dict) -> np.ndarray:
    store = SegmentStore(stage.output, row["id"])
    store.remove()
    storage.remove_files([record_uri(stage.output, row["id"])])  # a committed row is not rendered again
    count = stage(validated([row])).to_pylist()[0]["num_segments"]
    return np.stack(list(store.frames(count)))


def test_same_row_renders_identical_frames_twice(render_stage: RenderVideos) -> None:
    first = rendered_frames(render_stage, ROW)
    second = rendered_frames(render_stage, ROW)
    other_seed = rendered_frames(render_stage, {**ROW, "seed": 12})
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other_seed)


def test_a_commit_is_final_for_a_writer_run_twice_and_for_a_process_killed_just_after_it(
    render_stage: RenderVideos, tmp_path: Path
) -> None:
    row = {**ROW, "id": "committed", "num_frames": 41}
    rendered = render_stage(validated([row]))
    writer = WriteVideos(output=render_stage.output, crf=18, lossless=False)
    first = writer(rendered).to_pylist()[0]
    again = writer(rendered).to_pylist()[0]  # Ray retries the task: its segments are gone
    assert first["error"] is None and again == first

    # A writer process killed right after the record, before it removed the segments or returned the row.
    other = {**row, "id": "killed-after-commit"}
    rendered = render_stage(validated([other]))
    batch = tmp_path / "rendered.arrow"
    with pa.ipc.new_file(batch, rendered.schema) as file:
        file.write_table(rendered)
    script = (
        "import os, sys, pyarrow as pa\n"
        "from skyreels_batch.render.segments import SegmentStore\n"
        "from skyreels_batch.stages.write import WriteVideos\n"
        "SegmentStore.remove = lambda self: os._exit(9)\n"
        "WriteVideos(output=sys.argv[2], crf=18, lossless=False)(pa.ipc.open_file(sys.argv[1]).read_all())\n"
    )
    killed = subprocess.run([sys.executable, "-c", script, str(batch), render_stage.output], capture_output=True)
    assert killed.returncode == 9, killed.stderr
    segments = Path(SegmentStore(render_stage.output, other["id"]).root)
    persisted = {path.name: path.stat().st_mtime_ns for path in segments.iterdir()}
    # The row was lost on its way back; the next pass hands it out again: nothing is rendered or written again.
    readmitted = render_stage(validated([other]))
    assert {path.name: path.stat().st_mtime_ns for path in segments.iterdir()} == persisted, "not rendered again"
    written = writer(readmitted).to_pylist()[0]
    assert written["error"] is None and written["uri"].endswith("videos/killed-after-commit.mp4")
    assert written["render_s"] == readmitted.to_pylist()[0]["render_s"] and not segments.exists()
    frames, _ = decode(written["uri"])
    assert frames.shape[0] == 41
    # A changed request is not committed: it renders.
    changed = render_stage(validated([{**other, "seed": 99}])).to_pylist()[0]
    assert changed["error"] is None and changed["resumed_segments"] == 0 and segments.exists()


@ray.remote(num_cpus=0.25)
def _encodings(frames: np.ndarray, times: int) -> list[str]:
    """The writer's encoding, `times` over in one Ray worker (where the writer encodes), as checksums."""
    return [hashlib.sha256(encode_mp4(iter(frames), fps=16, crf=18, lossless=False)).hexdigest() for _ in range(times)]


@pytest.mark.slow
def test_the_same_frames_encode_to_the_same_bytes_in_ray_workers(ray_local: None) -> None:
    """With x264's MB-tree on, from none to a third of these 120 encodes came out different (docs/manifest.md)."""
    frames = np.random.default_rng(0).integers(0, 256, (33, 96, 160, 3), dtype=np.uint8)
    checksums = [checksum for batch in ray.get([_encodings.remote(frames, 20) for _ in range(6)]) for checksum in batch]
    assert len(checksums) == 120 and len(set(checksums)) == 1
