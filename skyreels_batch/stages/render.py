"""The render stage: a pool of actors, each holding one SkyReels-V2 pipeline, rendering videos as segment chains."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from skyreels_batch.config import PipelineOptions
from skyreels_batch.control import may_start, model_loaded, render_ended, segments_done
from skyreels_batch.diffusion_forcing import StreamingDecoder, denoise_segment
from skyreels_batch.embeddings import EmbeddingStore
from skyreels_batch.inputs import (
    InputError,
    crop_to_aspect,
    fetch_image,
    fetch_lora,
    fetch_video,
    fitted_size,
)
from skyreels_batch.models import ModelCard
from skyreels_batch.pipelines import ModelLoad, load_pipeline, pipeline_kwargs, use_shift
from skyreels_batch.plan import Segment, VideoPlan
from skyreels_batch.schema import SPATIAL_MULTIPLE, RenderParams, check_size, plan_for
from skyreels_batch.segments import SegmentStore
from skyreels_batch.stages import RENDERED, TorchRowStage
from skyreels_batch.timing import ForwardTimer
from skyreels_batch.video import to_uint8

if TYPE_CHECKING:
    from ray.actor import ActorHandle


class RenderVideos(TorchRowStage):
    """Validated rows whose texts are encoded (EncodePrompts) -> segments persisted under `<output>/_segments/<id>/`.

    A video is a chain of segment tasks (see plan.py). Each segment continues from the last overlap latents of
    the one before and from the generator state it left, both persisted with it, so any actor can pick a video up
    at its last finished segment after a failure. Frames go to storage, not into the batch: a 97-frame 544x960
    segment is 150 MB of uint8, which Ray Data's object store would otherwise hold and spill.

    Once the job is stopping, an actor starts no new video, and a video in progress stops after the segment in
    flight is persisted; either way the row passes on `stopped`, and the next run continues it.
    """

    output_schema = RENDERED
    failure = "render failed"

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
        self.card = card
        self.output = output
        self.control = control
        self.model_load = ModelLoad("render")
        self.pipeline = self.start_torch(lambda: load_pipeline(card, device, options, self.model_load), torch_threads)
        model_loaded(control, self.model_load)
        self.transformer_timer = ForwardTimer(self.pipeline.transformer)
        self.embeddings = EmbeddingStore(output, card.name)
        self.adapters: dict[str, str] = {}  # LoRA URI -> adapter name: each LoRA is loaded once per actor

    def process(self, params: RenderParams, row: dict[str, Any]) -> dict[str, Any]:
        if not may_start(self.control, params.id):
            return {"stopped": True}
        try:
            return self._render(params)
        finally:
            render_ended(self.control, params.id)

    def _render(self, params: RenderParams) -> dict[str, Any]:
        started_at = datetime.now(timezone.utc)
        started, transformer_before = time.perf_counter(), self.transformer_timer.seconds
        params, conditioning = self._conditioning(params)
        plan = plan_for(params)
        store = SegmentStore(self.output, params.id)
        resumed = store.open(params)
        if "clip_frames" in conditioning and not resumed:
            store.save_clip(conditioning.pop("clip_frames"))
        generator = torch.Generator("cpu").manual_seed(params.seed)
        decoder = StreamingDecoder(self.pipeline)
        previous = None
        if resumed:
            segments_done(self.control, params.id, resumed)  # an earlier run's: progress counts them once
            previous, generator_state = store.load(resumed - 1)
            generator.set_state(generator_state)
            for segment, window in zip(plan.segments[:resumed], store.windows(resumed), strict=True):
                decoder.skip(window[:, :, 0 if segment.index == 0 else segment.overlap :])

        use_shift(self.pipeline, params.shift)
        self._use_lora(params)
        for segment in plan.segments[resumed:]:
            embeddings = self._embeddings(params, params.prompt_for(segment.index))
            window = self._denoise(params, plan, segment, previous, generator, embeddings, conditioning)
            if segment.index == 0 and segment.overlap:  # v2v: the clip's latents lead into the new frames
                decoder.skip(window[:, :, : segment.overlap])
            frames = to_uint8(decoder.decode(window[:, :, segment.overlap :]))
            store.save(segment.index, frames, window, generator.get_state())
            previous = window
            may_go_on = segments_done(self.control, params.id, segment.index + 1)
            if not may_go_on and segment.index < len(plan.segments) - 1:
                return {"stopped": True, "render_started": started_at}
        return {
            "params": params.model_dump_json(),
            "num_segments": len(plan.segments),
            "resumed_segments": resumed,
            "render_started": started_at,
            "render_s": time.perf_counter() - started,
            "transformer_s": self.transformer_timer.seconds - transformer_before,
        }

    def _embeddings(self, params: RenderParams, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompt's embeddings and, with guidance on, the negative prompt's, as the transformer takes them."""
        device, dtype = self.pipeline._execution_device, self.pipeline.transformer.dtype
        texts = [prompt] + ([params.negative_prompt] if params.guidance_scale > 1.0 else [])
        positive, *negative = [self.embeddings.load(text).to(device, dtype) for text in texts]
        return positive, negative[0] if negative else None

    def _denoise(
        self,
        params: RenderParams,
        plan: VideoPlan,
        segment: Segment,
        previous: torch.Tensor | None,
        generator: torch.Generator,
        embeddings: tuple[torch.Tensor, torch.Tensor | None],
        conditioning: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        prompt_embeds, negative_prompt_embeds = embeddings
        if self.card.family != "df":
            # Plain T2V / I2V checkpoints render one window; their pipeline call is the whole segment.
            kwargs = {**pipeline_kwargs(params), "generator": generator}
            if self.card.family == "i2v":
                kwargs["image"] = conditioning["image_source"]
            return self.pipeline(
                **kwargs,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                output_type="latent",
            ).frames
        return denoise_segment(
            self.pipeline,
            plan=plan,
            segment=segment,
            previous_latents=previous,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            generator=generator,
            params=params,
            first_frame=conditioning.get("image"),
            last_frame=conditioning.get("last_image"),
            clip=conditioning.get("video"),
        )

    def _use_lora(self, params: RenderParams) -> None:
        """The row's LoRA at its scale, switched with set_adapters; loaded the first time this actor meets it."""
        if params.lora is None or params.lora_scale == 0:
            if self.adapters:
                self.pipeline.disable_lora()
            return
        if params.lora not in self.adapters:
            name = f"lora{len(self.adapters)}"
            self.pipeline.load_lora_weights(fetch_lora(params.lora), adapter_name=name)
            self.adapters[params.lora] = name
        self.pipeline.enable_lora()
        self.pipeline.set_adapters([self.adapters[params.lora]], adapter_weights=[params.lora_scale])

    def _conditioning(self, params: RenderParams) -> tuple[RenderParams, dict[str, Any]]:
        """Fetch the row's images or clip. The size is the row's, or the first image's fitted to the model's area; a
        last image is cropped to the video's aspect ratio. Returns the params with the size resolved and the
        preprocessed inputs."""
        if params.video is not None:
            return self._clip(params)
        if params.image is None:
            return params, {}
        first = fetch_image(params.image, "image")
        params = self._resolve_size(params, first)
        images = {"image": first}
        if params.last_image is not None:
            images["last_image"] = crop_to_aspect(
                fetch_image(params.last_image, "last_image"), params.height, params.width
            )
        device = self.pipeline._execution_device
        processor = self.pipeline.video_processor
        return params, {
            "image_source": first,
            **{
                name: processor.preprocess(image, height=params.height, width=params.width).to(device, torch.float32)
                for name, image in images.items()
            },
        }

    def _clip(self, params: RenderParams) -> tuple[RenderParams, dict[str, Any]]:
        clip = fetch_video(params.video)
        if len(clip) < params.overlap_history:
            raise InputError(f"video: has {len(clip)} frames, fewer than overlap_history ({params.overlap_history})")
        params = self._resolve_size(params, clip[0])
        size = (params.width, params.height)
        clip = [frame if frame.size == size else frame.resize(size, Image.Resampling.LANCZOS) for frame in clip]
        tensor = self.pipeline.video_processor.preprocess_video(clip, height=params.height, width=params.width)
        frames = np.stack([np.asarray(frame) for frame in clip])
        return params, {"video": tensor.to(self.pipeline._execution_device, torch.float32), "clip_frames": frames}

    def _resolve_size(self, params: RenderParams, first: Image.Image) -> RenderParams:
        """The row's size, or the first frame's fitted to the model card's default area; checked either way."""
        if params.height is None:
            defaults = self.card.defaults
            height, width = fitted_size(first, defaults.height * defaults.width, SPATIAL_MULTIPLE)
            params = params.model_copy(update={"height": height, "width": width})
        check_size(params.height, params.width, self.card, f"row {params.id!r}")
        return params
