"""Render groups: one video over several GPUs (`--gpus-per-video N`, sequence parallelism).

A render worker with N > 1 is a group of N rank processes on one node, in a placement group of N bundles packed on
one node (STRICT_PACK: placed whole or not at all, so two half-placed groups never wait for each other's GPUs, and
the autoscaler adds a node that holds a whole group). The Ray Data actor (stages/render_group.py) makes the
placement group and starts rank 0, a GroupLeader actor, in its first bundle; rank 0 starts the N - 1 `OtherRank`s
in the others. The ranks join one torch.distributed group (NCCL on GPUs, gloo on CPU) and the transformer splits
each window's tokens over them (`enable_sequence_parallel`).

Every rank makes the same denoising calls on the same inputs (denoiser.py); rank 0 alone decodes, persists segments
and talks to the job. It drives the others one call at a time, so they never run ahead: a stop after any segment
leaves them idle, not inside a collective. A rank that dies or fails in the middle of a segment leaves the others
waiting in a collective that never completes, so rank 0 then ends its process: the other ranks are its children and
end with it, and so does the Ray Data actor above it, which Ray restarts (it takes its placement group back). Its
row comes back in the next pass as a lost row and resumes from its persisted segments.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any, NoReturn

import ray
import torch
import torch.distributed as dist
from ray.util.placement_group import PlacementGroup, get_current_placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from skyreels_batch.config import PipelineOptions
from skyreels_batch.control import ModelLoad, model_loaded
from skyreels_batch.models import ModelCard
from skyreels_batch.render.denoiser import SegmentDenoiser, Video
from skyreels_batch.render.diffusion_forcing import check_heads
from skyreels_batch.schema import RenderParams

logger = logging.getLogger(__name__)
# How long a rank waits for the others to join (model loads included) before giving up.
JOIN_TIMEOUT = timedelta(minutes=30)


class PlacementSweeper:
    """Removes render groups' placement groups that no rank uses any more (their RenderGroup actor was replaced or
    scaled down), after a grace period that covers a restarting actor taking its group back."""

    def __init__(self, placements: str, *, grace_s: float = 120.0, every_s: float = 10.0) -> None:
        self.placements = placements
        self.grace_s, self.every_s = grace_s, every_s
        self.unused_since: dict[str, float] = {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="placement-sweeper", daemon=True)

    def __enter__(self) -> PlacementSweeper:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopped.set()
        self.thread.join()
        remove_placements(self.placements)

    def sweep(self) -> int:
        """One look at the cluster; returns how many placement groups it removed."""
        total, free, now = ray.cluster_resources(), ray.available_resources(), time.monotonic()
        removed = 0
        for info in _placements(self.placements):
            group_id = info["placement_group_id"]
            keys = [key for key in total if key.startswith("CPU_group_") and key.endswith(group_id)]
            keys = [key for key in keys if key != f"CPU_group_{group_id}"]  # the group's total, beside each bundle's
            unused = bool(keys) and all(free.get(key, 0.0) >= total[key] - 1e-9 for key in keys)
            if not unused:
                self.unused_since.pop(group_id, None)
            elif now - self.unused_since.setdefault(group_id, now) >= self.grace_s:
                remove_placement_group(ray.util.get_placement_group(info["name"]))
                removed += 1
        return removed

    def _run(self) -> None:
        while not self.stopped.wait(self.every_s):
            try:
                self.sweep()
            except Exception as error:  # noqa: BLE001 - a missed sweep is retried at the next
                logger.warning("placement groups not swept: %s", error)


def remove_placements(placements: str) -> int:
    """Remove every render group's placement group of this job (a pass's end: its workers are gone)."""
    infos = list(_placements(placements))
    for info in infos:
        remove_placement_group(ray.util.get_placement_group(info["name"]))
    return len(infos)


def _placements(placements: str) -> Iterator[dict[str, Any]]:
    for info in ray.util.placement_group_table().values():
        if info["name"].startswith(f"{placements}-") and info["state"] != "REMOVED":
            yield info


def rank_actor(cls: type, group: PlacementGroup, rank: int, bundle: dict[str, float]) -> Any:
    """`cls` as a Ray actor class for rank `rank` of a render group: its bundle's resources, in that bundle. Not
    restarted: a group is rebuilt whole (see above)."""
    custom = {name: amount for name, amount in bundle.items() if name not in ("CPU", "GPU")}
    return ray.remote(cls).options(
        num_cpus=bundle["CPU"],
        num_gpus=bundle.get("GPU", 0),
        resources=custom or None,
        scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank),
        max_restarts=0,
    )


def share_gpus(rank: int, ranks: int, store: dist.TCPStore, *, on_gpus: bool, device: str) -> None:
    """On GPUs (`on_gpus`: the ranks were placed on Ray's GPUs), before CUDA starts in this process: see the group's
    GPUs in rank order (Ray shows an actor only its own), so NCCL can use the links between them, and use GPU
    `rank`. With simulated GPUs the ids are shared the same way and torch stays on the CPU (`device`)."""
    if on_gpus:
        store.set(f"gpu/{rank}", ",".join(str(gpu) for gpu in ray.get_gpu_ids()))
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(store.get(f"gpu/{other}").decode() for other in range(ranks))
    if device == "cuda":
        torch.cuda.set_device(rank)


def join_ranks(rank: int, ranks: int, store: dist.TCPStore, device: str) -> None:
    """Join this process to its render group's torch.distributed group."""
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=ranks, timeout=JOIN_TIMEOUT)


class OtherRank:
    """Rank 1..N-1 of a render group (a Ray actor): the same denoising calls as rank 0, nothing persisted."""

    def __init__(
        self,
        card: ModelCard,
        *,
        output: str,
        device: str,
        options: PipelineOptions | None,
        torch_threads: int,
        rank: int,
        ranks: int,
        store_address: tuple[str, int],
        on_gpus: bool,
        control: Any = None,
    ) -> None:
        torch.set_num_threads(torch_threads)
        self.rank, self.ranks, self.device = rank, ranks, device
        host, port = store_address
        self.store = dist.TCPStore(host, port, ranks, is_master=False, timeout=JOIN_TIMEOUT)
        share_gpus(rank, ranks, self.store, on_gpus=on_gpus, device=device)
        load = ModelLoad("render", rank=rank)
        self.denoiser = SegmentDenoiser(card, output=output, device=device, options=options, model_load=load)
        model_loaded(control, load)

    def join(self) -> None:
        join_ranks(self.rank, self.ranks, self.store, self.device)
        self.denoiser.split(self.ranks)

    def begin(self, params_json: str, previous: torch.Tensor | None, generator_state: torch.Tensor | None) -> None:
        params, conditioning = self.denoiser.prepare(RenderParams.model_validate_json(params_json))
        conditioning.pop("clip_frames", None)
        self.denoiser.begin(params, conditioning, previous, generator_state)

    def denoise(self, index: int) -> None:
        self.denoiser.denoise(index)


class RankGroup:
    """Rank 0's side of a render group, a Denoiser: rank 0's own SegmentDenoiser and the other ranks, driven call by
    call. Rank 0 alone prepares a row's inputs (the others fetch theirs in `begin`) and lets go of it."""

    def __init__(self, denoiser: SegmentDenoiser, others: list[Any]) -> None:
        self.denoiser = denoiser
        self.others = others

    @property
    def pipeline(self) -> Any:
        return self.denoiser.pipeline

    def prepare(self, params: RenderParams) -> tuple[RenderParams, dict[str, Any]]:
        return self.denoiser.prepare(params)

    def finish(self) -> None:
        self.denoiser.finish()

    @classmethod
    def start(
        cls,
        card: ModelCard,
        *,
        output: str,
        device: str,
        options: PipelineOptions | None,
        torch_threads: int,
        ranks: int,
        bundle: dict[str, float],
        model_load: ModelLoad,
        control: Any = None,
    ) -> RankGroup:
        """Start the other ranks in this worker's placement group, load rank 0's pipeline while they load theirs, and
        join them."""
        denoiser_args = dict(card=card, output=output, device=device, options=options)
        host = ray.util.get_node_ip_address()
        store = dist.TCPStore(host, 0, ranks, is_master=True, wait_for_workers=False, timeout=JOIN_TIMEOUT)
        group = get_current_placement_group()
        on_gpus = bool(bundle.get("GPU"))
        others = [
            rank_actor(OtherRank, group, rank, bundle).remote(
                **denoiser_args,
                torch_threads=torch_threads,
                rank=rank,
                ranks=ranks,
                store_address=(host, store.port),
                on_gpus=on_gpus,
                control=control,
            )
            for rank in range(1, ranks)
        ]
        share_gpus(0, ranks, store, on_gpus=on_gpus, device=device)
        denoiser = SegmentDenoiser(**denoiser_args, model_load=model_load)  # while the others load theirs
        # Before any rank joins, so that a bad --gpus-per-video or a rank that cannot load fails the job's start
        # (this constructor's error) instead of a restart that would meet it again.
        check_heads(denoiser.pipeline.transformer, ranks)
        ray.get([other.__ray_ready__.remote() for other in others])
        watcher = _end_worker_if_any_fails([other.join.remote() for other in others], "while the group formed")
        join_ranks(0, ranks, store, device)
        denoiser.split(ranks)
        watcher.join()
        return cls(denoiser, others)

    def begin(
        self,
        params: RenderParams,
        conditioning: dict[str, Any],
        previous: torch.Tensor | None,
        generator_state: torch.Tensor | None,
    ) -> Video:
        """Every rank starts the video. A rank that cannot fetch the row's inputs fails the row here, before any
        collective, and the group stays usable."""
        started = [other.begin.remote(params.model_dump_json(), previous, generator_state) for other in self.others]
        video = self.denoiser.begin(params, conditioning, previous, generator_state)
        try:
            ray.get(started)
        except ray.exceptions.RayActorError as error:
            end_worker(f"a rank died as the video started: {error}")
        return video

    def denoise(self, index: int) -> torch.Tensor:
        done = [other.denoise.remote(index) for other in self.others]
        watcher = _end_worker_if_any_fails(done, f"in segment {index}")
        try:
            window = self.denoiser.denoise(index)
        except BaseException as error:  # noqa: BLE001 - the other ranks are inside a collective waiting for this one
            end_worker(f"rank 0 failed in segment {index}: {error!r}")
        watcher.join()
        return window


def _end_worker_if_any_fails(calls: list[ray.ObjectRef], where: str) -> threading.Thread:
    """Wait for the other ranks' calls on a thread of its own: rank 0 may be inside a collective that a failed rank
    will never join. Join the returned thread to wait for them."""

    def wait() -> None:
        try:
            ray.get(calls)
        except Exception as error:  # noqa: BLE001
            end_worker(f"a rank failed {where}: {error}")

    watcher = threading.Thread(target=wait, name="other-ranks", daemon=True)
    watcher.start()
    return watcher


def end_worker(why: str) -> NoReturn:
    """End this process (rank 0, or the Ray Data actor above it), and with it the group: Ray restarts the render
    worker, and its row resumes in the next pass."""
    logger.error("render group lost: %s; ending this worker", why)
    os._exit(1)
