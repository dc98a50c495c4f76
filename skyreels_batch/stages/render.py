"""The render stage: rows -> videos rendered as segment chains, by one process (RenderVideos) or by rank 0 of a
render group (GroupLeader, render_group.py)."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from skyreels_batch.config import PipelineOptions
from skyreels_batch.control import ModelLoad, may_start, model_loaded, render_ended, segments_done
from skyreels_batch.models import ModelCard
from skyreels_batch.output.results import columns_of, committed
from skyreels_batch.output.video import to_uint8
from skyreels_batch.render.denoiser import Denoiser, SegmentDenoiser
from skyreels_batch.render.diffusion_forcing import StreamingDecoder
from skyreels_batch.render.segments import SegmentSaver, SegmentStore
from skyreels_batch.render.timing import ForwardTimer
from skyreels_batch.schema import RenderParams, plan_for
from skyreels_batch.stages import RENDERED, TorchRowStage

if TYPE_CHECKING:
    from ray.actor import ActorHandle


class SegmentRenderer(TorchRowStage):
    """Validated rows whose texts are encoded (EncodePrompts) -> segments persisted under `<output>/_segments/<id>/`.

    A video is a chain of segment tasks (see plan.py), each denoised by the worker's `Denoiser`: one process's
    (RenderVideos) or a group of ranks' (GroupLeader, `--gpus-per-video`). Each segment continues from the last
    overlap latents of the one before and from the generator state it left, both persisted with it, so any worker
    can pick a video up at its last finished segment after a failure. Frames go to storage, not into the batch: a
    97-frame 544x960 segment is 150 MB of uint8, which Ray Data's object store would otherwise hold and spill.

    Once the job is stopping, a worker starts no new video, and a video in progress stops after the segment in
    flight is persisted; either way the row passes on `stopped`, and the next run continues it.
    """

    output_schema = RENDERED
    failure = "render failed"

    def attach(self, card: ModelCard, denoiser: Denoiser, *, output: str, control: ActorHandle | None) -> None:
        """What a subclass's `__init__` ends with, once its denoiser is loaded (on the torch thread)."""
        self.card = card
        self.denoiser = denoiser
        self.output = output
        self.control = control
        self.pipeline = denoiser.pipeline
        model_loaded(control, self.model_load)
        self.transformer_timer = ForwardTimer(self.pipeline.transformer)

    def process(self, params: RenderParams, row: dict[str, Any]) -> dict[str, Any]:
        if not may_start(self.control, params.id):
            return {"stopped": True}
        record = committed(self.output, params.id, row.get("request_hash"))
        try:
            if record is not None:  # lost on its way back to the driver after its commit: the writer returns it
                return columns_of(record, RENDERED)
            return self._render(params)
        finally:
            self.denoiser.finish()
            render_ended(self.control, params.id)

    def _render(self, params: RenderParams) -> dict[str, Any]:
        started_at = datetime.now(timezone.utc)
        started, transformer_before = time.perf_counter(), self.transformer_timer.seconds
        params, conditioning = self.denoiser.prepare(params)
        plan = plan_for(params)
        store = SegmentStore(self.output, params.id)
        resumed = store.open(params)
        clip_frames = conditioning.pop("clip_frames", None)
        if clip_frames is not None and not resumed:
            store.save_clip(clip_frames)
        decoder = StreamingDecoder(self.pipeline)
        previous = generator_state = None
        if resumed:
            segments_done(self.control, params.id, resumed)  # an earlier run's: progress counts them once
            previous, generator_state = store.load(resumed - 1)
            for segment, window in zip(plan.segments[:resumed], store.windows(resumed), strict=True):
                decoder.skip(window[:, :, 0 if segment.index == 0 else segment.overlap :])

        video = self.denoiser.begin(params, conditioning, previous, generator_state)
        saver = SegmentSaver(store, lambda count: segments_done(self.control, params.id, count), saved=resumed)
        decode_s = 0.0
        try:
            for segment in plan.segments[resumed:]:
                if not saver.may_go_on:  # stopping: the segments before are persisted, the next run goes on
                    break
                window = self.denoiser.denoise(segment.index)
                decode_started = time.perf_counter()
                if segment.index == 0 and segment.overlap:  # v2v: the clip's latents lead into the new frames
                    decoder.skip(window[:, :, : segment.overlap])
                frames = to_uint8(decoder.decode(window[:, :, segment.overlap :]))
                decode_s += time.perf_counter() - decode_started
                saver.save(segment.index, frames, window, video.generator.get_state())
        finally:
            saver.close()
        if saver.saved < len(plan.segments):
            return {"stopped": True, "render_started": started_at}
        return {
            "params": params.model_dump_json(),
            "num_segments": len(plan.segments),
            "resumed_segments": resumed,
            "render_started": started_at,
            "render_s": time.perf_counter() - started,
            "transformer_s": self.transformer_timer.seconds - transformer_before,
            "decode_s": decode_s,
            "persist_wait_s": saver.waited_s,
        }


class RenderVideos(SegmentRenderer):
    """The render stage of `--gpus-per-video 1`: a pool of actors, each holding one SkyReels-V2 pipeline."""

    def __init__(
        self,
        card: ModelCard,
        *,
        output: str,
        device: str,
        torch_threads: int,
        options: PipelineOptions | None = None,
        control: ActorHandle | None = None,
    ) -> None:
        self.model_load = ModelLoad("render")
        denoiser = self.start_torch(
            lambda: SegmentDenoiser(card, output=output, device=device, options=options, model_load=self.model_load),
            torch_threads,
        )
        self.attach(card, denoiser, output=output, control=control)
