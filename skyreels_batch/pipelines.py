"""Loading SkyReels-V2 diffusers pipelines, once per actor.

Diffusion-forcing segments are computed by diffusion_forcing.py with the loaded pipeline's components; plain
T2V checkpoints are called through `pipeline_kwargs`.
"""

from __future__ import annotations

from typing import Any

import diffusers
import torch
import transformers
from diffusers import AutoencoderKLWan, DiffusionPipeline
from diffusers.hooks import apply_group_offloading

from skyreels_batch.config import Offload, PipelineOptions
from skyreels_batch.models import ModelCard
from skyreels_batch.schema import RenderParams


def model_source(card: ModelCard) -> str:
    """What `from_pretrained` loads: a cached embedded directory, a local directory or a Hub id."""
    if card.embedded is not None:
        from skyreels_batch.embedded import materialize

        return str(materialize(card))
    return card.path or card.name


def load_pipeline(card: ModelCard, device: str, options: PipelineOptions | None = None) -> DiffusionPipeline:
    options = options or PipelineOptions()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    pipeline_class = getattr(diffusers, card.pipeline_class_name)
    source = model_source(card)
    if device == "cuda":
        # As the SkyReels-V2 docs do: bf16 transformer and text encoder, fp32 VAE for clean decodes.
        vae = AutoencoderKLWan.from_pretrained(source, subfolder="vae", dtype=torch.float32)
        pipeline = pipeline_class.from_pretrained(source, vae=vae, dtype=torch.bfloat16)
    else:
        pipeline = pipeline_class.from_pretrained(source, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    if options.attention_backend:
        pipeline.transformer.set_attention_backend(options.attention_backend)
    place(pipeline, device, options.offload)
    if options.compile:
        # Regional compilation (diffusers' recommended form): the repeated block is compiled once and the code is
        # reused by every layer, a much shorter compile than the whole model's for the same kernels.
        pipeline.transformer.compile_repeated_blocks(fullgraph=True)
    return pipeline


def place(pipeline: DiffusionPipeline, device: str, offload: Offload) -> None:
    """Put the pipeline's models on the device, or keep their weights in host memory (offload)."""
    if offload == "model":
        # Each model moves to the device when it runs and the previous one in `model_cpu_offload_seq` leaves.
        pipeline.enable_model_cpu_offload(device=device)
    elif offload == "group":
        # As diffusers' Wan docs (the same components): text encoder in groups of 4 blocks, transformer leaf by leaf
        # with transfers overlapped on a CUDA stream; the VAE and image encoder are small and stay on the device.
        onload = torch.device(device)
        apply_group_offloading(
            pipeline.text_encoder, onload_device=onload, offload_type="block_level", num_blocks_per_group=4
        )
        pipeline.transformer.enable_group_offload(
            onload_device=onload, offload_type="leaf_level", use_stream=device == "cuda"
        )
        for component in (pipeline.vae, getattr(pipeline, "image_encoder", None)):
            if component is not None:
                component.to(device)
    else:
        pipeline.to(device)


def use_shift(pipeline: DiffusionPipeline, shift: float) -> None:
    """Per-row flow shift: a fresh scheduler from the loaded one's config, as the SkyReels-V2 docs set it."""
    if pipeline.scheduler.config.get("flow_shift") != shift:
        pipeline.scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config, flow_shift=shift)


def pipeline_kwargs(params: RenderParams) -> dict[str, Any]:
    """A row's parameters as plain (non diffusion-forcing) pipeline arguments; the generator is the caller's."""
    return dict(
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        height=params.height,
        width=params.width,
        num_frames=params.num_frames,
        num_inference_steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale,
    )
