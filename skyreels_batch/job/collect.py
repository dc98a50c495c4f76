"""The driver's side of render passes: results into the live index, progress lines, retries of lost rows, and
the clean stop that SIGINT / SIGTERM ask for.

A pass's (small) result rows are consumed on a thread of their own; the main thread only waits, so that a signal
is handled at once, and meanwhile folds results into the index every `index_interval_s` and prints progress.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.actor import ActorHandle
from ray.data import Dataset

from skyreels_batch.job.progress import Progress
from skyreels_batch.output.gallery import Gallery
from skyreels_batch.output.results import ResultsIndex, result_row
from skyreels_batch.render.segments import SegmentStore

POLL_S = 0.5
DRAIN_S = 5.0  # once no video is rendering, how long a stopping pass may take to hand back its queued rows


class StopRequest:
    """The first SIGINT or SIGTERM asks for a clean stop: no new videos, the segments in flight persist, the
    index is written. A second one asks to stop at once."""

    def __init__(self, *, on_signals: bool = False) -> None:
        self.requested = threading.Event()
        self.immediate = threading.Event()
        self.on_signals = on_signals

    def listen(self) -> None:
        """Install the signal handlers (main thread; after ray.init, which installs a SIGTERM handler of its own)."""
        if self.on_signals:
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, lambda *_: self.request())

    def request(self) -> None:
        (self.immediate if self.requested.is_set() else self.requested).set()


@dataclass
class Outcome:
    done: int = 0
    failed: int = 0
    stopped: bool = False


class Collector:
    """Runs render passes over the rows to render until every row is done, failed, or (stopping) left; folds the rows
    that come back into the results index every `index_interval_s`, and has the gallery follow it."""

    def __init__(
        self,
        *,
        index: ResultsIndex,
        gallery: Gallery,
        progress: Progress,
        control: ActorHandle,
        stop: StopRequest,
        index_interval_s: float,
        stop_grace_s: float,
        log: Callable[[str], None],
    ) -> None:
        self.index = index
        self.gallery = gallery
        self.progress = progress
        self.control = control
        self.stop = stop
        self.index_interval_s = index_interval_s
        self.stop_grace_s = stop_grace_s
        self.log = log
        self.outcome = Outcome()
        self.last_flush = time.monotonic()

    def run(self, rows: pa.Table, render_pass: Callable[[pa.Table], Dataset], max_retries: int) -> Outcome:
        """A row lost in its pass (its render actor died: a lost node, OOM, a crash; or a block lost before or after
        rendering) never comes back from it; it goes into the next pass, up to max_retries more, resuming from its
        persisted segments, and is then failed, naming where it was lost the last time."""
        lost = rows
        for attempt in range(max_retries + 1):
            if lost.num_rows == 0:
                break
            if attempt:
                self.log(f"{lost.num_rows} rows lost in the last pass; attempt {attempt + 1} of {max_retries + 1}")
            returned = self._run_pass(render_pass(lost))
            if self.stop.requested.is_set():
                self.outcome.stopped = True
                break
            lost = lost.filter(pc.invert(pc.is_in(lost["id"], pa.array(list(returned), pa.string()))))
        else:
            ids = lost["id"].to_pylist()
            where = ray.get(self.control.last_seen.remote(ids))
            counted = ray.get(self.control.returned.remote(ids))
            failures = [
                {"id": video_id, "num_segments": segments, "error": lost_row_error(video_id, seen, max_retries + 1)}
                for video_id, segments, seen in zip(ids, lost["num_segments"].to_pylist(), where, strict=True)
            ]
            self._record(failures, counted)
        self.progress.tick(self._segments())
        self.progress.report()
        return self.outcome

    def _run_pass(self, dataset: Dataset) -> set[str]:
        """Consume one pass; returns the ids it gave back (done, failed or stopped)."""
        returned: set[str] = set()
        finished = threading.Event()
        errors: list[BaseException] = []

        def consume() -> None:
            try:
                for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                    rows = batch.to_pylist()
                    ids = [row["id"] for row in rows]
                    counted = ray.get(self.control.returned.remote(ids))
                    returned.update(ids)
                    ended = [(row, segments) for row, segments in zip(rows, counted, strict=True) if not row["stopped"]]
                    self._record([row for row, _ in ended], [segments for _, segments in ended])
            except BaseException as error:  # noqa: BLE001 - re-raised on the main thread
                errors.append(error)
            finally:
                finished.set()

        threading.Thread(target=consume, name="render-results", daemon=True).start()
        stop_by = drain_by = None
        while not finished.wait(POLL_S):
            self._tick()
            if self.stop.requested.is_set() and stop_by is None:
                self.control.stop.remote()
                stop_by = time.monotonic() + self.stop_grace_s
                self.log(
                    f"stopping: no new videos; waiting up to {self.stop_grace_s:.0f} s for the segments in flight "
                    "(a second signal stops at once)"
                )
            if stop_by is not None:
                if drain_by is None and ray.get(self.control.state.remote())[1] == 0:
                    drain_by = min(stop_by, time.monotonic() + DRAIN_S)
                if self.stop.immediate.is_set() or time.monotonic() > (drain_by or stop_by):
                    return returned
        if errors:
            raise errors[0]
        return returned

    def _record(self, rows: list[dict[str, Any]], counted: list[int]) -> None:
        """Rows that ended (done or failed), with the segments progress counted for each. A failed row is failed
        for good in this run: its segments go (150-330 MB each at 540P-720P), and the next run starts it afresh."""
        results = [result_row(row) for row in rows]
        self.index.add(results)
        for row, result, segments in zip(rows, results, counted, strict=True):
            unrendered = (row.get("num_segments") or 0) - segments if result["error"] else 0
            self.progress.video_finished(result["status"], unrendered_segments=unrendered)
            if result["error"]:
                SegmentStore(self.index.output, result["id"]).remove()
                self.outcome.failed += 1
                self.log(f"failed: {result['error']}")
            else:
                self.outcome.done += 1

    def _tick(self) -> None:
        self.progress.tick(self._segments())
        if time.monotonic() - self.last_flush >= self.index_interval_s:
            if self.index.flush():
                self.gallery.follow(self.index)
            self.last_flush = time.monotonic()

    def _segments(self) -> int:
        return ray.get(self.control.state.remote())[0]


LOST_WHERE = {
    "rendering": "while rendering it, when its render actor died",
    "rendered": "after rendering, in the writer stage",
    "admitted": "before rendering, in validation or the text-encoding stage",
}


def lost_row_error(video_id: str, last_seen: str, attempts: int) -> str:
    return (
        f"row {video_id!r}: lost {attempts} times, the last time {LOST_WHERE[last_seen]} (out of memory, a lost node "
        "or a crash); gave up (--max-retries)"
    )
