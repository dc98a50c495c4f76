"""One run owns an output: the lease on local disk and on the loopback S3 endpoint."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import fsspec
import pytest

from skyreels_batch.config import JobConfig
from skyreels_batch.job import lease as lease_module
from skyreels_batch.job.cli import main
from skyreels_batch.job.lease import Lease, OutputTaken, lease_uri
from skyreels_batch.job.pipeline import run_job
from skyreels_batch.output.results import read_index
from tests.conftest import BUCKET, write_manifest


@pytest.fixture(params=["local", "s3"])
def output(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "s3":
        request.getfixturevalue("s3_endpoint")
        return f"s3://{BUCKET}/lease-{uuid.uuid4().hex[:8]}"
    return str(tmp_path / "out")


def owner_of(output: str) -> dict:
    # One GET: an S3 file object reads with If-Match on the ETag it saw first, which a heartbeat may have replaced.
    fs, path = fsspec.core.url_to_fs(lease_uri(output))
    fs.invalidate_cache(path)
    return json.loads(fs.cat_file(path))


def plant(output: str, **owner) -> None:
    """A lease left by another run."""
    now = time.time()
    text = json.dumps(
        {"run": "other-run", "host": socket.gethostname(), "pid": 1, "started": now, "heartbeat": now, **owner}
    )
    fs, path = fsspec.core.url_to_fs(lease_uri(output))
    fs.makedirs(fs._parent(path), exist_ok=True)
    fs.pipe_file(path, text.encode())


def test_a_second_run_is_refused_naming_the_owner_and_the_lease_goes_with_its_run(output: str) -> None:
    lines: list[str] = []
    with Lease(output, "first", log=lines.append, on_lost=lambda: None):
        assert owner_of(output)["run"] == "first"
        with pytest.raises(OutputTaken, match=r"is in use by run first \(host .*, pid \d+, last heartbeat \d+ s ago\)"):
            Lease(output, "second", log=lines.append, on_lost=lambda: None).take()
    fs, path = fsspec.core.url_to_fs(lease_uri(output))
    assert not fs.exists(path) and not lines


def test_a_lease_whose_owner_is_gone_is_taken_over_with_a_log_line(output: str) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    cases = {
        "its process": {"pid": int(gone.stdout)},
        "no heartbeat from another-host for": {"host": "another-host", "heartbeat": time.time() - 600},
    }
    for why, owner in cases.items():
        plant(output, **owner)
        lines: list[str] = []
        with Lease(output, "mine", log=lines.append, on_lost=lambda: None):
            assert owner_of(output)["run"] == "mine"
        assert len(lines) == 1 and "from run other-run" in lines[0] and why in lines[0], lines


def test_a_live_owner_elsewhere_keeps_its_lease(output: str) -> None:
    plant(output, host="another-host", heartbeat=time.time() - 30)
    with pytest.raises(OutputTaken, match="in use by run other-run \\(host another-host"):
        Lease(output, "mine", log=print, on_lost=lambda: None).take()
    assert owner_of(output)["run"] == "other-run"


@pytest.mark.parametrize("round", range(5))  # a race: several rounds (one in a few found two winners before)
def test_of_runs_taking_one_stale_lease_at_once_exactly_one_wins(output: str, round: int) -> None:
    plant(output, host="another-host", heartbeat=time.time() - 600)
    barrier, won, refused = threading.Barrier(4), [], []

    def take(run: str) -> None:
        barrier.wait()
        try:
            won.append(Lease(output, run, log=lambda _: None, on_lost=lambda: None).take())
        except OutputTaken:
            refused.append(run)

    threads = [threading.Thread(target=take, args=(f"run-{number}",)) for number in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert len(won) == 1 and len(refused) == 3, (won, refused)
        assert owner_of(output)["run"] == won[0].owner.run
    finally:
        for lease in won:
            lease.release()


def test_a_run_that_loses_its_lease_is_told_to_stop(output: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lease_module, "HEARTBEAT_S", 0.2)
    stopped = threading.Event()
    lease = Lease(output, "mine", log=lambda _: None, on_lost=stopped.set).take()
    beat = owner_of(output)["heartbeat"]
    time.sleep(0.5)
    assert owner_of(output)["heartbeat"] > beat, "the heartbeat is renewed"
    plant(output, run="usurper")  # an operator removed the lease and another run took it
    assert stopped.wait(5)
    lease.release()
    assert owner_of(output)["run"] == "usurper", "a lost lease is not removed by its old owner"


@pytest.mark.slow
def test_the_same_command_started_while_a_run_goes_on_exits_2_and_changes_nothing(
    ray_local: None, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rows = [{"id": f"clip-{n}", "prompt": "a lamp", "num_frames": 21, "height": 32, "width": 32} for n in range(4)]
    manifest, output = str(write_manifest(tmp_path / "m.parquet", rows)), tmp_path / "out"
    summary = []
    config = JobConfig(manifest=manifest, output=str(output))
    first = threading.Thread(target=lambda: summary.append(run_job(config, log=lambda _: None)))
    first.start()
    while not (output / "_lease").exists():
        time.sleep(0.05)
    owner = owner_of(str(output))["run"]
    capsys.readouterr()
    assert main([manifest, "--output", str(output)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: --output {output} is in use by run {owner} (host "), line
    first.join()
    assert (summary[0].done, summary[0].failed) == (len(rows), 0)
    index = read_index(str(output))
    assert sorted(index.id) == [row["id"] for row in rows] and set(index.status) == {"done"}
    assert not (output / "_lease").exists()


def test_an_unreadable_lease_is_refused_naming_the_file(output: str) -> None:
    fs, path = fsspec.core.url_to_fs(lease_uri(output))
    fs.makedirs(fs._parent(path), exist_ok=True)
    fs.pipe_file(path, b"not a lease")
    with pytest.raises(OutputTaken, match=r"_lease is unreadable \(.*\): remove it if no run uses this output"):
        Lease(output, "mine", log=print, on_lost=lambda: None).take()
