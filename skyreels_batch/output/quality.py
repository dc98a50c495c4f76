"""Quality signals of a video, measured on its frames as the writer streams them into the MP4 (no second decode),
or on any MP4 from the command line:

    python -m skyreels_batch.output.quality PATH_OR_URL...   (one JSON object per video)

- `black_fraction`: the share of frames that are nearly black (ffmpeg blackdetect's defaults: at least 98% of the
  pixels below 10% of full scale).
- `frozen_fraction`: the share of frames, after the first, whose mean absolute difference to the frame before is
  under FROZEN_LEVELS grey levels (measured on the frame scaled down, the last halving by averaging, which evens
  out encoder noise).
- `motion`: the mean optical-flow magnitude (OpenCV's Farneback) between consecutive frames, as a share of the
  frame's width per frame: a pan across the whole picture in 100 frames is 0.01.
- `sharpness`: the variance of the Laplacian of the luma at full size, averaged over frames spread evenly.
- `cuts`: the frames where a new shot starts: a change to the frame before above CUT_RATIO times the clip's median
  change and above CUT_LEVELS grey levels.
- For a chained video (its seams: the first new frame of each segment that continues something), `seam_jump`: the
  largest change across a seam over the median change inside segments, 1 where seams are as smooth as the rest;
  `drift`: the largest change of a colour channel's mean or standard deviation from the first segment to the last,
  as a share of full scale. Null for a video of one segment (and for any MP4 scored from the command line).

The embedded models render noise, so their videos' signals describe noise.
"""

from __future__ import annotations

import argparse
import io
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

# Pixels: frames are scaled down to this width for every signal but sharpness: sampled to twice it, then averaged
# (averaging the whole frame down costs 25 times more, which the writer's 5% budget does not have).
ANALYSIS_WIDTH = 128
BLACK_LEVEL = 0.10 * 255
BLACK_PIXELS = 0.98
FROZEN_LEVELS = 1.0
CUT_RATIO = 5.0
CUT_LEVELS = 8.0
FLOW_PAIRS = 16  # at most this many frame pairs go through optical flow, spread evenly
SHARPNESS_FRAMES = 16  # at most this many full-size frames go through the Laplacian, spread evenly

SIGNALS = ("black_fraction", "frozen_fraction", "motion", "sharpness", "cuts", "seam_jump", "drift")
# The index's columns (and the dataset's): `quality_<signal>`, and the gate's flags.
COLUMNS = pa.schema(
    [
        *(pa.field(f"quality_{name}", pa.list_(pa.int64()) if name == "cuts" else pa.float64()) for name in SIGNALS),
        pa.field("quality_flags", pa.list_(pa.string())),
    ]
)
# The gate's defaults (`--quality-gate`): a row over one of them stays done and is flagged with the signal's name.
# Black and frozen are the share of the video (half of it); motion under 0.1% of the width per frame is a still;
# a seam that changes 4 times more than the frames around it, or a colour channel that moves 10% of full scale
# over the chain, is a chain that went wrong; any cut in one generated shot is one too many.
GATE = {
    "black_fraction": ("above", 0.5),
    "frozen_fraction": ("above", 0.5),
    "motion": ("below", 0.001),
    "sharpness": ("below", 10.0),
    "cuts": ("above", 0),
    "seam_jump": ("above", 4.0),
    "drift": ("above", 0.1),
}


@dataclass
class Quality:
    black_fraction: float
    frozen_fraction: float
    motion: float
    sharpness: float
    cuts: list[int] = field(default_factory=list)
    seam_jump: float | None = None
    drift: float | None = None

    def flags(self, gate: dict[str, tuple[str, float]]) -> list[str]:
        """The signals over the gate's thresholds (`cuts` is compared by its count)."""
        flagged = []
        for name, (side, threshold) in gate.items():
            value = getattr(self, name)
            value = len(value) if isinstance(value, list) else value
            if value is not None and (value > threshold if side == "above" else value < threshold):
                flagged.append(name)
        return flagged

    def columns(self, gate: dict[str, tuple[str, float]] | None) -> dict[str, Any]:
        """The index's columns; `quality_flags` is null without a gate."""
        signals = {f"quality_{name}": value for name, value in asdict(self).items()}
        return {**signals, "quality_flags": None if gate is None else self.flags(gate)}


def parse_gate(spec: str) -> dict[str, tuple[str, float]]:
    """`--quality-gate`'s value: "default" or "SIGNAL=VALUE,..." (the defaults, with these thresholds instead)."""
    gate = dict(GATE)
    for item in filter(None, (part.strip() for part in spec.split(","))):
        if item == "default":
            continue
        name, _, value = item.partition("=")
        if name not in GATE or not value:
            raise ValueError(f"--quality-gate: {item!r} is not SIGNAL=VALUE with SIGNAL one of {', '.join(GATE)}")
        gate[name] = (GATE[name][0], float(value))
    return gate


class QualityMeter:
    """Watches a video's frames go by (`watch`, uint8 RGB [H, W, 3]) and measures them; `quality()` at the end.
    Holds two scaled-down frames and a few numbers per frame: memory does not grow with the frames' size."""

    def __init__(self, total: int, seams: Sequence[int] = ()) -> None:
        import cv2

        # The writer has a fraction of a core, and its signals should not depend on the machine's core count.
        cv2.setNumThreads(1)
        self.total = total
        self.seams = sorted(seam for seam in seams if 0 < seam < total)
        self.flow_frames = set(_spread(1, total, FLOW_PAIRS))
        self.sharpness_frames = set(_spread(0, total, SHARPNESS_FRAMES))
        self.changes: list[float] = []  # mean absolute difference of each frame to the one before
        self.black = 0
        self.flows: list[float] = []
        self.sharpness: list[float] = []
        self.colour: dict[int, np.ndarray] = {}  # per segment: frames, then the sums of R, G, B means and squares
        self._previous: np.ndarray | None = None
        self._frames = 0

    def watch(self, frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        for frame in frames:
            self._measure(frame)
            yield frame

    def _measure(self, frame: np.ndarray) -> None:
        import cv2

        number, self._frames = self._frames, self._frames + 1
        height, width = frame.shape[:2]
        size = (ANALYSIS_WIDTH, max(1, round(height * ANALYSIS_WIDTH / width)))
        if width > 2 * size[0]:
            frame_small = cv2.resize(frame, (2 * size[0], 2 * size[1]), interpolation=cv2.INTER_NEAREST)
        else:
            frame_small = frame
        small = cv2.resize(frame_small, size, interpolation=cv2.INTER_AREA)
        grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
        self.black += int(np.mean(grey < BLACK_LEVEL) >= BLACK_PIXELS)
        segment = sum(seam <= number for seam in self.seams)
        mean, std = (values[:, 0] for values in cv2.meanStdDev(small))
        stats = np.concatenate([[1.0], mean, std**2 + mean**2])
        self.colour[segment] = self.colour.get(segment, np.zeros(7)) + stats
        if number in self.sharpness_frames:
            luma = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
            # 16-bit holds a Laplacian of 8-bit pixels exactly, and is 10 times faster than floats.
            self.sharpness.append(float(cv2.meanStdDev(cv2.Laplacian(luma, cv2.CV_16S))[1][0, 0] ** 2))
        if self._previous is not None:
            self.changes.append(float(cv2.absdiff(grey, self._previous).mean()))
            if number in self.flow_frames:
                flow = cv2.calcOpticalFlowFarneback(self._previous, grey, None, 0.5, 3, 9, 3, 5, 1.1, 0)
                self.flows.append(float(np.linalg.norm(flow, axis=2).mean()) / ANALYSIS_WIDTH)
        self._previous = grey

    def quality(self) -> Quality:
        frames = max(1, self._frames)
        changes = np.asarray(self.changes)
        usual = float(np.median(changes)) if changes.size else 0.0
        cuts = [
            number + 1
            for number, change in enumerate(self.changes)
            if change > CUT_LEVELS and change > CUT_RATIO * usual and number + 1 not in self.seams
        ]
        quality = Quality(
            black_fraction=self.black / frames,
            frozen_fraction=float(np.mean(changes < FROZEN_LEVELS)) if changes.size else 0.0,
            motion=float(np.mean(self.flows)) if self.flows else 0.0,
            sharpness=float(np.mean(self.sharpness)) if self.sharpness else 0.0,
            cuts=cuts,
        )
        if self.seams and changes.size:
            seam_changes = [self.changes[seam - 1] for seam in self.seams if seam - 1 < changes.size]
            inside = np.delete(changes, [seam - 1 for seam in self.seams if seam - 1 < changes.size])
            # A floor of the frozen threshold: seams of a still video are compared to encoder noise, not to zero.
            baseline = max(float(np.median(inside)) if inside.size else 0.0, FROZEN_LEVELS)
            quality.seam_jump = max(seam_changes) / baseline if seam_changes else None
            quality.drift = _colour_drift(self.colour[min(self.colour)], self.colour[max(self.colour)])
        return quality


def _colour_drift(first: np.ndarray, last: np.ndarray) -> float:
    def mean_and_std(stats: np.ndarray) -> np.ndarray:
        mean, square = stats[1:4] / stats[0], stats[4:7] / stats[0]
        return np.concatenate([mean, np.sqrt(np.maximum(square - mean**2, 0.0))])

    return float(np.abs(mean_and_std(last) - mean_and_std(first)).max() / 255.0)


def _spread(start: int, stop: int, count: int) -> list[int]:
    """At most `count` numbers spread evenly over [start, stop)."""
    span = stop - start
    if span <= 0:
        return []
    if span <= count:
        return list(range(start, stop))
    return sorted({start + math.floor(k * span / count) for k in range(count)})


def measure(frames: Iterable[np.ndarray], total: int, seams: Sequence[int] = ()) -> Quality:
    meter = QualityMeter(total, seams)
    for _ in meter.watch(frames):
        pass
    return meter.quality()


def measure_mp4(data: bytes) -> Quality:
    """Decode an MP4 (PyAV) and measure it, a frame at a time."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        total = stream.frames or sum(1 for _ in container.decode(stream))
    with av.open(io.BytesIO(data)) as container:
        frames = (frame.to_ndarray(format="rgb24") for frame in container.decode(video=0))
        return measure(frames, total)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m skyreels_batch.output.quality", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("videos", nargs="+", metavar="PATH_OR_URL", help="MP4 files: local paths or fsspec URLs")
    args = parser.parse_args(argv)
    from skyreels_batch import storage

    for uri in args.videos:
        print(json.dumps({"path": uri, **asdict(measure_mp4(storage.read_bytes(uri)))}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
