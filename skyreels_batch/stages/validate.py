"""Validate manifest rows at the door: schema and model card, before any GPU time is spent."""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping

import pyarrow as pa

from skyreels_batch.models import ModelCard
from skyreels_batch.schema import RowError, plan_for, resolve, row_label
from skyreels_batch.stages import VALIDATED, table


class ValidateRows:
    """Manifest rows -> `id`, `params` (resolved JSON), the plan's size and whether an earlier run already made
    this video (`skipped`), or `error`. Cheap: plain Ray tasks."""

    def __init__(
        self,
        card: ModelCard,
        *,
        max_frames: int,
        duplicate_ids: Collection[str],
        done: Mapping[str, str] | None = None,
    ) -> None:
        self.card = card
        self.max_frames = max_frames
        self.duplicate_ids = frozenset(duplicate_ids)
        self.done = dict(done or {})  # id -> request hash of rows an earlier run finished

    def __call__(self, batch: pa.Table) -> pa.Table:
        return table([self.validate(raw) for raw in batch.to_pylist()], VALIDATED)

    def validate(self, raw: dict) -> dict:
        video_id = raw.get("id")
        shown_id = video_id if isinstance(video_id, str) else repr(video_id)
        if video_id in self.duplicate_ids:
            return {"id": shown_id, "error": f"{row_label(raw)}: id: appears more than once in the manifest"}
        try:
            params = resolve(raw, self.card, max_frames=self.max_frames)
        except RowError as error:
            return {"id": shown_id, "error": str(error)}
        plan = plan_for(params)
        request = params.model_dump_json()
        request_hash = hashlib.sha256(request.encode()).hexdigest()
        return {
            "id": params.id,
            "params": request,
            "request_hash": request_hash,
            "skipped": self.done.get(params.id) == request_hash,
            "num_segments": len(plan.segments),
            "cost": plan.cost,
        }
