"""Admission into a render pass: rows one per block, handed out as fast as the render pool takes them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pyarrow as pa

from skyreels_batch.control import admit
from skyreels_batch.render.embeddings import EmbeddingStore, texts_for
from skyreels_batch.schema import RenderParams

if TYPE_CHECKING:
    from ray.actor import ActorHandle


class AdmitRows:
    """Validated rows -> the same rows, one per block, each once the job control admits it.

    One row per block is what spreads videos over the render pool: an actor takes a whole block. Ray Data's
    backpressure counts bytes, and one-row blocks are a few hundred, so without a limit a pass would cut its whole
    work list into one-row objects at once; the job control admits a row only while fewer than its window of rows
    wait for a render actor. Once the job is stopping, nothing more is handed out. A generator: the pass runs one
    of these at a time, so rows leave in the work list's order. The job control also learns which embedding files
    each row needs: they stay while a row in flight needs them.
    """

    def __init__(self, control: ActorHandle | None = None, embeddings: EmbeddingStore | None = None) -> None:
        self.control = control
        self.embeddings = embeddings

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        rows = zip(batch["id"].to_pylist(), batch["params"].to_pylist(), strict=True)
        for index, (video_id, params) in enumerate(rows):
            if not admit(self.control, video_id, self._needs(params)):
                return
            yield batch.take([index])  # a copy: a slice would carry (and serialize) the whole block's buffers

    def _needs(self, params: str | None) -> list[str]:
        if self.embeddings is None or params is None:  # a row that failed validation needs nothing
            return []
        return [self.embeddings.uri(text) for text in texts_for(RenderParams.model_validate_json(params))]
