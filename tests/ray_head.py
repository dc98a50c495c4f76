"""A throwaway `ray start --head` on free ports and its own temp dir, stopped without touching other Ray
processes on the machine (`ray stop` would kill every one of them)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class RayHead:
    address: str  # GCS address, for `ray.init(address=...)`
    dashboard: str  # HTTP address, for `ray job submit --address`
    env: dict[str, str]  # what a client process needs: auth mode matching the head's


@contextlib.contextmanager
def ray_head(
    num_cpus: int = 2, env: dict[str, str] | None = None, extra_args: tuple[str, ...] = (), gcs_port: int | None = None
) -> Iterator[RayHead]:
    # Short path: Ray's unix sockets live under the temp dir and their paths are length-limited.
    temp_dir = tempfile.mkdtemp(prefix="rh-", dir="/tmp")
    gcs_port, dashboard_port = gcs_port or free_port(), free_port()
    # Ray 2.60 turns token authentication on by default for `ray start`; this head is local and throwaway.
    head_env = {**os.environ, **(env or {}), "RAY_AUTH_MODE": "disabled"}
    command = [
        "ray",
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        f"--port={gcs_port}",
        f"--dashboard-port={dashboard_port}",
        "--dashboard-host=127.0.0.1",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        f"--temp-dir={temp_dir}",
        f"--ray-client-server-port={free_port()}",
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        *extra_args,
    ]
    process = subprocess.Popen(
        command, env=head_env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_for_jobs_api(dashboard, process)
        yield RayHead(address=f"127.0.0.1:{gcs_port}", dashboard=dashboard, env={"RAY_AUTH_MODE": "disabled"})
    finally:
        _stop(process, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_jobs_api(dashboard: str, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start --head exited with {process.returncode}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{dashboard}/api/jobs/", timeout=2).ok:
                return
        time.sleep(1)
    raise TimeoutError(f"Ray head's job API at {dashboard} did not come up in {timeout_s}s")


def stop_processes_under(temp_dir: str) -> None:
    """Kill every process whose command line mentions `temp_dir` (a Ray instance's temp/session dir)."""
    leftovers = _ours(temp_dir)
    for proc in leftovers:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(leftovers, timeout=10)
    shutil.rmtree(temp_dir, ignore_errors=True)


def _ours(temp_dir: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                found.append(proc)
    return found


def _stop(process: subprocess.Popen, temp_dir: str) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=20)
    # Workers and agents started by the head carry its temp/session dir on their command line.
    stop_processes_under(temp_dir)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def run_with_own_ray(command: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A Python process that starts a local Ray of its own (stopped afterwards), its stdout and stderr captured."""
    ray_tmp = tempfile.mkdtemp(prefix="rk-", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        return subprocess.run(
            [sys.executable, *command],
            cwd=REPO_ROOT,
            env={**os.environ, **(env or {}), "RAY_TMPDIR": ray_tmp},
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        stop_processes_under(ray_tmp)
