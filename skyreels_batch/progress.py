"""Segment progress, counted by render actors and shown by the driver (and so in `ray job logs`)."""

from __future__ import annotations

import ray


@ray.remote(num_cpus=0)
class SegmentCounter:
    def __init__(self) -> None:
        self.done = 0

    def add(self, count: int = 1) -> None:
        self.done += count

    def value(self) -> int:
        return self.done
