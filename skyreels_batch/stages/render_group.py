"""The render stage with several ranks per video (`--gpus-per-video N`): each actor holds one render group."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import ray
from ray.util.placement_group import placement_group

from skyreels_batch.config import PipelineOptions
from skyreels_batch.control import ModelLoad, stored_here
from skyreels_batch.models import ModelCard
from skyreels_batch.render.groups import RankGroup, end_worker, rank_actor
from skyreels_batch.stages.render import SegmentRenderer


class RenderGroup:
    """The render stage with N ranks (a Ray Data actor): it holds a placement group of N bundles packed on one node
    and the group's rank 0, a GroupLeader actor in the first bundle, and hands each row to it.

    The placement group is named after this actor, so a restarted one (same actor, new process) finds it again.
    Nothing removes a placement group when the actor that made it dies, so the driver removes those left behind
    (`PlacementSweeper`). A lost rank ends rank 0 (groups are rebuilt whole), and rank 0's end ends this actor: its
    row is a lost row, retried by the next pass from its segments."""

    def __init__(self, *, placements: str, bundle: dict[str, float], ranks: int, **render_args: Any) -> None:
        name = f"{placements}-{ray.get_runtime_context().get_actor_id()}"
        try:
            group = ray.util.get_placement_group(name)
        except ValueError:
            group = placement_group([bundle] * ranks, strategy="STRICT_PACK", name=name)
        ray.get(group.ready())
        self.rank0 = rank_actor(GroupLeader, group, 0, bundle).remote(**render_args, ranks=ranks, bundle=bundle)
        ray.get(self.rank0.__ray_ready__.remote())  # a group that cannot start fails this actor's start with why
        self.control = render_args.get("control")

    def __call__(self, batch: pa.Table) -> pa.Table:
        try:
            rendered = ray.get(self.rank0.render.remote(batch))
        except ray.exceptions.RayActorError as error:
            end_worker(f"rank 0 is gone: {error}")
        stored_here(self.control, rendered["id"].to_pylist())  # Ray Data keeps the row here, not on rank 0's node
        return rendered


class GroupLeader(SegmentRenderer):
    """Rank 0 of a render group (a Ray actor in the group's first bundle): it starts the other ranks and renders rows
    as RenderVideos does, with every transformer pass split over the group (RankGroup)."""

    def __init__(
        self,
        card: ModelCard,
        *,
        output: str,
        device: str,
        torch_threads: int,
        ranks: int,
        bundle: dict[str, float],
        options: PipelineOptions | None = None,
        control: Any = None,
    ) -> None:
        self.model_load = ModelLoad("render")
        group = self.start_torch(
            lambda: RankGroup.start(
                card,
                output=output,
                device=device,
                options=options,
                torch_threads=torch_threads,
                ranks=ranks,
                bundle=bundle,
                model_load=self.model_load,
                control=control,
            ),
            torch_threads,
        )
        self.attach(card, group, output=output, control=control)

    def render(self, batch: pa.Table) -> pa.Table:
        """`__call__`, for RenderGroup, which holds this stage as an actor."""
        return self(batch)
