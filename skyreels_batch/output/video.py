"""MP4 encoding with PyAV."""

from __future__ import annotations

import io
from collections.abc import Iterable
from fractions import Fraction

import numpy as np

X264_THREADS = 4


def encode_mp4(frames: Iterable[np.ndarray], *, fps: int, crf: int, lossless: bool) -> bytes:
    """Encode uint8 RGB frames [H, W, 3] to an H.264 MP4 in memory.

    Default: yuv420p at `crf`, what every player reads. Lossless: libx264rgb at crf 0 keeps RGB exactly (masters).
    """
    import av  # here, not at the top: the render stage's to_uint8 runs where PyAV is not installed (bench/gpu.py)

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = None
        for frame in frames:
            if stream is None:
                stream = container.add_stream("libx264rgb" if lossless else "libx264", rate=Fraction(fps))
                stream.height, stream.width = frame.shape[:2]
                stream.pix_fmt = "rgb24" if lossless else "yuv420p"
                # x264 output depends on its thread count: fixing it makes the bytes the same on every machine.
                stream.options = {"crf": "0" if lossless else str(crf), "threads": str(X264_THREADS)}
                if not lossless:
                    # MB-tree (x264's lookahead that lowers the quality of blocks later frames do not reference)
                    # made the same frames encode to different bytes in Ray workers, up to one encode in three, with
                    # one thread too (bench/encode_determinism.py): off, none has differed. Lossless has no rate
                    # control, so no MB-tree.
                    stream.options["x264-params"] = "mbtree=0"
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        if stream is None:
            raise ValueError("no frames to encode")
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Pipeline output in [0, 1] (float) to uint8, rounding to nearest."""
    return np.clip(np.rint(frames * 255.0), 0, 255).astype(np.uint8)
