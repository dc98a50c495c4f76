"""Quality signals: the detectors judged on clips made with known defects (through H.264 and back, as the command
line reads them), the gate, and the columns a run's writer adds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import boto3
import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from skyreels_batch.models import card_for
from skyreels_batch.output.dataset import metadata_uri, write_dataset_metadata
from skyreels_batch.output.quality import GATE, Quality, measure, parse_gate
from skyreels_batch.output.results import ResultsIndex, result_row
from skyreels_batch.output.video import encode_mp4
from skyreels_batch.render.segments import SegmentStore
from skyreels_batch.schema import resolve
from skyreels_batch.stages.write import WriteVideos
from tests.conftest import BUCKET

HEIGHT, WIDTH, FRAMES = 64, 128, 33  # sizes the model takes: the writer test resolves a row


def pattern(shift: float) -> np.ndarray:
    """A smooth pattern moved `shift` pixels to the right."""
    x = np.arange(WIDTH)[None, :] - shift
    y = np.arange(HEIGHT)[:, None]
    grey = 128 + 90 * np.sin(2 * np.pi * x / 64) * np.cos(2 * np.pi * y / 48)
    return np.repeat(grey[..., None], 3, axis=2).clip(0, 255).astype(np.uint8)


def scene(seed: int) -> np.ndarray:
    """A picture with detail: coarse random colours, scaled up smoothly."""
    coarse = np.random.default_rng(seed).integers(0, 256, (HEIGHT // 8, WIDTH // 8, 3), dtype=np.uint8)
    return cv2.resize(coarse, (WIDTH, HEIGHT), interpolation=cv2.INTER_CUBIC)


CLIPS = {
    "black": [np.full((HEIGHT, WIDTH, 3), 6, np.uint8)] * FRAMES,
    "frozen": [scene(1)] * FRAMES,
    "moving": [pattern(1.5 * k) for k in range(FRAMES)],
    "cut": [np.roll(scene(1), k, axis=1) for k in range(16)] + [np.roll(scene(2), k, axis=1) for k in range(17)],
    "sharp": [np.roll(scene(3), k, axis=1) for k in range(FRAMES)],
    "blurred": [cv2.GaussianBlur(np.roll(scene(3), k, axis=1), (0, 0), 2.5) for k in range(FRAMES)],
}


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every clip as an MP4, scored by the command line in one call."""
    folder = tmp_path_factory.mktemp("clips")
    paths = []
    for name, frames in CLIPS.items():
        path = folder / f"{name}.mp4"
        path.write_bytes(encode_mp4(frames, fps=24, crf=18, lossless=False))
        paths.append(str(path))
    printed = subprocess.run(
        [sys.executable, "-m", "skyreels_batch.output.quality", *paths], capture_output=True, text=True, check=True
    ).stdout
    return {Path(result["path"]).stem: result for result in map(json.loads, printed.splitlines())}


def test_the_command_line_prints_one_object_per_video_with_every_signal(scored: dict[str, dict]) -> None:
    assert sorted(scored) == sorted(CLIPS)
    for result in scored.values():
        assert set(result) == {"path", *GATE}
        assert result["seam_jump"] is None and result["drift"] is None, "an MP4 alone has no seams"


def test_black_frames_are_black_and_nothing_else_is(scored: dict[str, dict]) -> None:
    assert scored["black"]["black_fraction"] == 1.0
    assert all(scored[name]["black_fraction"] == 0.0 for name in CLIPS if name != "black")


def test_a_frozen_clip_is_frozen_through_the_encoder_and_a_moving_one_is_not(scored: dict[str, dict]) -> None:
    assert scored["frozen"]["frozen_fraction"] == 1.0 and scored["frozen"]["motion"] < 1e-3
    assert scored["moving"]["frozen_fraction"] == 0.0
    # The pattern moves 1.5 pixels a frame: 1.5 / 128 of the width.
    assert scored["moving"]["motion"] == pytest.approx(1.5 / WIDTH, rel=0.2)


def test_a_cut_is_found_where_the_second_scene_starts(scored: dict[str, dict]) -> None:
    assert scored["cut"]["cuts"] == [16]
    assert all(scored[name]["cuts"] == [] for name in ("frozen", "moving", "sharp", "blurred"))


def test_a_blurred_clip_is_less_sharp(scored: dict[str, dict]) -> None:
    assert scored["blurred"]["sharpness"] < scored["sharp"]["sharpness"] / 3


def test_a_seam_that_jumps_and_a_chain_that_drifts() -> None:
    seams = [11, 22]  # three segments of 11 frames
    smooth = measure((pattern(1.5 * k) for k in range(FRAMES)), FRAMES, seams)
    jumps = measure((pattern(1.5 * k + (20 if k >= 22 else 0)) for k in range(FRAMES)), FRAMES, seams)
    tint = np.array([1, 0, -1]) * 2  # two levels more red and less blue per frame
    drifts = measure(
        (np.clip(pattern(1.5 * k) + tint * k, 0, 255).astype(np.uint8) for k in range(FRAMES)), FRAMES, seams
    )
    assert smooth.seam_jump == pytest.approx(1.0, abs=0.3) and smooth.drift < 0.01
    assert jumps.seam_jump > 4 * smooth.seam_jump and jumps.cuts == [], "a seam is judged as a seam, not a cut"
    assert drifts.drift == pytest.approx(2 * 22 / 255, rel=0.25)  # the last segment's red against the first's


def test_the_command_line_reads_a_bucket(s3_endpoint: str, tmp_path: Path) -> None:
    boto3.client("s3").put_object(
        Bucket=BUCKET, Key="clips/frozen.mp4", Body=encode_mp4(CLIPS["frozen"], fps=24, crf=18, lossless=False)
    )
    printed = subprocess.run(
        [sys.executable, "-m", "skyreels_batch.output.quality", f"s3://{BUCKET}/clips/frozen.mp4"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(printed)["frozen_fraction"] == 1.0


def test_the_gate_flags_the_signals_over_its_thresholds() -> None:
    frozen = Quality(black_fraction=0.0, frozen_fraction=0.9, motion=0.0, sharpness=50.0, cuts=[4], drift=0.2)
    assert frozen.flags(GATE) == ["frozen_fraction", "motion", "cuts", "drift"]
    assert frozen.flags(parse_gate("frozen_fraction=0.95,cuts=1,drift=0.5,motion=0")) == []
    assert frozen.columns(None)["quality_flags"] is None, "no gate: signals only"
    with pytest.raises(ValueError, match="'wobble=1' is not SIGNAL=VALUE"):
        parse_gate("wobble=1")


def write_video(output: str, video_id: str, frames: list[np.ndarray], gate: dict | None) -> dict:
    """One row through the writer stage, from segments on storage as the render stage leaves them."""
    params = resolve(
        {"id": video_id, "prompt": video_id, "num_frames": len(frames), "height": HEIGHT, "width": WIDTH},
        card_for("tiny-df"),
        max_frames=1457,
    )
    store = SegmentStore(output, params.id)
    store.open(params)
    store.save(0, np.stack(frames), torch.zeros(1), torch.zeros(1))
    row = {"id": video_id, "params": params.model_dump_json(), "num_segments": 1, "error": None, "stopped": None}
    return {**row, **WriteVideos(output=output, crf=18, lossless=False, quality_gate=gate).process(params, row)}


def test_flagged_videos_stay_done_and_the_dataset_leaves_them_out_unless_kept(tmp_path: Path) -> None:
    output = str(tmp_path / "out")
    gate = parse_gate("default")
    frozen = write_video(output, "frozen", CLIPS["frozen"], gate)
    moving = write_video(output, "moving", CLIPS["sharp"], gate)  # a detailed picture panning
    assert frozen["quality_flags"] == ["frozen_fraction", "motion"] and moving["quality_flags"] == []
    index = ResultsIndex(output)
    index.add([result_row(frozen), result_row(moving)])
    index.close()
    assert write_dataset_metadata(output, index.files()) == 1
    kept = pq.read_table(metadata_uri(output)).to_pylist()
    assert [row["id"] for row in kept] == ["moving"]
    assert kept[0]["quality_frozen_fraction"] == 0.0 and kept[0]["quality_flags"] == []
    assert write_dataset_metadata(output, index.files(), keep_flagged=True) == 2
