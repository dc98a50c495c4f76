"""The writer stage: a video's segments -> one MP4 at `<output>/videos/<id>.mp4`, committed atomically."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import torch
from safetensors.torch import save as save_tensors

from skyreels_batch import storage
from skyreels_batch.output.quality import QualityMeter
from skyreels_batch.output.results import columns_of, committed, result_row, write_record
from skyreels_batch.output.thumbnails import Thumbnails
from skyreels_batch.output.video import encode_mp4
from skyreels_batch.render.segments import SegmentStore
from skyreels_batch.schema import RenderParams, plan_for
from skyreels_batch.stages import WRITTEN, RowStage


def video_uri(output: str, video_id: str) -> str:
    return storage.join(output, "videos", f"{video_id}.mp4")


def poster_uri(output: str, video_id: str) -> str:
    return storage.join(output, "posters", f"{video_id}.jpg")


def sheet_uri(output: str, video_id: str) -> str:
    return storage.join(output, "sheets", f"{video_id}.jpg")


def latents_uri(output: str, video_id: str) -> str:
    return storage.join(output, "latents", f"{video_id}.safetensors")


class WriteVideos(RowStage):
    """Rendered rows -> `uri`, `checksum` (sha256 of the MP4), `encode_s`, the video's poster and contact sheet
    (thumbnails.py: JPEGs picked from the frames on their way into the MP4), its quality signals (quality.py,
    measured on the same frames; with a `quality_gate`, the signals over it in `quality_flags`); with
    `save_latents` also the video's latents. Reads one segment at a time, so memory does not grow with length. CPU
    work: runs as Ray tasks.

    Commits in this order: the MP4, its poster and sheet, then its record (results.py: the proof that it is done,
    and for which request), then the segments are removed. Killed between any two, the next run redoes at most the
    MP4 and its pictures. A row whose record is there for the same request is committed already: it is returned as
    committed (a task Ray retries, a row admitted again), never written or failed again."""

    output_schema = WRITTEN
    failure = "writing the MP4 failed"

    def __init__(
        self,
        *,
        output: str,
        crf: int,
        lossless: bool,
        save_latents: bool = False,
        quality_gate: dict[str, tuple[str, float]] | None = None,
    ) -> None:
        self.output = output
        self.crf = crf
        self.lossless = lossless
        self.save_latents = save_latents
        self.quality_gate = quality_gate

    def process(self, params: RenderParams, row: dict[str, Any]) -> dict[str, Any]:
        store = SegmentStore(self.output, params.id)
        record = committed(self.output, params.id, row.get("request_hash"))
        if record is not None:
            store.remove()  # a writer killed between the record and this
            return columns_of(record, WRITTEN)
        started = time.perf_counter()
        count = row["num_segments"]
        with_clip = params.mode == "v2v"
        total, seams = _frame_count_and_seams(params, store, with_clip)
        thumbnails, meter = Thumbnails(total, seams), QualityMeter(total, seams)
        frames = meter.watch(thumbnails.watch(store.frames(count, with_clip=with_clip)))
        mp4 = encode_mp4(frames, fps=params.fps, crf=self.crf, lossless=self.lossless)
        saved_latents = self._save_latents(params, store, count) if self.save_latents else None
        uri = video_uri(self.output, params.id)
        storage.write_bytes_atomic(uri, mp4)
        poster, sheet = poster_uri(self.output, params.id), sheet_uri(self.output, params.id)
        storage.write_bytes_atomic(poster, thumbnails.poster_jpeg())
        storage.write_bytes_atomic(sheet, thumbnails.sheet_jpeg())
        written = {
            "uri": uri,
            "poster_uri": poster,
            "sheet_uri": sheet,
            "latents_uri": saved_latents,
            "checksum": hashlib.sha256(mp4).hexdigest(),
            "encode_s": time.perf_counter() - started,
            **meter.quality().columns(self.quality_gate),
        }
        write_record(self.output, result_row({**row, **written}))
        store.remove()
        return written

    def _save_latents(self, params: RenderParams, store: SegmentStore, count: int) -> str:
        """`latents` [1, C, L, h, w]: the video's latents, each overlap once (what training on latents wants)."""
        segments = plan_for(params).segments
        parts = [
            window[:, :, segment.overlap :] for segment, window in zip(segments, store.windows(count), strict=True)
        ]
        uri = latents_uri(self.output, params.id)
        storage.write_bytes_atomic(uri, save_tensors({"latents": torch.cat(parts, dim=2).contiguous()}))
        return uri


def _frame_count_and_seams(params: RenderParams, store: SegmentStore, with_clip: bool) -> tuple[int, list[int]]:
    """The video's frame count and the first new frame of each segment that continues something (a seam)."""
    start, seams = store.clip_length() if with_clip else 0, []
    for segment in plan_for(params).segments:
        if start:
            seams.append(start)
        start += segment.new_frames
    return start, seams
