"""The whole job on a real local Ray with the embedded model: local disk and the loopback S3 endpoint."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

from skyreels_batch.config import JobConfig
from skyreels_batch.job.cli import main
from skyreels_batch.job.pipeline import run_job
from skyreels_batch.output.results import shard_name, shard_of
from tests.conftest import BUCKET, REPO, decode, write_manifest

pytestmark = pytest.mark.slow

GOOD = [
    {"id": "alpha", "prompt": "a red kite over a beach", "num_frames": 9, "height": 32, "width": 48, "seed": 1},
    {"id": "beta", "prompt": "snow falling on a quiet town", "num_frames": 17, "height": 48, "width": 32, "fps": 16},
    {
        "id": "gamma.v2",
        "prompt": "a paper boat on a stream",
        "num_frames": 5,
        "height": 32,
        "width": 32,
        "num_inference_steps": 2,
    },
]
BAD = [
    {"id": "odd-frames", "prompt": "x", "num_frames": 8, "height": 32, "width": 32},
    {"id": "no-prompt", "prompt": None, "num_frames": 5, "height": 32, "width": 32},
]
EXPECTED = {"alpha": (9, 32, 48, 24), "beta": (17, 48, 32, 16), "gamma.v2": (5, 32, 32, 24)}


@pytest.fixture(scope="module")
def local_run(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, object]:
    base = tmp_path_factory.mktemp("job")
    manifest = write_manifest(base / "manifest.parquet", GOOD + BAD)
    output = base / "out"
    summary = run_job(JobConfig(manifest=str(manifest), output=str(output)), log=lambda _: None)
    return manifest, output, summary


def test_every_good_row_becomes_an_mp4_with_the_rows_frames_size_and_fps(local_run) -> None:
    _, output, summary = local_run
    assert (summary.total, summary.done, summary.failed) == (5, 3, 2)
    # The MP4s, and the dataset's metadata beside them (HuggingFace's folder layout).
    assert sorted(p.name for p in (output / "videos").iterdir()) == sorted(
        [*(f"{i}.mp4" for i in EXPECTED), "metadata.parquet"]
    )
    for video_id, (num_frames, height, width, fps) in EXPECTED.items():
        frames, rate = decode(output / "videos" / f"{video_id}.mp4")
        assert frames.shape == (num_frames, height, width, 3), video_id
        assert rate == fps, video_id
        assert frames.std() > 0, "a real render is not a flat frame"
    assert not (output / "_segments").exists()
    assert not (output / "_embeddings").exists()


def test_results_index_has_one_row_per_manifest_row(local_run) -> None:
    _, output, _ = local_run
    results = pd.read_parquet(output / "results").set_index("id")
    assert sorted(results.index) == sorted(row["id"] for row in GOOD + BAD)
    for video_id, (num_frames, height, width, fps) in EXPECTED.items():
        row = results.loc[video_id]
        assert row.status == "done" and pd.isna(row.error)
        assert row.uri == str(output / "videos" / f"{video_id}.mp4")
        assert (row.num_frames, row.height, row.width, row.fps) == (num_frames, height, width, fps)
        assert row.model == "tiny-df" and row.render_s > 0 and row.encode_s > 0
        assert 0 < row.transformer_s < row.render_s
        params = json.loads(row.params)
        assert params["seed"] == row.seed and params["num_frames"] == num_frames
    assert results.loc["alpha"].seed == 1
    assert results.loc["odd-frames"].status == "failed" and "num_frames" in results.loc["odd-frames"].error
    assert results.loc["no-prompt"].status == "failed" and "prompt" in results.loc["no-prompt"].error


def test_rerunning_skips_done_rows_and_rerenders_a_lost_video_bit_identically(local_run) -> None:
    manifest, output, _ = local_run
    before = {p.name: p.read_bytes() for p in (output / "videos").glob("*.mp4")}
    (output / "videos" / "beta.mp4").unlink()  # a lost output is not "done", whatever the index says
    lines: list[str] = []
    summary = run_job(JobConfig(manifest=str(manifest), output=str(output)), log=lines.append)
    assert summary.skipped == 2 and (summary.done, summary.failed, summary.total) == (3, 2, 5)
    assert "skipping 2 rows already done" in " ".join(lines)
    after = {p.name: p.read_bytes() for p in (output / "videos").glob("*.mp4")}
    assert before == after
    results = pd.read_parquet(output / "results")
    assert len(results) == len(GOOD + BAD) and results.id.is_unique
    # The index is the shards its ids hash to, rewritten in place: no Parquet file per run; beside them, each run's
    # metadata (the first run and this one).
    shards = {shard_name(shard_of(row["id"])) for row in GOOD + BAD}
    assert sorted(path.name for path in (output / "results").iterdir()) == sorted([*shards, "_runs"])
    assert len(list((output / "results" / "_runs").glob("*.json"))) == 2
    rerendered = results.set_index("id").loc["beta"]
    assert rerendered.status == "done" and rerendered.checksum == hashlib.sha256(before["beta.mp4"]).hexdigest()


def test_a_changed_row_is_rendered_again(ray_local: None, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.parquet", GOOD[2:])
    run_job(JobConfig(manifest=str(manifest), output=str(tmp_path / "out")), log=lambda _: None)
    write_manifest(manifest, [{**GOOD[2], "seed": 99}])
    summary = run_job(JobConfig(manifest=str(manifest), output=str(tmp_path / "out")), log=lambda _: None)
    assert (summary.skipped, summary.done) == (0, 1)
    assert pd.read_parquet(tmp_path / "out" / "results").set_index("id").loc["gamma.v2"].seed == 99


def test_job_reads_the_manifest_from_and_writes_everything_to_s3(ray_local: None, tmp_path: Path) -> None:
    fs = fsspec.filesystem("s3")
    image = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    with fs.open(f"{BUCKET}/inputs/first.png", "wb") as remote:
        Image.fromarray(image).save(remote, format="PNG")
    from_image = {**GOOD[0], "id": "from-image", "mode": "i2v", "image": f"s3://{BUCKET}/inputs/first.png"}
    # The manifest is a prefix of two files with different columns (only the second has `mode` and `image`).
    fs.put_file(str(write_manifest(tmp_path / "a.parquet", GOOD[:2])), f"{BUCKET}/manifests/day/a.parquet")
    fs.put_file(str(write_manifest(tmp_path / "b.parquet", [BAD[0], from_image])), f"{BUCKET}/manifests/day/b.parquet")
    output = f"s3://{BUCKET}/job-s3"
    summary = run_job(JobConfig(manifest=f"s3://{BUCKET}/manifests/day/", output=output), log=lambda _: None)
    assert (summary.done, summary.failed) == (3, 1)
    for video_id in ("alpha", "beta", "from-image"):
        with fs.open(f"{BUCKET}/job-s3/videos/{video_id}.mp4", "rb") as remote:
            frames, rate = decode(remote)
        num_frames, height, width, fps = EXPECTED["alpha" if video_id == "from-image" else video_id]
        assert frames.shape == (num_frames, height, width, 3) and rate == fps
    assert not fs.exists(f"{BUCKET}/job-s3/_segments/alpha")
    assert not fs.exists(f"{BUCKET}/job-s3/_embeddings")
    results = pd.read_parquet(f"{output}/results").set_index("id")
    assert results.loc["alpha"].uri == f"{output}/videos/alpha.mp4"
    assert results.loc["odd-frames"].status == "failed"


def test_exit_code_is_1_when_some_rows_fail_and_0_when_all_are_done(ray_local: None, tmp_path: Path) -> None:
    mixed = write_manifest(tmp_path / "mixed.parquet", GOOD[2:] + BAD[:1])
    clean = write_manifest(tmp_path / "clean.parquet", GOOD[2:])
    assert main([str(mixed), "--output", str(tmp_path / "mixed")]) == 1
    assert main([str(clean), "--output", str(tmp_path / "clean")]) == 0
    frames, _ = decode(tmp_path / "clean" / "videos" / "gamma.v2.mp4")
    assert frames.shape == (5, 32, 32, 3)


class ResourceWatch(threading.Thread):
    """The least of a Ray resource available while it runs, sampled every 50 ms."""

    def __init__(self, name: str) -> None:
        super().__init__(daemon=True)
        self.name, self.least, self.done = name, ray.cluster_resources()[name], threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            self.least = min(self.least, ray.available_resources().get(self.name, 0.0))


def test_the_job_flags_take_effect(local_run, tmp_path: Path) -> None:
    too_long = {**GOOD[0], "id": "too-long", "num_frames": 13}
    manifest = write_manifest(tmp_path / "m.parquet", [GOOD[0], too_long])
    output = tmp_path / "out"
    watch = ResourceWatch("render_slot")
    watch.start()
    flags = ["--save-latents", "--max-frames", "9", "--crf", "30", "--render-resource", "render_slot=0.25"]
    flags += ["--quality-gate", "sharpness=1e9"]  # noise is sharp, but not that sharp: flagged
    assert main([str(manifest), "--output", str(output), *flags]) == 1
    watch.done.set()
    assert watch.least == 0.75, "the render actor held a quarter of the cluster's render_slot"
    results = pd.read_parquet(output / "results").set_index("id")
    assert results.loc["too-long"].error == "row 'too-long': num_frames: 13 is above --max-frames 9"
    assert results.loc["alpha"].latents_uri == str(output / "latents" / "alpha.safetensors")
    assert Path(results.loc["alpha"].latents_uri).exists()
    video = (output / "videos" / "alpha.mp4").read_bytes()
    assert b" crf=30.0 " in video  # x264 records its settings in the stream
    assert list(results.loc["alpha"].quality_flags) == ["sharpness"], "flagged, and still done"
    assert results.loc["alpha"].status == "done" and not (output / "videos" / "metadata.parquet").exists()
    _, default, _ = local_run  # the same row with the default flags
    assert b" crf=18.0 " in (default / "videos" / "alpha.mp4").read_bytes()
    assert not (default / "latents").exists()


def test_a_manifest_file_that_fails_to_read_fails_the_job_instead_of_dropping_its_rows(
    ray_local: None, tmp_path: Path
) -> None:
    """Render passes may drop a lost block (the row is retried, then failed by name); a read or validation never
    may: its rows would look neither done nor failed. The driver reads only `id`, so a file whose `prompt` column is
    corrupt opens fine and fails in Ray Data's read tasks."""
    path = tmp_path / "m.parquet"
    rows = pa.table({"id": [f"v{number}" for number in range(50)], "prompt": [f"take {n}" for n in range(50)]})
    pq.write_table(rows, path, use_dictionary=False)
    column = pq.ParquetFile(path).metadata.row_group(0).column(1)
    data = bytearray(path.read_bytes())
    data[column.data_page_offset : column.data_page_offset + 16] = b"\xff" * 16  # the prompt page's header
    path.write_bytes(bytes(data))
    assert pq.read_table(path, columns=["id"]).num_rows == 50
    output = tmp_path / "out"
    with pytest.raises(Exception, match="Deserializing page header failed"):
        run_job(JobConfig(manifest=str(path), output=str(output)), log=lambda _: None)
    assert not (output / "videos").exists() and not list(output.glob("results/*.parquet"))


def test_lossless_flag_writes_rgb_masters(ray_local: None, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.parquet", GOOD[:1])
    assert main([str(manifest), "--output", str(tmp_path / "out"), "--lossless"]) == 0
    import av

    with av.open(str(tmp_path / "out" / "videos" / "alpha.mp4")) as container:
        assert container.streams.video[0].codec_context.pix_fmt in {"rgb24", "gbrp"}
        assert container.streams.video[0].codec_context.name == "h264"


def folder_with_conflicting_columns(directory: Path) -> Path:
    (directory / "nightly").mkdir()
    write_manifest(directory / "nightly" / "a.parquet", GOOD[:1])
    write_manifest(directory / "nightly" / "b.parquet", [{**GOOD[1], "prompt": 12345}])
    return directory / "nightly"


@pytest.mark.parametrize(
    ("manifest_of", "args", "message"),
    [
        (lambda d: write_manifest(d / "m.parquet", GOOD), ["--model", "Nope/Nothing"], "unknown model"),
        (lambda d: d / "missing.parquet", [], "does not exist"),
        (lambda d: write_manifest(d / "m.parquet", [{"prompt": "no ids here"}]), [], "no 'id' column"),
        (
            lambda d: (d / "junk.parquet").write_bytes(b"not parquet at all") and d / "junk.parquet",
            [],
            "cannot read manifest",
        ),
        (folder_with_conflicting_columns, [], "cannot read manifest"),
    ],
)
def test_unusable_invocations_exit_2_with_one_line_and_no_traceback(tmp_path: Path, manifest_of, args, message) -> None:
    manifest = manifest_of(tmp_path)
    result = subprocess.run(
        [sys.executable, "jobs/render.py", str(manifest), "--output", str(tmp_path / "out"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_nightly_run_over_a_growing_folder_renders_only_the_new_rows(ray_local: None, tmp_path: Path) -> None:
    folder = tmp_path / "manifests"
    folder.mkdir()
    output = tmp_path / "out"
    write_manifest(folder / "2026-11-23.parquet", GOOD[:2])  # columns: ..., seed, fps
    first = run_job(JobConfig(manifest=str(folder), output=str(output)), log=lambda _: None)
    assert (first.total, first.done, first.skipped) == (2, 2, 0)
    rendered = {path.name: path.stat().st_mtime_ns for path in (output / "videos").glob("*.mp4")}

    write_manifest(folder / "2026-11-24.parquet", GOOD[2:])  # other columns: num_inference_steps, no seed or fps
    second = run_job(JobConfig(manifest=f"{folder}/*.parquet", output=str(output)), log=lambda _: None)
    assert (second.total, second.done, second.skipped, second.failed) == (3, 3, 2, 0)
    assert all((output / "videos" / name).stat().st_mtime_ns == mtime for name, mtime in rendered.items())

    nothing_new = run_job(JobConfig(manifest=str(folder), output=str(output)), log=lambda _: None)
    assert (nothing_new.total, nothing_new.done, nothing_new.skipped, nothing_new.failed) == (3, 3, 3, 0)
    # Three runs into one output: the index is its shards (the runs' parts folded in), no Parquet file per run.
    assert all(path.name.startswith("shard-") for path in (output / "results").glob("*.parquet"))
    assert len(list((output / "results" / "_runs").glob("*.json"))) == 3

    # The index is the rendered dataset: readable by Ray Data (and pandas), one row per video, checksums that match.
    index = ray.data.read_parquet(str(output / "results")).to_pandas().set_index("id")
    assert sorted(index.index) == sorted(EXPECTED) and set(index.status) == {"done"}
    for video_id, row in index.iterrows():
        assert row.checksum == hashlib.sha256(Path(row.uri).read_bytes()).hexdigest()
        assert (row.num_frames, row.height, row.width, row.fps) == EXPECTED[video_id]
    assert json.loads(index.loc["gamma.v2"].params)["num_inference_steps"] == 2


@pytest.mark.parametrize(("longest_first", "expected"), [(True, ["large", "medium", "small"]), (False, None)])
def test_videos_start_longest_first_unless_manifest_order_is_asked(
    ray_local: None, tmp_path: Path, longest_first: bool, expected: list[str] | None
) -> None:
    rows = [
        {"id": "small", "prompt": "a", "num_frames": 5, "height": 32, "width": 32, "num_inference_steps": 2},
        {"id": "medium", "prompt": "b", "num_frames": 9, "height": 32, "width": 48},
        {
            "id": "large",
            "prompt": "c",
            "num_frames": 41,
            "height": 32,
            "width": 32,
            "base_num_frames": 17,
            "overlap_history": 5,
        },
    ]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    config = JobConfig(manifest=str(manifest), output=str(tmp_path / "out"), longest_first=longest_first)
    assert run_job(config, log=lambda _: None).done == 3
    started = pd.read_parquet(tmp_path / "out" / "results").sort_values("render_started").id.tolist()
    assert started == (expected or [row["id"] for row in rows])  # one actor: start order is render order
