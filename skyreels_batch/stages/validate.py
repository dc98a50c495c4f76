"""Validate manifest rows at the door: schema and model card, before any GPU time is spent."""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from typing import Any

import pyarrow as pa

from skyreels_batch.models import ModelCard
from skyreels_batch.schema import RowError, check_split, plan_for, resolve, row_label
from skyreels_batch.stages import VALIDATED, table

# What the driver plans a job by, for every manifest row: small enough to hold for a million rows.
PLANNED = pa.schema(
    [
        ("id", pa.string()),
        ("error", pa.string()),
        ("request_hash", pa.string()),
        ("num_segments", pa.int64()),
        ("cost", pa.int64()),
        ("work", pa.int64()),  # transformer passes x pixels per frame: the longest-first order
    ]
)


class ValidateRows:
    """Manifest rows -> `id`, `params` (resolved JSON), the plan's size, or `error`.

    The render pass's first stage: the driver holds manifest rows, not resolved ones (a million rows' parameters
    would be a gigabyte), so each row is resolved again as it enters the pass, as it was when the job was planned.
    Cheap: plain Ray tasks."""

    def __init__(
        self,
        card: ModelCard,
        *,
        max_frames: int,
        duplicate_ids: Collection[str] = (),
        ranks: int = 1,
        maskless_backend: str | None = None,
        compiled: bool = False,
    ) -> None:
        self.card = card
        self.max_frames = max_frames
        self.duplicate_ids = frozenset(duplicate_ids)
        self.ranks = ranks  # --gpus-per-video
        # --attention-backend, when it takes no attention mask: a split video's asynchronous rows need one
        self.maskless_backend = maskless_backend
        self.compiled = compiled  # --compile

    def __call__(self, batch: pa.Table) -> pa.Table:
        return table([self.validate(raw) for raw in batch.to_pylist()], VALIDATED)

    def validate(self, raw: dict[str, Any]) -> dict[str, Any]:
        video_id = raw.get("id")
        shown_id = video_id if isinstance(video_id, str) else repr(video_id)
        if video_id in self.duplicate_ids:
            return {"id": shown_id, "error": f"{row_label(raw)}: id: appears more than once in the manifest"}
        try:
            params = resolve(raw, self.card, max_frames=self.max_frames)
            if params.height is not None:  # rows sized by their image are fitted to the split when rendered
                check_split(params.height, params.width, self.ranks, row_label(raw))
            if params.cache and self.ranks > 1:
                raise RowError(
                    f"{row_label(raw)}: cache: not with --gpus-per-video {self.ranks}: each rank would judge the "
                    "skip on its own share of the tokens (FirstBlockCache) and ranks that disagree wait forever"
                )
            if params.cache and self.compiled:
                raise RowError(
                    f"{row_label(raw)}: cache: not with --compile: diffusers' cache hooks decide between blocks, on "
                    "the host, which a block compiled whole (fullgraph) cannot hold"
                )
            if self.maskless_backend and params.causal_block_size > 1 and self.ranks > 1:
                raise RowError(
                    f"{row_label(raw)}: causal_block_size: {params.causal_block_size} with --gpus-per-video "
                    f"{self.ranks} makes the transformer attend with a dense mask (flex attention's BlockMask has no "
                    f"context parallelism), which --attention-backend {self.maskless_backend} does not take; use "
                    "causal_block_size 1, or a backend that takes a mask (native, ...)"
                )
        except RowError as error:
            return {"id": shown_id, "error": str(error)}
        plan = plan_for(params)
        request = params.model_dump_json()
        # Rows sized by their image have no size yet: the model's default area stands in for it.
        pixels = (params.height or self.card.defaults.height) * (params.width or self.card.defaults.width)
        return {
            "id": params.id,
            "params": request,
            "request_hash": hashlib.sha256(request.encode()).hexdigest(),
            "num_segments": len(plan.segments),
            "cost": plan.cost,
            "work": plan.cost * pixels,
        }


class PlanRows(ValidateRows):
    """Manifest rows -> the same rows with PLANNED's columns (`id` as the index shows it): what the driver
    schedules, skips and reports by. The planning pass of the job, fused into its read tasks, and --dry-run."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        planned = table([self.validate(raw) for raw in batch.to_pylist()], PLANNED)
        manifest_columns = batch.drop_columns([name for name in PLANNED.names if name in batch.column_names])
        return pa.Table.from_arrays(
            [*planned.columns, *manifest_columns.columns],
            names=[*PLANNED.names, *manifest_columns.column_names],
        )
