"""Progress lines for runs of days: counts, the rate over the last window and an ETA.

    videos 1,204/100,000 (3 failed), segments 2,881/190,000, 412 videos/h over 15 min, ETA 19h40m

The ETA comes from the segment rate, not the video rate: longest-first scheduling starts the long videos first, so
early videos per hour would promise too little. Lines go to the driver's stdout, each written whole, so
`ray job logs` shows them and they never share a line with Ray's (which go to stderr, progress bars turned off).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

WINDOW_S = 15 * 60.0
INTERVAL_S = 15.0


class Progress:
    def __init__(
        self,
        *,
        total_videos: int,
        total_segments: int,
        log: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
        note: Callable[[], str | None] | None = None,
    ) -> None:
        self.total_videos = total_videos
        self.note = note  # something the job waits on (actors not placed), appended to the line when there is
        self.total_segments = total_segments
        self.log = log
        self.clock = clock
        self.done = self.failed = self.segments = 0
        self.samples: deque[tuple[float, int, int]] = deque([(clock(), 0, 0)])  # (time, videos, segments)
        self.last_report = clock()
        self.last_line = ""

    def video_finished(self, status: str, *, unrendered_segments: int = 0) -> None:
        """A video ended; a failed one's segments that will never be rendered leave the total."""
        if status == "done":
            self.done += 1
        else:
            self.failed += 1
        self.total_segments -= max(0, unrendered_segments)

    def tick(self, segments: int) -> None:
        """Record the segment count; print a line every INTERVAL_S when something changed."""
        self.segments = segments
        now = self.clock()
        self.samples.append((now, self.done + self.failed, segments))
        while len(self.samples) > 2 and self.samples[1][0] <= now - WINDOW_S:
            self.samples.popleft()
        if now - self.last_report >= INTERVAL_S:
            self.report()

    def report(self) -> None:
        self.last_report = self.clock()
        note = self.note() if self.note is not None else None
        line = f"{self.line()}; {note}" if note else self.line()
        if line != self.last_line:
            self.last_line = line
            self.log(line)

    def line(self) -> str:
        videos = self.done + self.failed
        counts = (
            f"videos {videos:,}/{self.total_videos:,} ({self.failed:,} failed), "
            f"segments {self.segments:,}/{self.total_segments:,}"
        )
        (start, start_videos, start_segments), (now, _, _) = self.samples[0], self.samples[-1]
        elapsed, segments_in_window = now - start, self.segments - start_segments
        if elapsed <= 0 or segments_in_window <= 0:
            return counts if videos >= self.total_videos else f"{counts}, ETA unknown"
        rate = f"{(videos - start_videos) * 3600 / elapsed:,.0f} videos/h over {duration(elapsed)}"
        if videos >= self.total_videos:
            return f"{counts}, {rate}"
        seconds_left = (self.total_segments - self.segments) * elapsed / segments_in_window
        return f"{counts}, {rate}, ETA {duration(seconds_left)}"


def duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    if minutes < 1:
        return f"{max(0, round(seconds))}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes} min"
