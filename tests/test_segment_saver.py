"""Segments are persisted on a background thread: the upload of one overlaps the denoising of the next, a segment
counts as done only once committed, and a failed write fails the row."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from skyreels_batch.models import card_for
from skyreels_batch.render.segments import SegmentSaver, SegmentStore
from skyreels_batch.stages.validate import ValidateRows
from tests.conftest import EncodeThenRender

FRAMES = np.zeros((4, 8, 8, 3), np.uint8)
WINDOW = torch.zeros(1, 16, 2, 2, 2)


class GatedStore(SegmentStore):
    """A local store whose writes wait until the test lets them go, and record what they saw of the disk."""

    def __init__(self, root: Path) -> None:
        super().__init__(str(root), "v")
        self.release = threading.Semaphore(0)
        self.writer_threads: set[str] = set()

    def save(self, index: int, *args) -> None:
        assert self.release.acquire(timeout=30), "the render thread never let the write go"
        self.writer_threads.add(threading.current_thread().name)
        super().save(index, *args)


def committed(store: SegmentStore) -> int:
    return sum(Path(store.state_uri(index)).exists() for index in range(10))


def test_a_segment_is_written_while_the_next_is_rendered_and_counts_once_committed(tmp_path: Path) -> None:
    store = GatedStore(tmp_path)
    counted: list[tuple[int, int]] = []  # (count reported, segments on disk then)
    saver = SegmentSaver(store, lambda count: counted.append((count, committed(store))) or True)
    saver.save(0, FRAMES, WINDOW, torch.zeros(1))
    # Back at once although segment 0 is not written: the render thread denoises segment 1 meanwhile.
    assert committed(store) == 0 and counted == []
    store.release.release()  # segment 0's write goes ahead, during "segment 1"
    saver.save(1, FRAMES, WINDOW, torch.zeros(1))  # waits for segment 0 first: two segments in memory at most
    assert committed(store) == 1 and counted == [(1, 1)]
    store.release.release()
    saver.close()
    assert counted == [(1, 1), (2, 2)] and saver.saved == 2
    assert store.writer_threads and threading.current_thread().name not in store.writer_threads


def test_a_stop_reported_after_a_commit_is_seen_by_the_render_loop(tmp_path: Path) -> None:
    saver = SegmentSaver(SegmentStore(str(tmp_path), "v"), lambda count: count < 1)
    saver.save(0, FRAMES, WINDOW, torch.zeros(1))
    saver.close()
    assert saver.saved == 1 and not saver.may_go_on


def failing_save(original):
    def save(store: SegmentStore, index: int, *args) -> None:
        if index == 1:
            raise OSError("the bucket is gone")
        original(store, index, *args)

    return save


def test_a_failed_write_fails_the_row_and_leaves_the_committed_segments(tmp_path: Path, monkeypatch) -> None:
    card = card_for("tiny-df")
    row = {"id": "v", "prompt": "p", "num_frames": 37, "base_num_frames": 17, "overlap_history": 5, "height": 32}
    row |= {"width": 48, "num_inference_steps": 2, "seed": 1}
    stage = EncodeThenRender(card, output=str(tmp_path))
    validated = ValidateRows(card, max_frames=97)(pa.Table.from_pylist([row]))
    with monkeypatch.context() as patch:
        patch.setattr(SegmentStore, "save", failing_save(SegmentStore.save))
        (result,) = stage(validated).to_pylist()
    assert "the bucket is gone" in result["error"]
    store = SegmentStore(str(tmp_path), "v")
    assert Path(store.state_uri(0)).exists() and not Path(store.state_uri(1)).exists()
    (again,) = stage(validated).to_pylist()  # the next pass resumes after the committed segment
    assert again["error"] is None and again["resumed_segments"] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_saver_copies_the_window_before_handing_it_over(tmp_path: Path, dtype: torch.dtype) -> None:
    store = GatedStore(tmp_path)
    saver = SegmentSaver(store, lambda count: True)
    window = torch.ones(1, 16, 2, 2, 2, dtype=dtype)
    saver.save(0, FRAMES, window, torch.zeros(1))
    window.zero_()  # the render thread may reuse its tensors: what it handed over must not change
    store.release.release()
    saver.close()
    loaded, _ = store.load(0)
    assert loaded.dtype == torch.float32 and bool((loaded == 1).all())
