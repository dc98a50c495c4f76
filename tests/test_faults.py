"""Faults on a real local Ray: render actors SIGKILLed mid-video are replaced and their rows retried."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from skyreels_batch.config import JobConfig
from skyreels_batch.job.cli import main
from skyreels_batch.job.pipeline import run_job
from tests.conftest import write_manifest
from tests.test_long_job import LONG, SHORT

pytestmark = pytest.mark.slow


def kill_render_actor() -> int:
    """SIGKILL the newest render actor process (Ray titles it after its stage) and wait until it is gone; returns
    its pid. The newest: an earlier pass's replacement actor may still be shutting down beside the current one."""
    actors = [
        proc
        for proc in psutil.process_iter(["cmdline", "create_time"])
        if any("MapBatches(RenderVideos)" in part for part in proc.info["cmdline"] or [])
    ]
    assert actors, "no render actor process found"
    newest = max(actors, key=lambda proc: proc.info["create_time"])
    os.kill(newest.pid, signal.SIGKILL)
    psutil.wait_procs([newest], timeout=10)
    return newest.pid


def finished_segments(folder: Path) -> int:
    return len(list(folder.glob("*.safetensors"))) if folder.exists() else 0


class Killer(threading.Thread):
    """Kills the render actor each time the video in `folder` has finished `after` more segments, `times` times."""

    def __init__(self, folder: Path, *, times: int, after: int = 2) -> None:
        super().__init__(daemon=True)
        self.folder, self.times, self.after = folder, times, after
        self.kills: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        seen = 0
        while len(self.kills) < self.times and not self.stop.is_set():
            if finished_segments(self.folder) >= seen + self.after:
                self.kills.append(kill_render_actor())
                # Counted once the actor is dead: a segment it committed while dying is not the next actor's.
                seen = finished_segments(self.folder)
            time.sleep(0.01)


def test_a_killed_render_actor_is_replaced_and_its_video_resumes(ray_local: None, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.parquet", [LONG])
    run_job(JobConfig(manifest=str(manifest), output=str(tmp_path / "reference")), log=lambda _: None)

    output = tmp_path / "out"
    killer = Killer(output / "_segments" / LONG["id"], times=1)
    killer.start()
    summary = run_job(JobConfig(manifest=str(manifest), output=str(output)), log=lambda _: None)
    killer.stop.set()
    assert len(killer.kills) == 1, "the actor was not killed mid-video"
    assert (summary.done, summary.failed) == (1, 0)
    results = pd.read_parquet(output / "results").set_index("id")
    assert results.loc[LONG["id"]].resumed_segments >= 2
    name = f"videos/{LONG['id']}.mp4"
    assert (output / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()


def test_a_row_that_keeps_killing_its_actor_fails_alone_after_max_retries(ray_local: None, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.parquet", [LONG, SHORT])
    output = tmp_path / "out"
    killer = Killer(output / "_segments" / LONG["id"], times=2, after=1)  # the first try and the one retry
    killer.start()
    assert main([str(manifest), "--output", str(output), "--max-retries", "1"]) == 1  # some rows failed
    killer.stop.set()
    assert len(killer.kills) == 2
    results = pd.read_parquet(output / "results").set_index("id")
    assert results.loc["short"].status == "done"
    failed = results.loc[LONG["id"]]
    assert failed.status == "failed" and failed.error == (
        f"row {LONG['id']!r}: lost 2 times, the last time while rendering it, when its render actor died (out of "
        "memory, a lost node or a crash); gave up (--max-retries)"
    )
    assert not (output / "videos" / f"{LONG['id']}.mp4").exists()
