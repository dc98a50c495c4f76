"""Segment progress, counted by render actors and shown by the driver (and so in `ray job logs`)."""

from __future__ import annotations

import ray
from ray.actor import ActorHandle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@ray.remote(num_cpus=0)
class SegmentCounter:
    def __init__(self) -> None:
        self.done = 0

    def add(self, count: int = 1) -> None:
        self.done += count

    def value(self) -> int:
        return self.done


def start_segment_counter() -> ActorHandle:
    """A counter on the driver's node: it must live as long as the job, not as long as a preemptible worker node
    (a counter lost with a node took the whole job down with it)."""
    here = ray.get_runtime_context().get_node_id()
    return SegmentCounter.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()
