"""The cluster a job runs on: what its nodes hold now, and what its autoscaler can add.

`--device auto`, `--workers MIN:auto` and the door read it (`resources.plan_resources`, `Capacity.holds`), and a job
whose actors wait to be placed says what they ask for and what the cluster offers (`PlacementWatch`).

What the autoscaler can add is its node types (their resources and most nodes), read from the first of:

1. the cluster config in the GCS, which Ray Data's own autoscaling reads (Ray's autoscaler v2 reports it in
   releases after 2.60);
2. the autoscaling config the head's autoscaler was started with (its `monitor.py --autoscaling-config=...`):
   every `ray up` cluster (`~/ray_bootstrap_config.yaml`, where `ray up` has filled in each instance type's CPUs
   and GPUs) and any `ray start --head --autoscaling-config`; found when the driver runs on the head, as
   `ray job submit` runs it;
3. on KubeRay, the RayCluster resource, read with the head pod's service account (which the in-tree autoscaler's
   RBAC lets read it) and converted by Ray's own KubeRay code, as the autoscaler converts it.

Why this module reaches inside Ray: Ray 2.60 has no public API for the node types an autoscaler can add; each
source above is read in one function here.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skyreels_batch.job.progress import duration

# Nodes of one type differ in these, and no actor of ours asks for them.
NOT_PLACEMENT = ("memory", "object_store_memory")
HEAD = "node:__internal_head__"
KUBERNETES_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
# How long actors may wait to be placed before the progress line says so.
NOTICE_AFTER_S = 120.0


@dataclass(frozen=True)
class NodeType:
    """A worker node type the autoscaler can add."""

    name: str
    resources: Mapping[str, float]
    max_count: int | None  # None: no limit

    @property
    def gpus(self) -> int:
        return int(self.resources.get("GPU", 0))

    def matches(self, node: Mapping[str, float]) -> bool:
        """Whether a running node is one of this type's (by the resources the type declares)."""
        return HEAD not in node and all(
            math.isclose(node.get(name, 0.0), amount)
            for name, amount in self.resources.items()
            if name not in NOT_PLACEMENT
        )


@dataclass(frozen=True)
class Capacity:
    """The alive nodes' resources, and the node types the autoscaler can add (none found: an empty tuple)."""

    nodes: tuple[Mapping[str, float], ...]
    node_types: tuple[NodeType, ...] = ()
    max_worker_nodes: int | None = None  # the autoscaler's cap on worker nodes, all types together
    source: str | None = None  # where the node types were read
    unreadable: str | None = None  # a source that exists but could not be read: why (nothing can be refused then)

    @property
    def gpus(self) -> int:
        return sum(int(node.get("GPU", 0)) for node in self.nodes)

    def node_type(self, node: Mapping[str, float]) -> NodeType | None:
        return next((node_type for node_type in self.node_types if node_type.matches(node)), None)

    def addable(self) -> list[tuple[NodeType, int | None]]:
        """The node types with room for more nodes, and how many more (None: no limit)."""
        running = sum(self.node_type(node) is not None for node in self.nodes)
        room = None if self.max_worker_nodes is None else max(0, self.max_worker_nodes - running)
        found = []
        for node_type in self.node_types:
            more = None
            if node_type.max_count is not None:
                more = max(0, node_type.max_count - sum(node_type.matches(node) for node in self.nodes))
            if room is not None:
                more = room if more is None else min(more, room)
            if more is None or more > 0:
                found.append((node_type, more))
        return found

    def most_workers(self, gpus_per_worker: int) -> int | None:
        """The most render workers of `gpus_per_worker` GPUs of one node the cluster can hold at once: on the nodes
        no node type accounts for (the head, nodes started by hand), and on every node type at its most nodes
        (within the autoscaler's cap on worker nodes, the types that hold the most workers a node first).
        None: no limit."""
        total = sum(int(node.get("GPU", 0)) // gpus_per_worker for node in self.nodes if self.node_type(node) is None)
        budget = self.max_worker_nodes
        per_type = sorted(
            ((node_type.gpus // gpus_per_worker, node_type.max_count) for node_type in self.node_types),
            key=lambda pair: pair[0],
            reverse=True,
        )
        for workers, count in per_type:
            if not workers:
                continue
            if budget is not None:
                count = budget if count is None else min(count, budget)
                budget -= count
            elif count is None:
                return None
            total += workers * count
        return total

    def holds(self, bundle: Mapping[str, float], count: int = 1) -> bool:
        """Whether some node, now or one the autoscaler can add, holds `count` of `bundle` at once (a render group's
        ranks are packed on one node). True when a source of node types could not be read: nothing is known."""
        if self.unreadable:
            return True
        shapes = [*self.nodes, *(node_type.resources for node_type, _ in self.addable())]
        return any(_holds(shape, bundle, count) for shape in shapes)

    def describe(self) -> str:
        """`nodes now: 1 with {CPU: 2}; the autoscaler can add: gpu {CPU: 8, GPU: 1} x2 (its config at ...)`"""
        shapes: dict[str, int] = {}
        for node in self.nodes:
            shapes[resources_text(node)] = shapes.get(resources_text(node), 0) + 1
        now = ", ".join(f"{count} with {shape}" for shape, count in shapes.items())
        if self.unreadable:
            return f"nodes now: {now}; the autoscaler's node types are unknown ({self.unreadable})"
        if not self.node_types:
            return f"nodes now: {now}; no autoscaler node types found"
        addable = ", ".join(
            f"{node_type.name} {resources_text(node_type.resources)} x{'any' if more is None else more}"
            for node_type, more in self.addable()
        )
        return f"nodes now: {now}; the autoscaler can add: {addable or 'nothing more'} ({self.source})"


def _holds(node: Mapping[str, float], bundle: Mapping[str, float], count: int) -> bool:
    for name, amount in bundle.items():
        if amount <= 0:
            continue
        have = node.get(name, 0.0)
        if name == "GPU" and amount < 1:  # a fraction of a GPU takes its share of one GPU, never of two
            slots = int(have) * int(1 / amount + 1e-9)
        else:
            slots = int(have / amount + 1e-9)
        if slots < count:
            return False
    return True


def resources_text(resources: Mapping[str, float]) -> str:
    """`{CPU: 8, GPU: 1}`: what placement reads of a node's or an actor's resources."""
    shown = {
        name: amount
        for name, amount in resources.items()
        if name not in NOT_PLACEMENT and not name.startswith(("node:", "accelerator_type:")) and amount
    }
    return "{" + ", ".join(f"{name}: {amount:g}" for name, amount in sorted(shown.items())) + "}"


def node_types_of(config: Mapping[str, Any]) -> tuple[list[NodeType], int | None]:
    """The worker node types of a Ray autoscaling config (cluster.yaml's form) and its cap on worker nodes. Types
    whose resources are not declared (an unbootstrapped cluster.yaml) or that may have no node are left out."""
    head = config.get("head_node_type")
    cap = config.get("max_workers")
    types = []
    for name, spec in (config.get("available_node_types") or {}).items():
        most = spec.get("max_workers", cap)
        if name != head and spec.get("resources") and most != 0:
            types.append(NodeType(name, dict(spec["resources"]), most))
    return types, cap


def read_capacity() -> Capacity:
    """The cluster's nodes now, and the node types its autoscaler can add from the first source that has them."""
    import ray

    nodes = tuple(dict(node["Resources"]) for node in ray.nodes() if node["Alive"])
    problems = []
    for read in (_from_gcs, _from_monitor, _from_kuberay):
        try:
            found = read()
        except Exception as error:  # noqa: BLE001 - one source unreadable: say so, try the next
            problems.append(f"{read.__doc__}: {type(error).__name__}: {error}")
            continue
        if found is not None:
            types, cap, source = found
            return Capacity(nodes, tuple(types), cap, source)
    return Capacity(nodes, unreadable="; ".join(problems) or None)


def _from_gcs() -> tuple[list[NodeType], int | None, str] | None:
    """the cluster config in the GCS"""
    import ray._private.state

    config = ray._private.state.state.get_cluster_config()
    if config is None or not config.node_group_configs:
        return None
    types = [
        NodeType(group.name, dict(group.resources), None if group.max_count == -1 else group.max_count)
        for group in config.node_group_configs
        if group.resources and group.max_count != 0
    ]
    return types, None, "the cluster config in the GCS"


def _from_monitor() -> tuple[list[NodeType], int | None, str] | None:
    """the head's autoscaling config"""
    import psutil
    import ray
    import yaml

    port = ray.get_runtime_context().gcs_address.rsplit(":", 1)[-1]
    for process in psutil.process_iter(["cmdline"]):
        command = process.info["cmdline"] or []
        if not any(part.endswith("monitor.py") for part in command):
            continue
        flags = dict(part.split("=", 1) for part in command if part.startswith("--") and "=" in part)
        if flags.get("--gcs-address", "").rsplit(":", 1)[-1] != port or "--autoscaling-config" not in flags:
            continue
        path = Path(os.path.expanduser(flags["--autoscaling-config"]))
        if not path.is_absolute():
            path = Path(process.cwd()) / path
        types, cap = node_types_of(yaml.safe_load(path.read_text()))
        return types, cap, f"the autoscaler's config {path}"
    return None


def _from_kuberay() -> tuple[list[NodeType], int | None, str] | None:
    """the RayCluster resource"""
    name = os.environ.get("RAY_CLUSTER_NAME")  # KubeRay sets it in every Ray container
    if not name:
        return None
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
    from ray.autoscaler._private.kuberay.node_provider import KubernetesHttpApiClient

    namespace = Path(KUBERNETES_NAMESPACE_FILE).read_text().strip()
    ray_cluster = KubernetesHttpApiClient(namespace).get(f"rayclusters/{name}")
    if not ray_cluster["spec"].get("enableInTreeAutoscaling"):
        return None  # no autoscaler: the worker groups have the nodes they have
    types, cap = node_types_of(_derive_autoscaling_config_from_ray_cr(ray_cluster))
    return types, cap, f"RayCluster {namespace}/{name}"


# How the progress line names a stage's actors.
STAGE_NAMES = {"RenderVideos": "render actors", "EncodePrompts": "text encoders", "render groups": "render groups"}


@dataclass
class PlacementWatch:
    """Actors of the job that Ray has not placed. Once some have waited NOTICE_AFTER_S, `note()` says how many
    wait, what each asks for and what the cluster offers, for the progress line (otherwise a job waiting for a GPU
    node that never comes is silent). Reads Ray's state API; without it (no dashboard) it says nothing."""

    capacity: Capacity
    asks: Mapping[str, str]  # a stage's class name (or "render groups") -> what one of its actors asks for, as text
    placements: str = ""  # render groups' placement groups are named `<placements>-...` (--gpus-per-video)
    notice_after_s: float = NOTICE_AFTER_S
    clock: Callable[[], float] = time.monotonic
    waiting_since: float | None = None

    def note(self) -> str | None:
        try:
            waiting = self.waiting()
        except Exception:  # noqa: BLE001 - no state API (a cluster without a dashboard): no note
            return None
        now = self.clock()
        if not waiting:
            self.waiting_since = None
            return None
        self.waiting_since = now if self.waiting_since is None else self.waiting_since
        if now - self.waiting_since < self.notice_after_s:
            return None
        what = ", ".join(
            f"{count} {STAGE_NAMES.get(stage, stage)} asking {self.asks[stage]} each"
            for stage, count in waiting.items()
        )
        return f"not placed for {duration(now - self.waiting_since)}: {what}; {self.capacity.describe()}"

    def waiting(self) -> dict[str, int]:
        """How many actors of each stage wait to be placed (render groups: their placement groups)."""
        from ray.util.state import list_actors, list_placement_groups

        pending = list_actors(
            filters=[("state", "=", "PENDING_CREATION")], detail=True, limit=10_000, raise_on_missing_output=False
        )
        # An actor whose constructor runs is pending creation too, but it has a worker process: only those
        # without one wait to be placed.
        unplaced = [actor for actor in pending if not actor.pid]
        counts = {stage: sum(stage in (actor.class_name or "") for actor in unplaced) for stage in self.asks}
        if "render groups" in self.asks:
            groups = list_placement_groups(filters=[("state", "=", "PENDING")], raise_on_missing_output=False)
            counts["render groups"] = sum(group.name.startswith(f"{self.placements}-") for group in groups)
        return {stage: count for stage, count in counts.items() if count}
