"""The render stage: a pool of actors, each holding one SkyReels-V2 pipeline."""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import torch

from skyreels_batch import storage
from skyreels_batch.models import ModelCard
from skyreels_batch.pipelines import load_pipeline, render
from skyreels_batch.schema import RenderParams
from skyreels_batch.stages import RENDERED, RowStage
from skyreels_batch.video import to_uint8


def segment_uri(output: str, video_id: str, index: int) -> str:
    return storage.join(output, "_segments", video_id, f"{index:05d}.npy")


class RenderVideos(RowStage):
    """Validated rows -> frames persisted under `<output>/_segments/<id>/`, their URIs and the render time.

    Frames go to storage, not into the batch: a 97-frame 544x960 video is 150 MB of uint8, which Ray Data's
    object store would otherwise hold and spill.
    """

    output_schema = RENDERED
    failure = "render failed"

    def __init__(self, card: ModelCard, *, output: str, device: str, torch_threads: int) -> None:
        torch.set_num_threads(torch_threads)
        self.card = card
        self.output = output
        self.pipeline = load_pipeline(card, device)

    def process(self, params: RenderParams, row: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        frames = to_uint8(render(self.pipeline, params, self.card.family))
        render_s = time.perf_counter() - started
        uri = segment_uri(self.output, params.id, 0)
        buffer = io.BytesIO()
        np.save(buffer, frames, allow_pickle=False)
        storage.write_bytes_atomic(uri, buffer.getvalue())
        return {"segments": [uri], "render_s": render_s}
