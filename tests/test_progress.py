"""Progress lines for long runs: counts, videos per hour over the last window, and an ETA from the segment rate."""

from __future__ import annotations

from skyreels_batch.job.progress import INTERVAL_S, WINDOW_S, Progress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lines_give_the_rate_over_the_last_window_and_an_eta_from_segments() -> None:
    clock, lines = Clock(), []
    progress = Progress(total_videos=1000, total_segments=2000, log=lines.append, clock=clock)
    progress.tick(0)
    progress.report()
    assert lines == ["videos 0/1,000 (0 failed), segments 0/2,000, ETA unknown"]

    # An hour at 100 videos (200 segments) per hour, sampled every 15 s.
    for step in range(1, 241):
        clock.now += INTERVAL_S
        if step % 6 == 0:
            progress.video_finished("done" if step % 60 else "failed")
        progress.tick(step * 200 // 240)
    assert lines[-1] == ("videos 40/1,000 (4 failed), segments 200/2,000, 40 videos/h over 15 min, ETA 9h00m"), (
        "the rate and the ETA count the last 15 minutes only"
    )
    assert all(before != after for before, after in zip(lines, lines[1:], strict=False)), "a line only when it changes"

    # The pool slows to 80 segments an hour (20 in the next 15 min): the ETA follows within one window.
    for step in range(1, int(WINDOW_S / INTERVAL_S) + 1):
        clock.now += INTERVAL_S
        progress.tick(200 + step * 20 // 60)
    assert lines[-1].endswith("segments 220/2,000, 0 videos/h over 15 min, ETA 22h15m")  # 1780 at 80 an hour


def test_nothing_changed_prints_nothing_and_the_last_line_has_no_eta() -> None:
    clock, lines = Clock(), []
    progress = Progress(total_videos=2, total_segments=3, log=lines.append, clock=clock)
    for _ in range(2):
        clock.now += 60
        progress.tick(0)
    assert lines == ["videos 0/2 (0 failed), segments 0/3, ETA unknown"]
    for segments in (1, 2, 3):
        clock.now += 60
        progress.tick(segments)
    progress.video_finished("done")
    progress.video_finished("done")
    progress.report()
    assert lines[-1] == "videos 2/2 (0 failed), segments 3/3, 24 videos/h over 5 min"  # 2 videos in 300 s


def test_the_segments_a_failed_video_will_never_render_leave_the_total() -> None:
    clock, lines = Clock(), []
    progress = Progress(total_videos=2, total_segments=6, log=lines.append, clock=clock)
    clock.now += 60
    progress.tick(1)  # the first of four segments, then that video failed
    progress.video_finished("failed", unrendered_segments=3)
    clock.now += 60
    progress.tick(3)
    progress.video_finished("done")
    progress.report()
    assert lines[-1].startswith("videos 2/2 (1 failed), segments 3/3, ")
