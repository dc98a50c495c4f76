"""Checkpoints on object storage, on the loopback S3 endpoint: checked at the door, fetched once per node, never
loaded half-fetched, rendering what the same model renders loaded locally."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import fsspec
import pandas as pd
import pytest
import torch
from diffusers import SkyReelsV2DiffusionForcingPipeline

from skyreels_batch.config import JobConfig
from skyreels_batch.job.cli import main
from skyreels_batch.job.pipeline import run_job
from skyreels_batch.models import card_for
from skyreels_batch.models.checkpoints import fetch_checkpoint
from skyreels_batch.models.embedded import materialize
from tests.conftest import BUCKET, REPO, write_manifest

HUB_ID = "Skywork/SkyReels-V2-DF-1.3B-540P-Diffusers"
ROWS = [
    {"id": "lake", "prompt": "a quiet lake", "num_frames": 9, "height": 32, "width": 48, "seed": 3},
    {"id": "pier", "prompt": "a pier at dawn", "num_frames": 5, "height": 32, "width": 32, "seed": 4},
]


def upload(uri: str, *, skip: tuple[str, ...] = (), extra: dict[str, bytes] | None = None) -> str:
    """The embedded tiny-df's directory at `uri` (but the files under `skip`), plus `extra` files."""
    fs, root = fsspec.core.url_to_fs(uri)
    local = materialize(card_for("tiny-df"))
    for path in sorted(local.rglob("*")):
        name = str(path.relative_to(local))
        if path.is_file() and not name.startswith(skip):
            fs.put_file(str(path), f"{root}/{name}")
    for name, data in (extra or {}).items():
        fs.pipe_file(f"{root}/{name}", data)
    return uri


class Requests(logging.Handler):
    """The object GETs the S3 endpoint served (moto's server logs each request through werkzeug)."""

    LINE = re.compile(r'"GET /([^?\s]+) HTTP')

    def __init__(self) -> None:
        super().__init__()
        self.gets: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        match = self.LINE.search(record.getMessage())
        if match:
            self.gets[match.group(1)] += 1


@pytest.fixture
def requests_served(s3_endpoint: str):
    handler = Requests()
    logger = logging.getLogger("werkzeug")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def set_pipeline(uri: str, class_name: str) -> None:
    fs, root = fsspec.core.url_to_fs(uri)
    index = json.loads(fs.cat_file(f"{root}/model_index.json"))
    fs.pipe_file(f"{root}/model_index.json", json.dumps({**index, "_class_name": class_name}).encode())


SHARD = "diffusion_pytorch_model-00002-of-00002.safetensors"
SHARD_INDEX = json.dumps({"weight_map": {"decoder.conv_in.weight": SHARD}})
# Each bad checkpoint: how it is made from the embedded model's directory, and the line the job exits 2 with.
BAD = {
    "missing": (lambda uri: None, "nothing there (no such prefix)"),
    "not-diffusers": (
        lambda uri: upload(uri, skip=("model_index.json",)),
        "no model_index.json, not a diffusers directory",
    ),
    "another-pipeline": (
        lambda uri: (upload(uri), set_pipeline(uri, "WanPipeline")),
        "pipeline 'WanPipeline' is not a SkyReels-V2 pipeline",
    ),
    "no-weights": (
        lambda uri: upload(uri, skip=("transformer/diffusion_pytorch_model",)),
        "transformer/ has no weights (*.safetensors or *.bin)",
    ),
    "missing-shard": (
        lambda uri: upload(uri, extra={"vae/diffusion_pytorch_model.safetensors.index.json": SHARD_INDEX.encode()}),
        f"vae/ lacks {SHARD} (1 of its shards)",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_checkpoint_url_exits_2_with_one_line_before_any_work(
    s3_endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture, case: str
) -> None:
    uri = f"s3://{BUCKET}/bad-models/{case}"
    make, message = BAD[case]
    make(uri)
    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    output = tmp_path / "out"
    capsys.readouterr()  # what building the embedded model printed
    assert main([str(manifest), "--output", str(output), "--model", uri]) == 2
    assert capsys.readouterr().err == f"error: checkpoint {uri}: {message}\n"
    assert not output.exists()


def test_a_registry_card_takes_its_mirror_and_keeps_its_defaults(s3_endpoint: str, monkeypatch) -> None:
    mirror = f"s3://{BUCKET}/mirror"
    monkeypatch.setenv("SKYREELS_BATCH_MIRROR", mirror)
    upload(f"{mirror}/{HUB_ID}")  # the embedded model's files, as if mirrored: only the listing matters here
    card = card_for(HUB_ID)
    assert card.uri == f"{mirror}/{HUB_ID}" and card.defaults.height == 544 and card.name == HUB_ID


def test_hub_ids_honour_hf_hub_offline_at_the_door(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    assert main([str(manifest), "--output", str(tmp_path / "out"), "--model", HUB_ID]) == 2
    assert "not in the HuggingFace cache and HF_HUB_OFFLINE is set" in capsys.readouterr().err


@pytest.mark.slow
def test_a_job_renders_from_the_bucket_what_the_local_model_renders_fetching_each_file_once(
    ray_local: None, tmp_path: Path, requests_served: Requests
) -> None:
    uri = upload(f"s3://{BUCKET}/models/once-per-node")
    prefix = f"{BUCKET}/models/once-per-node/"
    uploaded = {path.removeprefix(prefix) for path in fsspec.filesystem("s3").find(prefix)}
    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    config = JobConfig(manifest=str(manifest), output=str(tmp_path / "remote"), model=uri, min_workers=2, max_workers=2)
    assert run_job(config, log=lambda _: None).done == 2
    # The same job with the embedded model loaded from the local cache. Both renders run in fresh render actors at
    # the same torch threads: once, CI saw this test's own process render the row differently from an actor in the
    # last bits (an in-process reference passed everywhere else), so the reference is made where the job renders.
    local = config.model_copy(update={"output": str(tmp_path / "local"), "model": "tiny-df"})
    assert run_job(local, log=lambda _: None).done == 2
    for row in ROWS:
        name = f"videos/{row['id']}.mp4"
        assert (tmp_path / "remote" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()

    fetched = {key.removeprefix(prefix): count for key, count in requests_served.gets.items() if key.startswith(prefix)}
    # Every file once for the node (two render actors and a text encoder), and the two files the driver's check at
    # the door reads once more.
    at_the_door = {"model_index.json", "skyreels_batch_card.json"}
    assert fetched == {name: 2 if name in at_the_door else 1 for name in uploaded}
    (runs,) = (tmp_path / "remote" / "results" / "_runs").glob("*.json")
    loads = json.loads(runs.read_text())["model_loads"]
    assert sorted(load["stage"] for load in loads) == ["render", "render", "text"]
    assert sum(load["fetched_files"] for load in loads) == len(uploaded)
    assert all(load["fetch_s"] >= 0 and load["read_s"] > 0 for load in loads)
    assert len(pd.read_parquet(tmp_path / "remote" / "results")) == 2  # the run metadata is not read as rows


@pytest.mark.slow
def test_a_fetch_killed_midway_is_never_loaded_and_the_next_one_completes_it(s3_endpoint: str, tmp_path: Path) -> None:
    padding = os.urandom(96 << 20)  # a large file in the transformer's folder, so the fetch is killed inside it
    uri = upload(f"s3://{BUCKET}/models/killed", extra={"transformer/padding.dat": padding})
    cache = tmp_path / "cache"
    fetch = (
        f"from skyreels_batch.models.checkpoints import fetch_checkpoint; fetch_checkpoint({uri!r}, text_encoder=False)"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", fetch], cwd=REPO, env={**os.environ, "SKYREELS_BATCH_CACHE": str(cache)}
    )
    deadline = time.monotonic() + 120
    while not list(cache.glob("checkpoints/*/.staging-transformer/transformer/padding.dat.partial")):
        assert process.poll() is None and time.monotonic() < deadline, "the fetch ended before it could be killed"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    (local,) = [path for path in cache.glob("checkpoints/*") if path.is_dir()]
    assert not (local / "transformer").exists() and not (local / ".parts" / "transformer.json").exists()

    os.environ["SKYREELS_BATCH_CACHE"], saved = str(cache), os.environ["SKYREELS_BATCH_CACHE"]
    try:
        completed = fetch_checkpoint(uri, text_encoder=False)
    finally:
        os.environ["SKYREELS_BATCH_CACHE"] = saved
    render_files = [path for path in local.rglob("*") if path.is_file() and ".parts" not in path.parts]
    assert 1 <= completed.files < len(render_files), "the whole files staged before the kill are kept"
    assert (local / "transformer" / "padding.dat").read_bytes() == padding
    pipeline = SkyReelsV2DiffusionForcingPipeline.from_pretrained(local, text_encoder=None, tokenizer=None)
    reference = SkyReelsV2DiffusionForcingPipeline.from_pretrained(materialize(card_for("tiny-df")))
    for name, weight in reference.transformer.state_dict().items():
        torch.testing.assert_close(pipeline.transformer.state_dict()[name], weight, rtol=0, atol=0)
