"""bench/gpu.py, the script a lent GPU runs, run here at toy size on the CPU so that it cannot rot between GPUs;
with Ray and PyAV made unimportable, as on the GPU machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

WITHOUT_RAY_OR_PYAV = """
import runpy, sys
sys.modules["ray"] = None  # `import ray` now raises ImportError, as where Ray is not installed
sys.modules["av"] = None
sys.argv = ["bench/gpu.py", "--tiny", "--out", sys.argv[1]]
runpy.run_path("bench/gpu.py", run_name="__main__")
"""


def test_the_gpu_bench_runs_every_run_at_toy_size_without_ray(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_RAY_OR_PYAV, str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    runs = {run["run"]: run for run in report["runs"]}
    timed = ["a", "b", "c", "d:default", "d:compile (first video)", "d:compile", "d:offload model", "d:offload group"]
    for name in timed:
        assert "error" not in runs[name], runs[name]
        assert runs[name]["seconds"] > 0 and 0 < runs[name]["transformer_s"] < runs[name]["seconds"], runs[name]
        assert runs[name]["pflop"] > 0
    # Guidance doubles the passes: 4 steps for a and b, 5 for the five-step runs, 4 per segment for c.
    assert runs["a"]["transformer_passes"] == runs["b"]["transformer_passes"] == 2 * 4
    assert runs["d:default"]["transformer_passes"] == 2 * 5 and runs["c"]["segments"] == 2
    assert runs["c"]["transformer_passes"] == 2 * 2 * 4
    # The job's render path gives the frames diffusers' own call gives (fp32 on the CPU: the same).
    assert runs["b"]["psnr_db"] >= 40 and runs["b"]["max_abs_diff"] <= 1
    loads = report["model_loads"]  # each set of stages' model loads: no fetch (embedded), read, to device
    assert {load["stage"] for load in loads} == {"text", "render"}
    assert all(load["fetch_s"] == 0 and load["read_s"] > 0 for load in loads)
    for name in ("d:compile", "d:offload model", "d:offload group", "d:attention _native_math"):
        assert runs[name]["max_abs_diff_vs_default"] <= 2, runs[name]
    assert runs["e"]["seconds_per_prompt"] > 0
    # f: the step caches; none skips nothing, every cache skips some of the ten steps' 20 passes.
    assert runs["f:cache none"]["passes"] == 20 and runs["f:cache none"]["skipped"] == 0
    assert all(runs[f"f:cache {spec}"]["skipped"] > 0 for spec in ("first_block:0.2", "taylorseer:4"))
    # g: one asynchronous forward each way, its memory measured in its own process.
    dense, blocked = runs["g:async 720P forward, dense"], runs["g:async 720P forward, block mask"]
    assert (
        dense["seconds"] > 0
        and blocked["seconds"] > 0
        and abs(blocked["mean_abs_out"] / dense["mean_abs_out"] - 1) < 1e-3
    )
    # A backend that does not run here says why instead of stopping the bench.
    assert "not usable" in runs["d:attention sage"]["error"]
    assert "Self CPU" in (tmp_path / "profile.txt").read_text()
    table = (tmp_path / "gpu.md").read_text()
    assert table.startswith("Device: cpu") and "| b |" in table
