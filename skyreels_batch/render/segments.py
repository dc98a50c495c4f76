"""A video in flight: its finished segments, persisted under `<output>/_segments/<id>/`.

Per segment k: `<k>.npy` (the uint8 frames it adds) then `<k>.safetensors` (its window's latents and the
random generator's state after it). The latents file is written last and marks the segment done, so a crash
costs at most the segments in flight. A v2v video's clip is `clip.npy`, its first frames. `params.json` records
what the segments were rendered for: segments of a row whose parameters have since changed are discarded,
never mixed in.

`SegmentSaver` writes them on a background thread, so a segment's upload overlaps the next one's denoising.
"""

from __future__ import annotations

import io
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from skyreels_batch import storage
from skyreels_batch.schema import RenderParams


def segments_dir(output: str) -> str:
    return storage.join(output, "_segments")


class SegmentStore:
    def __init__(self, output: str, video_id: str) -> None:
        self.root = storage.join(segments_dir(output), video_id)

    @property
    def clip_uri(self) -> str:
        return storage.join(self.root, "clip.npy")

    def frames_uri(self, index: int) -> str:
        return storage.join(self.root, f"{index:05d}.npy")

    def state_uri(self, index: int) -> str:
        return storage.join(self.root, f"{index:05d}.safetensors")

    def open(self, params: RenderParams) -> int:
        """Prepare for rendering `params`; returns how many segments an earlier run already finished."""
        record = storage.join(self.root, "params.json")
        current = params.model_dump_json()
        if storage.list_files(self.root) and _read_text(record) != current:
            storage.remove_tree(self.root)
        if not storage.list_files(self.root, "params.json"):
            storage.write_bytes_atomic(record, current.encode())
        names = {uri.rsplit("/", 1)[-1] for uri in storage.list_files(self.root)}
        done = 0
        while f"{done:05d}.safetensors" in names and f"{done:05d}.npy" in names:
            done += 1
        return done

    def save(self, index: int, frames: np.ndarray, window: torch.Tensor, generator_state: torch.Tensor) -> None:
        buffer = io.BytesIO()
        np.save(buffer, frames, allow_pickle=False)
        storage.write_bytes_atomic(self.frames_uri(index), buffer.getvalue())
        state = {"window": window.detach().to("cpu", torch.float32).contiguous(), "generator_state": generator_state}
        storage.write_bytes_atomic(self.state_uri(index), save_tensors(state))

    def save_clip(self, frames: np.ndarray) -> None:
        """The clip a v2v video continues: the video's first frames, written before any segment."""
        buffer = io.BytesIO()
        np.save(buffer, frames, allow_pickle=False)
        storage.write_bytes_atomic(self.clip_uri, buffer.getvalue())

    def clip_length(self) -> int:
        """Frames in the saved clip, from its header alone."""
        fs, path = storage.filesystem(self.clip_uri)
        with fs.open(path, "rb") as file:
            major, _ = np.lib.format.read_magic(file)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, _ = read_header(file)
        return shape[0]

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A finished segment's window latents and the generator state after it."""
        state = load_tensors(storage.read_bytes(self.state_uri(index)))
        return state["window"], state["generator_state"]

    def windows(self, count: int) -> Iterator[torch.Tensor]:
        for index in range(count):
            yield self.load(index)[0]

    def frames(self, count: int, *, with_clip: bool = False) -> Iterator[np.ndarray]:
        """The video's frames in order (a continued clip first), one segment in memory at a time."""
        uris = ([self.clip_uri] if with_clip else []) + [self.frames_uri(index) for index in range(count)]
        for uri in uris:
            yield from np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)

    def remove(self) -> None:
        storage.remove_tree(self.root)


def _read_text(uri: str) -> str | None:
    try:
        return storage.read_bytes(uri).decode()
    except FileNotFoundError:
        return None


class SegmentSaver:
    """Persists a video's segments on one background thread while the render thread denoises the next: at most
    one segment is being written while the next is rendered, so memory holds two segments' frames at most.

    A segment counts as done only once its files are committed: `on_saved(count)` (progress, and whether the
    video may go on) is called then, from the saver's thread. A kill loses the segment being written as well as
    the one being denoised; a stop loses neither (`close` waits for the writes). `waited_s` is the time the render
    thread spent waiting for storage.
    """

    def __init__(self, store: SegmentStore, on_saved: Callable[[int], bool], *, saved: int = 0) -> None:
        self.store = store
        self.on_saved = on_saved
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="segment-saver")
        self.writing: deque[Future] = deque()
        self.saved = saved  # segments committed, counted from the video's first (an earlier run's included)
        self.may_go_on = True
        self.waited_s = 0.0

    def save(self, index: int, frames: np.ndarray, window: torch.Tensor, generator_state: torch.Tensor) -> None:
        """Hand segment `index` over; waits first for the segment before it, if it is still being written."""
        self._wait()
        # A copy, made here: the render thread may reuse the tensor, and on a GPU the copy waits for its kernels.
        window = window.detach().to("cpu", torch.float32, copy=True)
        self.writing.append(self.executor.submit(self._save, index, frames, window, generator_state))

    def close(self) -> None:
        """Wait for every segment handed over; raise the first write that failed."""
        try:
            self._wait()
        finally:
            self.executor.shutdown(wait=True)

    def _wait(self) -> None:
        started = time.perf_counter()
        try:
            while self.writing:
                self.writing.popleft().result()
        finally:
            self.waited_s += time.perf_counter() - started

    def _save(self, index: int, frames: np.ndarray, window: torch.Tensor, generator_state: torch.Tensor) -> None:
        self.store.save(index, frames, window, generator_state)
        self.saved = index + 1
        self.may_go_on = self.on_saved(index + 1) and self.may_go_on
