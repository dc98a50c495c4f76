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

from skyreels_batch.progress import Progress
from skyreels_batch.results import ResultsIndex, result_row

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
    """Runs render passes over the rows to render until every row is done, failed, or (stopping) left."""

    def __init__(
        self,
        *,
        index: ResultsIndex,
        progress: Progress,
        control: ActorHandle,
        stop: StopRequest,
        index_interval_s: float,
        stop_grace_s: float,
        log: Callable[[str], None],
    ) -> None:
        self.index = index
        self.progress = progress
        self.control = control
        self.stop = stop
        self.index_interval_s = index_interval_s
        self.stop_grace_s = stop_grace_s
        self.log = log
        self.outcome = Outcome()
        self.last_flush = time.monotonic()

    def run(self, rows: pa.Table, render_pass: Callable[[pa.Table], Dataset], max_retries: int) -> Outcome:
        """A row whose render actor died (a lost node, OOM, a crash) never comes back from its pass; it goes into
        the next pass, up to max_retries more, resuming from its persisted segments, and is then failed."""
        lost = rows
        for attempt in range(max_retries + 1):
            if lost.num_rows == 0:
                break
            if attempt:
                self.log(f"{lost.num_rows} rows lost their render actor; attempt {attempt + 1} of {max_retries + 1}")
            returned = self._run_pass(render_pass(lost))
            if self.stop.requested.is_set():
                self.outcome.stopped = True
                break
            lost = lost.filter(pc.invert(pc.is_in(lost["id"], pa.array(list(returned), pa.string()))))
        else:
            for video_id in lost["id"].to_pylist():
                message = (
                    f"row {video_id!r}: render actor died {max_retries + 1} times while rendering this row "
                    "(out of memory, a lost node or a crash); gave up (--max-retries)"
                )
                self._record([{"id": video_id, "error": message}])
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
                    self.control.returned.remote(ids)
                    returned.update(ids)
                    self._record([row for row in rows if not row["stopped"]])
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

    def _record(self, rows: list[dict[str, Any]]) -> None:
        results = [result_row(row) for row in rows]
        self.index.add(results)
        for result in results:
            self.progress.video_finished(result["status"])
            if result["error"]:
                self.outcome.failed += 1
                self.log(f"failed: {result['error']}")
            else:
                self.outcome.done += 1

    def _tick(self) -> None:
        self.progress.tick(self._segments())
        if time.monotonic() - self.last_flush >= self.index_interval_s:
            self.index.flush()
            self.last_flush = time.monotonic()

    def _segments(self) -> int:
        return ray.get(self.control.state.remote())[0]
