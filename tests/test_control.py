"""The job's control actor on a real local Ray: admission into a render pass, the stop flag, videos in flight."""

from __future__ import annotations

import os
import signal
import time

import ray

from skyreels_batch.collect import StopRequest
from skyreels_batch.control import admit, may_start, segment_done, start_job_control


def test_rows_are_admitted_while_fewer_than_the_window_wait_for_a_render_actor(ray_local: None) -> None:
    control = start_job_control(window=2)
    try:
        assert [ray.get(control.admit.remote(video_id)) for video_id in ("a", "b", "c")] == [True, True, None]
        assert may_start(control, "a")  # a render actor took "a": one slot frees
        assert ray.get(control.admit.remote("c")) is True
        ray.get(control.returned.remote(["b"]))  # "b" came back without being rendered (it failed earlier)
        assert admit(control, "d")
        assert ray.get(control.state.remote()) == (0, 1), "no segment yet, one video rendering"
        assert segment_done(control) and ray.get(control.state.remote()) == (1, 1)
        ray.get(control.returned.remote(["a"]))
        assert ray.get(control.state.remote()) == (1, 0)
    finally:
        ray.kill(control)


def test_once_stopping_nothing_is_admitted_started_or_continued(ray_local: None) -> None:
    control = start_job_control(window=4)
    try:
        assert may_start(control, "running")
        ray.get(control.stop.remote())
        assert not admit(control, "next") and not may_start(control, "next")
        assert not segment_done(control), "the video in flight stops after the segment it just persisted"
        assert ray.get(control.state.remote()) == (1, 1), "the stopping driver still waits for 'running'"
    finally:
        ray.kill(control)


def test_a_row_lost_while_waiting_stops_counting_against_the_window(ray_local: None) -> None:
    control = start_job_control(window=1, waiting_expires_s=0.5)
    try:
        assert ray.get(control.admit.remote("lost-with-its-node")) is True
        assert ray.get(control.admit.remote("next")) is None
        time.sleep(0.6)
        assert ray.get(control.admit.remote("next")) is True
    finally:
        ray.kill(control)


def test_the_first_signal_asks_for_a_clean_stop_and_the_second_for_an_immediate_one() -> None:
    stop = StopRequest()
    stop.request()
    assert stop.requested.is_set() and not stop.immediate.is_set()
    stop.request()
    assert stop.immediate.is_set()


def test_sigint_and_sigterm_both_reach_the_stop_request() -> None:
    """Ctrl-C (SIGINT) and `ray job stop` / a pod deletion (SIGTERM): the first asks for a clean stop, either next."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    stop = StopRequest(on_signals=True)
    try:
        stop.listen()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested.wait(5) and not stop.immediate.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.immediate.wait(5)
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
