"""Validate manifest rows at the door: schema and model card, before any GPU time is spent."""

from __future__ import annotations

from collections.abc import Collection

import pyarrow as pa

from skyreels_batch.models import ModelCard
from skyreels_batch.schema import RowError, plan_for, resolve, row_label
from skyreels_batch.stages import VALIDATED, table


class ValidateRows:
    """Manifest rows -> `id`, `params` (resolved JSON) and the plan's size, or `error`. Cheap: plain Ray tasks."""

    def __init__(self, card: ModelCard, *, max_frames: int, duplicate_ids: Collection[str]) -> None:
        self.card = card
        self.max_frames = max_frames
        self.duplicate_ids = frozenset(duplicate_ids)

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
        return {
            "id": params.id,
            "params": params.model_dump_json(),
            "num_segments": len(plan.segments),
            "cost": plan.cost,
        }
