"""Shared fixtures: a real local Ray, a real S3 endpoint on loopback (moto's server), small manifests."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import av
import boto3
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from skyreels_batch.job.manifest import write_manifest  # noqa: F401 - re-exported for the tests
from skyreels_batch.output.results import RESULTS
from skyreels_batch.output.video import encode_mp4
from skyreels_batch.stages.encode import EncodePrompts
from skyreels_batch.stages.render import RenderVideos

REPO = Path(__file__).resolve().parent.parent
BUCKET = "renders"


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Embedded models are built into a per-session cache, so tests never depend on a developer's cache."""
    cache = tmp_path_factory.mktemp("model-cache")
    os.environ["SKYREELS_BATCH_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 endpoint on 127.0.0.1 (moto server mode) reached through the standard AWS_* variables."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="test-key-id",
        AWS_SECRET_ACCESS_KEY="test-secret",
        AWS_DEFAULT_REGION="us-east-1",
    )
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def ray_local(s3_endpoint: str, model_cache: Path) -> Iterator[None]:
    """One local Ray for the session. Started after the S3 endpoint so its workers inherit AWS_*. It offers one
    `render_slot`, a custom resource for `--render-resource`."""
    import ray

    if ray.is_initialized():  # a test before the first that asks for this one made Ray start itself (ray.data does)
        ray.shutdown()
    ray.init(
        num_cpus=2,
        resources={"render_slot": 1},
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    yield
    ray.shutdown()


def decode(source) -> tuple[np.ndarray, float]:
    """All frames of an MP4 as uint8 RGB [T, H, W, 3], and its frame rate."""
    with av.open(source) as container:
        stream = container.streams.video[0]
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])
        return frames, float(stream.average_rate)


class EncodeThenRender(RenderVideos):
    """The render stage with the text-encoding stage in front of it on the same output, as the job chains them."""

    def __init__(self, card, *, output: str, device: str = "cpu", torch_threads: int = 2, **options) -> None:
        super().__init__(card, output=output, device=device, torch_threads=torch_threads, **options)
        self.encode = EncodePrompts(
            card, output=output, device=device, torch_threads=torch_threads, options=options.get("options")
        )

    def __call__(self, batch):
        return super().__call__(self.encode(batch))


def noise_image(path: Path, seed: int, size: tuple[int, int] = (48, 32)) -> str:
    """A PNG of random pixels (width x height); different seeds give different images."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def write_clip(path: Path, seed: int, frames: int = 21) -> str:
    """A lossless RGB MP4 of random frames (32x48): decoding it gives back exactly these pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (frames, 32, 48, 3), dtype=np.uint8)
    path.write_bytes(encode_mp4(iter(pixels), fps=24, crf=0, lossless=True))
    return str(path)


def distinct(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame's distinct rows: `drop_duplicates` over every column but the index's list columns (pandas reads
    them back as arrays, which it cannot hash)."""
    lists = {field.name for field in RESULTS if pa.types.is_list(field.type)}
    return frame.drop_duplicates(subset=[column for column in frame.columns if column not in lists])
