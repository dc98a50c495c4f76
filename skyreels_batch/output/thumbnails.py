"""A video's poster (its middle frame) and contact sheet (a grid of frames, each labelled with its number), picked
from the frames as the writer streams them into the MP4: no second decode, and one segment in memory at a time.

The sheet shows SHEET_FRAMES evenly spaced frames and, for a chained video, the first new frame of every segment
(for v2v, the first frame after the clip): the seams, where a chain goes wrong, are always on it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SHEET_FRAMES = 12
SHEET_COLUMNS = 6
TILE_WIDTH = 192  # pixels: frames are scaled to this width, up or down
LABEL_HEIGHT = 16
JPEG_QUALITY = 85


def sheet_frames(total: int, seams: Iterable[int]) -> list[int]:
    """Frame numbers on the sheet: SHEET_FRAMES evenly spaced (first and last included) and every seam."""
    count = min(SHEET_FRAMES, total)
    spaced = {round(k * (total - 1) / (count - 1)) for k in range(count)} if count > 1 else {0}
    return sorted(spaced | {seam for seam in seams if 0 <= seam < total})


class Thumbnails:
    """Watches a video's frames go by (`watch`), keeping only those the poster and the sheet show."""

    def __init__(self, total: int, seams: Iterable[int] = ()) -> None:
        self.poster_frame = total // 2
        self.seams = set(seams)
        self.sheet_frames = sheet_frames(total, self.seams)
        self._wanted = {*self.sheet_frames, self.poster_frame}
        self._kept: dict[int, np.ndarray] = {}

    def watch(self, frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        for number, frame in enumerate(frames):
            if number in self._wanted:
                self._kept[number] = frame
            yield frame

    def poster_jpeg(self) -> bytes:
        return _jpeg(Image.fromarray(self._kept[self.poster_frame]))

    def sheet_jpeg(self) -> bytes:
        first = self._kept[self.sheet_frames[0]]
        tile_height = max(1, round(first.shape[0] * TILE_WIDTH / first.shape[1]))
        columns = min(SHEET_COLUMNS, len(self.sheet_frames))
        rows = math.ceil(len(self.sheet_frames) / columns)
        sheet = Image.new("RGB", (columns * TILE_WIDTH, rows * (tile_height + LABEL_HEIGHT)), "black")
        draw = ImageDraw.Draw(sheet)
        font = ImageFont.load_default()
        for slot, number in enumerate(self.sheet_frames):
            left, top = (slot % columns) * TILE_WIDTH, (slot // columns) * (tile_height + LABEL_HEIGHT)
            tile = Image.fromarray(self._kept[number]).resize((TILE_WIDTH, tile_height), Image.Resampling.BILINEAR)
            sheet.paste(tile, (left, top))
            label = f"frame {number}" + (" | segment starts" if number in self.seams else "")
            draw.text((left + 4, top + tile_height + 2), label, fill="white", font=font)
        return _jpeg(sheet)


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()
