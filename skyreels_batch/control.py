"""The job's control actor, shared by the driver and the stages: segment progress, the stop flag, how many rows may
enter a render pass and wait in it (admission), where each row in flight is (so that a stopping driver knows when
the segments in flight have landed, and a row lost in a pass is reported with the stage that lost it), and which
prompt embeddings the rows in flight still need (`_embeddings/` holds only those).

Ray is imported where it is used: the stages call these helpers with no control actor when they run outside a
job (the tests, bench/gpu.py on a machine without Ray).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from skyreels_batch import storage

if TYPE_CHECKING:
    from ray.actor import ActorHandle


ADMIT_POLL_S = 0.2
# While a window is full, how often admission asks Ray which nodes are alive: a row held on a node that is gone (in a
# text encoder, encoded and queued for a render actor, or rendered and queued for the writer) was lost with it and
# stops counting.
NODE_CHECK_S = 5.0


class JobControl:
    """Run as a Ray actor (start_job_control). At most `window` rows wait: for a render actor, or rendered, for the
    writer or on their way back to the driver (their segments on storage: 150-330 MB each at 540P-720P). So the rows
    with segments on storage are at most the render actors' plus `window`, however far the writer falls behind.
    `alive_nodes` returns the ids of the cluster's alive nodes."""

    def __init__(self, window: int, alive_nodes: Callable[[], set[str]] | None = None) -> None:
        self.window = window
        self.alive_nodes = alive_nodes or _alive_nodes
        self.nodes_checked = float("-inf")
        self.segments = 0
        self.stopping = False
        # Handed out to this pass, no render actor has started it yet: the node that holds it once a text encoder
        # took it (None before: on the driver's node). A row counts until it starts rendering or is lost.
        self.waiting: dict[str, str | None] = {}
        self.rendering: set[str] = set()  # started by a render actor
        # The render actor is done with it: the node its rendered row is stored on (Ray Data keeps a block where it was
        # made), until it is back at the driver. A writer lost with its node runs again from that row (Ray's lineage).
        self.rendered: dict[str, str | None] = {}
        self.counted: dict[str, int] = {}  # segments counted per video, until it is back at the driver
        self.loads: list[dict] = []  # each actor's model load (pipelines.ModelLoad), for the run's metadata
        self.needs: dict[str, list[str]] = {}  # the embedding files each admitted row needs, until it is rendered
        self.references: Counter[str] = Counter()  # rows that need each embedding file

    def admit(self, video_id: str, embeddings: list[str] | tuple[str, ...] = ()) -> bool | None:
        """Whether a pass may hand out this row, which needs these embedding files: None while `window` rows wait
        (for a render actor, or rendered for the writer: ask again), False once the job is stopping."""
        if self.stopping:
            return False
        if video_id not in self.waiting and self._full():
            self._forget_lost()
            if self._full():
                return None
        self.waiting[video_id] = None
        if video_id not in self.needs:
            self.needs[video_id] = list(embeddings)
            self.references.update(embeddings)
        return True

    def held(self, video_id: str, node: str) -> None:
        """A text encoder on `node` took the row: from here until a render actor starts it, it lives on that node."""
        if video_id in self.waiting:
            self.waiting[video_id] = node

    def pass_started(self) -> None:
        """Nothing of an earlier pass waits any more: its rows came back, or were lost and are in this pass."""
        self.waiting.clear()
        self.rendered.clear()

    def _full(self) -> bool:
        return len(self.waiting) + len(self.rendered) >= self.window

    def _forget_lost(self) -> None:
        now = time.monotonic()
        if now - self.nodes_checked < NODE_CHECK_S:
            return
        self.nodes_checked = now
        alive = self.alive_nodes()
        self.waiting = {key: node for key, node in self.waiting.items() if node is None or node in alive}
        self.rendered = {key: node for key, node in self.rendered.items() if node is None or node in alive}

    def _release(self, video_id: str) -> None:
        """The row needs its embeddings no more: remove the files no other row in flight needs."""
        unneeded = []
        for uri in self.needs.pop(video_id, []):
            self.references[uri] -= 1
            if self.references[uri] <= 0:
                del self.references[uri]
                unneeded.append(uri)
        storage.remove_files(unneeded)

    def start_video(self, video_id: str) -> bool:
        """Whether a render actor may start this video (no, once the job is stopping)."""
        self.waiting.pop(video_id, None)
        self.rendered.pop(video_id, None)
        if not self.stopping:
            self.rendering.add(video_id)
        return not self.stopping

    def segments_done(self, video_id: str, count: int) -> bool:
        """The video has its first `count` segments persisted (rendered now, or by an earlier run: each is counted
        once however often the row is retried or resumed); whether it may go on to its next one."""
        self.segments += max(0, count - self.counted.get(video_id, 0))
        self.counted[video_id] = max(count, self.counted.get(video_id, 0))
        return not self.stopping

    def render_ended(self, video_id: str, node: str | None = None) -> None:
        """The render actor on `node` is done with the row: its rendered row waits there for the writer."""
        self.rendering.discard(video_id)
        self.rendered[video_id] = node
        self._release(video_id)

    def stored_on(self, video_id: str, node: str) -> None:
        """The rendered row is stored on `node`, not where its render ended (a render group's row leaves rank 0
        for the Ray Data actor that holds the group, which runs outside the group's placement group)."""
        if video_id in self.rendered:
            self.rendered[video_id] = node

    def returned(self, video_ids: list[str]) -> list[int]:
        """Rows the driver got back from the pass; returns the segments counted for each."""
        counted = []
        for video_id in video_ids:
            self.waiting.pop(video_id, None)
            self.rendering.discard(video_id)
            self.rendered.pop(video_id, None)
            self._release(video_id)
            counted.append(self.counted.pop(video_id, 0))
        return counted

    def last_seen(self, video_ids: list[str]) -> list[str]:
        """Where each of these rows (lost in a pass) was last seen: `rendering`, `rendered` or `admitted` (not yet
        started by a render actor: in validation or the text-encoding stage)."""
        return [
            "rendering" if video_id in self.rendering else "rendered" if video_id in self.rendered else "admitted"
            for video_id in video_ids
        ]

    def model_loaded(self, load: dict) -> None:
        self.loads.append(load)

    def model_loads(self) -> list[dict]:
        return self.loads

    def stop(self) -> None:
        self.stopping = True

    def is_stopping(self) -> bool:
        return self.stopping

    def state(self) -> tuple[int, int]:
        """Segments persisted so far, videos in flight from a render actor's start until they are back."""
        return self.segments, len(self.rendering) + len(self.rendered)


def start_job_control(window: int) -> ActorHandle:
    """On the driver's node: it must live as long as the job, not as long as a preemptible worker node (a counter
    lost with a node took the whole job down with it)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id(), soft=False)
    actor = ray.remote(num_cpus=0)(JobControl).options(scheduling_strategy=here)
    return actor.remote(window)


def node_id() -> str:
    """The node this process runs on."""
    import ray

    return ray.get_runtime_context().get_node_id()


def on_driver_node() -> dict[str, str]:
    """A label selector (Ray labels every node with its id) for Ray Data stages that must run beside the driver."""
    return {"ray.io/node-id": node_id()}


def admit(control: ActorHandle | None, video_id: str, embeddings: list[str]) -> bool:
    """Wait until the pass may hand out this row, which needs these embedding files; False once the job is
    stopping."""
    while control is not None:
        admitted = _get(control.admit.remote(video_id, embeddings))
        if admitted is not None:
            return admitted
        time.sleep(ADMIT_POLL_S)
    return True


def held_here(control: ActorHandle | None, video_id: str) -> None:
    """The row is in a stage on this node (a text encoder): lost with it if the node goes."""
    if control is not None:
        control.held.remote(video_id, node_id())  # no wait: admission reads it only once the window is full


def may_start(control: ActorHandle | None, video_id: str) -> bool:
    return control is None or _get(control.start_video.remote(video_id))


def segments_done(control: ActorHandle | None, video_id: str, count: int) -> bool:
    return control is None or _get(control.segments_done.remote(video_id, count))


def render_ended(control: ActorHandle | None, video_id: str) -> None:
    if control is not None:
        # Before the row travels on: the driver's `returned` comes later.
        _get(control.render_ended.remote(video_id, node_id()))


def stored_here(control: ActorHandle | None, video_ids: list[str]) -> None:
    """These rendered rows leave this process's stage: lost with this node until they are back at the driver."""
    if control is not None:
        here = node_id()
        for video_id in video_ids:
            control.stored_on.remote(video_id, here)  # no wait: admission reads it only once the window is full


@dataclasses.dataclass
class ModelLoad:
    """What an actor reports of its model load (`model_loaded`): where its time went, fetching the checkpoint
    (object storage only), reading it, moving it to the device."""

    stage: str  # "render" or "text"
    rank: int = 0  # a render group's rank (--gpus-per-video)
    fetch_s: float = 0.0
    fetched_files: int = 0
    read_s: float = 0.0
    to_device_s: float = 0.0


def model_loaded(control: ActorHandle | None, load: ModelLoad) -> None:
    """Report an actor's model load with where it happened: its node, the GPU ids Ray assigned it and the GPUs its
    process sees (a render group's ranks see the group's)."""
    if control is not None:
        import ray

        where = {
            "node": node_id(),
            "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()],
            "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }
        _get(control.model_loaded.remote({**dataclasses.asdict(load), **where}))


def stopping(control: ActorHandle | None) -> bool:
    return control is not None and _get(control.is_stopping.remote())


def _alive_nodes() -> set[str]:
    import ray

    return {node["NodeID"] for node in ray.nodes() if node["Alive"]}


def _get(reference: object) -> object:
    import ray

    return ray.get(reference)
