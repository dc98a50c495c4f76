"""Runs of days stay bounded: what a run keeps under its output holds only the rows in flight."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from skyreels_batch.config import JobConfig
from skyreels_batch.job.pipeline import run_job
from tests.conftest import write_manifest

pytestmark = pytest.mark.slow

TINY = {"num_frames": 5, "height": 32, "width": 32, "num_inference_steps": 2}


def run_sampling(config: JobConfig, sample) -> tuple[object, list]:
    """Run the job on a thread and call `sample()` every 50 ms while it runs; returns its summary and the samples."""
    summary, samples = [], []
    job = threading.Thread(target=lambda: summary.append(run_job(config, log=lambda _: None)))
    job.start()
    while job.is_alive():
        samples.append(sample())
        time.sleep(0.05)
    job.join()
    return summary[0], samples


def test_work_folders_hold_only_the_rows_in_flight(ray_local: None, tmp_path: Path) -> None:
    rows = [{**TINY, "id": f"clip-{number}", "prompt": f"a lantern number {number}"} for number in range(12)]
    output = tmp_path / "out"
    embeddings = output / "_embeddings"
    embeddings.mkdir(parents=True)
    (embeddings / "from-a-killed-run.safetensors").write_bytes(b"stale")
    config = JobConfig(manifest=str(write_manifest(tmp_path / "m.parquet", rows)), output=str(output))

    def sample() -> tuple[int, int]:
        return len(list(embeddings.glob("*.safetensors"))), len(list((output / "_segments").glob("*")))

    summary, samples = run_sampling(config, sample)
    assert summary.done == len(rows)
    embedding_files, segment_dirs = zip(*samples, strict=True)
    # One render actor here: a window of 4 rows waiting, 1 rendering, and the negative prompt they share.
    assert max(embedding_files) <= 4 + 1 + 1, embedding_files
    assert not embeddings.exists()
    # Segments: the row rendering, and the window of 4 rows waiting (for it, or rendered for the writer).
    assert 0 < max(segment_dirs) <= 1 + 4, segment_dirs


def test_the_segments_of_a_row_that_failed_for_good_are_removed(ray_local: None, tmp_path: Path) -> None:
    rows = [{**TINY, "id": name, "prompt": "a kite", "num_frames": 41} for name in ("blocked", "fine")]
    output = tmp_path / "out"
    (output / "videos" / "blocked.mp4").mkdir(parents=True)  # its MP4 can never be written: the writer fails
    config = JobConfig(manifest=str(write_manifest(tmp_path / "m.parquet", rows)), output=str(output))
    summary, seen = run_sampling(config, lambda: {path.name for path in (output / "_segments").glob("*/*")})
    assert (summary.done, summary.failed) == (1, 1)
    assert any(name.endswith(".safetensors") for name in set().union(*seen)), "segments were persisted"
    assert not (output / "_segments" / "blocked").exists()
