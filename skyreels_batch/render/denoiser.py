"""What every rank of a render worker holds: the pipeline, and the video it is denoising, one segment per call.

A render worker is one process (`--gpus-per-video 1`) or a group of ranks that split each transformer pass
(groups.py). Every rank runs these same calls on the same inputs, so each has the same state after every segment;
only rank 0 (the render stage) decodes, persists and reports.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from skyreels_batch.config import PipelineOptions
from skyreels_batch.control import ModelLoad
from skyreels_batch.models import ModelCard
from skyreels_batch.plan import Segment, VideoPlan
from skyreels_batch.render.diffusion_forcing import (
    denoise_segment,
    enable_sequence_parallel,
    reset_step_cache,
    use_step_cache,
)
from skyreels_batch.render.embeddings import EmbeddingStore
from skyreels_batch.render.inputs import InputError, crop_to_aspect, fetch_image, fetch_lora, fetch_video, fitted_size
from skyreels_batch.render.pipelines import load_pipeline, pipeline_kwargs, use_shift
from skyreels_batch.schema import SPATIAL_MULTIPLE, RenderParams, check_size, check_split, plan_for, split_width
from skyreels_batch.step_cache import parse_cache

# LoRA adapters a rank keeps loaded (a rank meets a new LoRA per style; over days, hundreds).
MAX_ADAPTERS = 4


@dataclass
class Video:
    """One video's denoising state on a rank: the latents of the last window and the seeded generator."""

    params: RenderParams
    plan: VideoPlan
    conditioning: dict[str, Any]
    generator: torch.Generator
    previous: torch.Tensor | None = None


class Denoiser(Protocol):
    """What the render stage drives, one video at a time: a SegmentDenoiser (one process) or a RankGroup (rank 0 and
    the other ranks of a render group, each with a SegmentDenoiser)."""

    @property
    def pipeline(self) -> Any: ...

    def prepare(self, params: RenderParams) -> tuple[RenderParams, dict[str, Any]]: ...

    def begin(
        self,
        params: RenderParams,
        conditioning: dict[str, Any],
        previous: torch.Tensor | None,
        generator_state: torch.Tensor | None,
    ) -> Video: ...

    def denoise(self, index: int) -> torch.Tensor: ...

    def finish(self) -> None: ...


class SegmentDenoiser:
    """The render pipeline of one rank (loaded once), the LoRAs it has met, and the video in progress."""

    def __init__(
        self,
        card: ModelCard,
        *,
        output: str,
        device: str,
        options: PipelineOptions | None,
        model_load: ModelLoad,
    ) -> None:
        self.card = card
        self.device = device
        self.ranks = 1
        self.pipeline = load_pipeline(card, device, options, model_load)
        self.embeddings = EmbeddingStore(output, card.name)
        # LoRA URI -> adapter name, least recently used first: at most MAX_ADAPTERS stay loaded on a rank.
        self.adapters: OrderedDict[str, str] = OrderedDict()
        self.adapters_loaded = 0
        self.video: Video | None = None

    def split(self, ranks: int) -> None:
        """Split the transformer's work over the `ranks` processes of the torch.distributed group (all call this)."""
        enable_sequence_parallel(self.pipeline.transformer, ranks, self.device)
        self.ranks = ranks

    def prepare(self, params: RenderParams) -> tuple[RenderParams, dict[str, Any]]:
        """Fetch the row's images or clip. The size is the row's, or the first image's fitted to the model's area; a
        last image is cropped to the video's aspect ratio. Returns the params with the size resolved and the
        preprocessed inputs (`clip_frames`: a v2v clip's frames, for the video's first frames)."""
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

    def begin(
        self,
        params: RenderParams,
        conditioning: dict[str, Any],
        previous: torch.Tensor | None = None,
        generator_state: torch.Tensor | None = None,
    ) -> Video:
        """Start a video (prepared), or continue one from its last persisted window and generator state."""
        generator = torch.Generator("cpu").manual_seed(params.seed)
        if generator_state is not None:
            generator.set_state(generator_state)
        use_shift(self.pipeline, params.shift)
        use_step_cache(self.pipeline.transformer, parse_cache(params.cache) if params.cache else None)
        self._use_lora(params)
        self.video = Video(params, plan_for(params), conditioning, generator, previous)
        return self.video

    def finish(self) -> None:
        """Let go of the video: its conditioning (images, a clip's frames on the device) leaves with the row."""
        self.video = None

    def denoise(self, index: int) -> torch.Tensor:
        """The latents of the video's segment `index` [1, C, window, h, w]; the video moves on past it."""
        video = self.video
        segment = video.plan.segments[index]
        window = self._denoise(video, segment, self._embeddings(video.params, video.params.prompt_for(index)))
        video.previous = window
        return window

    def _denoise(
        self, video: Video, segment: Segment, embeddings: tuple[torch.Tensor, torch.Tensor | None]
    ) -> torch.Tensor:
        params, conditioning = video.params, video.conditioning
        prompt_embeds, negative_prompt_embeds = embeddings
        if self.card.family != "df":
            # Plain T2V / I2V checkpoints render one window; their pipeline call is the whole segment.
            reset_step_cache(self.pipeline.transformer)
            kwargs = {**pipeline_kwargs(params), "generator": video.generator}
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
            plan=video.plan,
            segment=segment,
            previous_latents=video.previous,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            generator=video.generator,
            params=params,
            first_frame=conditioning.get("image"),
            last_frame=conditioning.get("last_image"),
            clip=conditioning.get("video"),
        )

    def _embeddings(self, params: RenderParams, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompt's embeddings and, with guidance on, the negative prompt's, as the transformer takes them."""
        device, dtype = self.pipeline._execution_device, self.pipeline.transformer.dtype
        texts = [prompt] + ([params.negative_prompt] if params.guidance_scale > 1.0 else [])
        positive, *negative = [self.embeddings.load(text).to(device, dtype) for text in texts]
        return positive, negative[0] if negative else None

    def _use_lora(self, params: RenderParams) -> None:
        """The row's LoRA at its scale, switched with set_adapters; loaded when this rank meets it and does not hold
        it (the least recently used one leaves once MAX_ADAPTERS are loaded: memory stays flat over days)."""
        if params.lora is None or params.lora_scale == 0:
            if self.adapters:
                self.pipeline.disable_lora()
            return
        if params.lora not in self.adapters:
            if len(self.adapters) >= MAX_ADAPTERS:
                _, oldest = self.adapters.popitem(last=False)
                self.pipeline.delete_adapters([oldest])
            name = f"lora{self.adapters_loaded}"
            self.pipeline.load_lora_weights(fetch_lora(params.lora), adapter_name=name)
            self.adapters[params.lora] = name
            self.adapters_loaded += 1
        self.adapters.move_to_end(params.lora)
        self.pipeline.enable_lora()
        self.pipeline.set_adapters([self.adapters[params.lora]], adapter_weights=[params.lora_scale])

    def _clip(self, params: RenderParams) -> tuple[RenderParams, dict[str, Any]]:
        clip = fetch_video(params.video)
        if len(clip) < params.overlap_history:
            raise InputError(f"video: has {len(clip)} frames, fewer than overlap_history ({params.overlap_history})")
        params = self._resolve_size(params, clip[0])
        size = (params.width, params.height)
        clip = [frame if frame.size == size else frame.resize(size, Image.Resampling.LANCZOS) for frame in clip]
        # diffusers encodes only the clip's last overlap_history frames: only those go to the device.
        history = clip[-params.overlap_history :]
        tensor = self.pipeline.video_processor.preprocess_video(history, height=params.height, width=params.width)
        frames = np.stack([np.asarray(frame) for frame in clip])
        return params, {"video": tensor.to(self.pipeline._execution_device, torch.float32), "clip_frames": frames}

    def _resolve_size(self, params: RenderParams, first: Image.Image) -> RenderParams:
        """The row's size, or the first frame's fitted to the model card's default area; checked either way."""
        if params.height is None:
            defaults = self.card.defaults
            height, width = fitted_size(first, defaults.height * defaults.width, SPATIAL_MULTIPLE)
            params = params.model_copy(update={"height": height, "width": split_width(height, width, self.ranks)})
        check_size(params.height, params.width, self.card, f"row {params.id!r}")
        check_split(params.height, params.width, self.ranks, f"row {params.id!r}")
        return params
