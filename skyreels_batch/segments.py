"""A video in flight: its finished segments, persisted under `<output>/_segments/<id>/`.

Per segment k: `<k>.npy` (the uint8 frames it adds) then `<k>.safetensors` (its window's latents and the
random generator's state after it). The latents file is written last and marks the segment done, so a crash
costs at most the segment in flight. A v2v video's clip is `clip.npy`, its first frames. `params.json` records
what the segments were rendered for: segments of a row whose parameters have since changed are discarded,
never mixed in.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

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
