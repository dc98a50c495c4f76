"""The job's control actor on a real local Ray: admission into a render pass, the stop flag, videos in flight."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import ray

from skyreels_batch import control as control_module
from skyreels_batch.control import JobControl, admit, may_start, segments_done, start_job_control
from skyreels_batch.job.collect import StopRequest, lost_row_error


def test_rows_are_admitted_while_fewer_than_the_window_wait_for_a_render_actor(ray_local: None) -> None:
    control = start_job_control(window=2)
    try:
        assert [ray.get(control.admit.remote(video_id)) for video_id in ("a", "b", "c")] == [True, True, None]
        assert may_start(control, "a")  # a render actor took "a": one slot frees
        assert ray.get(control.admit.remote("c")) is True
        ray.get(control.returned.remote(["b"]))  # "b" came back without being rendered (it failed earlier)
        assert admit(control, "d", [])
        assert ray.get(control.state.remote()) == (0, 1), "no segment yet, one video rendering"
        assert segments_done(control, "a", 1) and ray.get(control.state.remote()) == (1, 1)
        ray.get(control.returned.remote(["a"]))
        assert ray.get(control.state.remote()) == (1, 0)
    finally:
        ray.kill(control)


def test_once_stopping_nothing_is_admitted_started_or_continued(ray_local: None) -> None:
    control = start_job_control(window=4)
    try:
        assert may_start(control, "running")
        ray.get(control.stop.remote())
        assert not admit(control, "next", []) and not may_start(control, "next")
        assert not segments_done(control, "running", 1), "the video in flight stops after the segment it persisted"
        assert ray.get(control.state.remote()) == (1, 1), "the stopping driver still waits for 'running'"
    finally:
        ray.kill(control)


def test_a_waiting_row_counts_until_it_renders_however_long_it_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr(control_module.time, "monotonic", lambda: now[0])
    control = JobControl(window=1, alive_nodes=lambda: {"node-a"})
    assert control.admit("queued-behind-a-long-video") is True
    now[0] += 6 * 3600.0  # the videos ahead of it take hours (14B, 720P)
    assert control.admit("next") is None, "a row that waits still counts: the backlog does not grow"
    control.start_video("queued-behind-a-long-video")
    assert control.admit("next") is True


def test_a_row_lost_with_its_node_or_its_pass_stops_counting() -> None:
    alive = {"driver", "encoder-node"}
    control = JobControl(window=2, alive_nodes=lambda: set(alive))
    assert control.admit("queued") and control.admit("encoded")
    control.held("encoded", "encoder-node")  # a text encoder took it: it now lives on that node
    alive.discard("encoder-node")
    assert control.admit("next") is True, "the row held on the lost node no longer counts"
    assert control.admit("one-more") is None, "the row still on the driver's node does"
    control.pass_started()  # the pass ended; its lost rows are in the next one
    assert control.admit("one-more") is True


def test_rendered_rows_waiting_for_the_writer_count_until_they_are_back_or_lost_with_their_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A writer slower than the render actors (seen in the soak: 1,182 rendered rows waiting, their segments on
    storage) holds the pass: no row enters while `window` rows wait, for a render actor or for the writer."""
    monkeypatch.setattr("skyreels_batch.control.NODE_CHECK_S", 0.0)
    alive = {"driver", "gpu-node"}
    control = JobControl(window=2, alive_nodes=lambda: set(alive))
    for video_id in ("a", "b"):
        assert control.admit(video_id) and control.start_video(video_id)
        control.render_ended(video_id, "gpu-node")
    assert control.admit("c") is None, "two rendered rows wait for the writer"
    control.returned(["a"])  # written and back at the driver
    assert control.admit("c") is True
    control.start_video("c")
    control.render_ended("c", "gpu-node")
    assert control.admit("d") is None
    alive.discard("gpu-node")  # the rows stored there were lost with it: the next pass renders them again
    assert control.admit("d") is True
    assert control.state() == (0, 0)
    control.start_video("d")
    control.render_ended("d", "driver")
    assert control.admit("e") is True, "one rendered row, one waiting: the window of 2 is full"
    assert control.admit("f") is None
    # A render group's row: its render ends on rank 0's node, and Ray Data stores it where the group's actor runs.
    control.returned(["d", "e"])
    alive |= {"rank-node", "group-node"}
    for video_id in ("g", "h"):
        assert control.admit(video_id) and control.start_video(video_id)
        control.render_ended(video_id, "rank-node")
        control.stored_on(video_id, "group-node")
    alive.discard("group-node")
    assert control.admit("i") is True, "lost with the node that stored them, not the one that rendered them"


def test_an_embedding_stays_while_a_row_in_flight_needs_it(tmp_path: Path) -> None:
    files = {name: tmp_path / f"{name}.safetensors" for name in ("negative", "cat", "dog")}
    for path in files.values():
        path.write_bytes(b"embedding")
    uri = {name: str(path) for name, path in files.items()}
    control = JobControl(window=4, alive_nodes=set)
    control.admit("a", [uri["cat"], uri["negative"]])
    control.admit("b", [uri["dog"], uri["negative"]])
    control.admit("c", [uri["cat"], uri["negative"]])
    control.start_video("a")
    control.render_ended("a")
    assert all(path.exists() for path in files.values()), "b and c still need them"
    control.admit("a", [uri["cat"], uri["negative"]])  # a lost row admitted again: counted once
    control.returned(["a", "b"])  # b came back without rendering (it failed in the text encoder)
    assert not files["dog"].exists() and files["cat"].exists() and files["negative"].exists()
    control.start_video("c")
    control.render_ended("c")
    assert not any(path.exists() for path in files.values())


def test_segments_are_counted_once_however_often_a_video_is_resumed() -> None:
    control = JobControl(window=4)
    control.start_video("long")
    control.segments_done("long", 3)  # resumed: an earlier run persisted three segments
    control.segments_done("long", 4)
    control.start_video("long")  # its render actor died; the next pass resumes it from segment 4
    control.segments_done("long", 4)
    control.segments_done("long", 5)
    assert control.state() == (5, 1)
    assert control.returned(["long", "never-counted"]) == [5, 0]
    assert control.state() == (5, 0)


def test_a_lost_row_is_reported_with_the_stage_it_was_last_seen_in() -> None:
    control = JobControl(window=4)
    for video_id in ("queued", "in-render", "at-writer"):
        control.admit(video_id)
    control.start_video("in-render")
    control.start_video("at-writer")
    control.render_ended("at-writer")
    assert control.state()[1] == 2, "a rendered video is in flight until it is back at the driver"
    assert control.last_seen(["queued", "in-render", "at-writer"]) == ["admitted", "rendering", "rendered"]
    control.start_video("at-writer")  # its writer's node was lost; the next pass renders it again
    assert control.last_seen(["at-writer"]) == ["rendering"]
    messages = [lost_row_error("x", seen, 4) for seen in ("admitted", "rendering", "rendered")]
    assert "before rendering, in validation or the text-encoding stage" in messages[0]
    assert "when its render actor died" in messages[1] and "in the writer stage" in messages[2]
    assert all(message.startswith("row 'x': lost 4 times, the last time ") for message in messages)


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
