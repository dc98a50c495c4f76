"""The writer stage: segments -> one MP4 at `<output>/videos/<id>.mp4`, committed atomically."""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from skyreels_batch import storage
from skyreels_batch.schema import RenderParams
from skyreels_batch.stages import WRITTEN, RowStage
from skyreels_batch.video import encode_mp4


def video_uri(output: str, video_id: str) -> str:
    return storage.join(output, "videos", f"{video_id}.mp4")


class WriteVideos(RowStage):
    """Rendered rows -> `uri`, `checksum` (sha256 of the MP4) and `encode_s`. CPU work: runs as Ray tasks."""

    output_schema = WRITTEN
    failure = "writing the MP4 failed"

    def __init__(self, *, output: str, crf: int, lossless: bool) -> None:
        self.output = output
        self.crf = crf
        self.lossless = lossless

    def process(self, params: RenderParams, row: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        mp4 = encode_mp4(self._frames(row["segments"]), fps=params.fps, crf=self.crf, lossless=self.lossless)
        uri = video_uri(self.output, params.id)
        storage.write_bytes_atomic(uri, mp4)
        storage.remove_tree(storage.join(self.output, "_segments", params.id))
        return {"uri": uri, "checksum": hashlib.sha256(mp4).hexdigest(), "encode_s": time.perf_counter() - started}

    @staticmethod
    def _frames(segment_uris: list[str]) -> Iterator[np.ndarray]:
        """One segment in memory at a time, frame by frame into the encoder."""
        for uri in segment_uris:
            yield from np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)
