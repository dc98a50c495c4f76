"""Loading SkyReels-V2 diffusers pipelines, once per actor: the render pipeline without its text encoder, and the
text encoder alone (its own stage, see embeddings.py).

Diffusion-forcing segments are computed by diffusion_forcing.py with the loaded pipeline's components; plain
T2V / I2V checkpoints are called through `pipeline_kwargs` with the row's prompt embeddings.
"""

from __future__ import annotations

import time
from typing import Any

import diffusers
import torch
import transformers
from diffusers import AutoencoderKLWan, DiffusionPipeline
from diffusers.hooks import apply_group_offloading

from skyreels_batch.config import Offload, PipelineOptions
from skyreels_batch.control import ModelLoad
from skyreels_batch.models import ModelCard
from skyreels_batch.models.checkpoints import fetch_checkpoint
from skyreels_batch.render.embeddings import MAX_SEQUENCE_LENGTH
from skyreels_batch.schema import RenderParams


def model_source(card: ModelCard, *, text_encoder: bool = False, load: ModelLoad | None = None) -> str:
    """What `from_pretrained` loads: a cached embedded directory, a checkpoint on object storage fetched into this
    node's cache (the parts a text-encoder or a render actor loads), a local directory or a Hub id."""
    if card.embedded is not None:
        from skyreels_batch.models.embedded import materialize

        return str(materialize(card))
    if card.uri is not None:
        fetched = fetch_checkpoint(card.uri, text_encoder=text_encoder)
        if load is not None:
            load.fetch_s, load.fetched_files = fetched.seconds, fetched.files
        return str(fetched.directory)
    return card.path or card.name


def load_pipeline(
    card: ModelCard, device: str, options: PipelineOptions | None = None, load: ModelLoad | None = None
) -> DiffusionPipeline:
    """The render pipeline: every component but the text encoder and its tokenizer (None)."""
    options, load = options or PipelineOptions(), load or ModelLoad("render")
    source = model_source(card, load=load)
    started = time.perf_counter()
    components: dict[str, Any] = {"text_encoder": None, "tokenizer": None}
    if device == "cuda":
        # As the SkyReels-V2 docs do: bf16 transformer, fp32 VAE for clean decodes.
        components["vae"] = AutoencoderKLWan.from_pretrained(source, subfolder="vae", dtype=torch.float32)
    pipeline = _from_pretrained(card, source, device, **components)
    if options.attention_backend:
        pipeline.transformer.set_attention_backend(options.attention_backend)
    placed = time.perf_counter()
    load.read_s = placed - started
    place(pipeline, device, options.offload)
    load.to_device_s = time.perf_counter() - placed
    if options.compile:
        # Regional compilation (diffusers' recommended form): the repeated block is compiled once and the code is
        # reused by every layer, a much shorter compile than the whole model's for the same kernels.
        pipeline.transformer.compile_repeated_blocks(fullgraph=True)
    return pipeline


def load_text_encoder(
    card: ModelCard, device: str, options: PipelineOptions | None = None, load: ModelLoad | None = None
) -> DiffusionPipeline:
    """The pipeline with only its text encoder and tokenizer loaded: `encode_text` runs the pipeline's own
    `encode_prompt`, so embeddings are exactly what a whole pipeline call would compute."""
    load = load or ModelLoad("text")
    source = model_source(card, text_encoder=True, load=load)
    started = time.perf_counter()
    unloaded = ["transformer", "vae"] + (["image_encoder", "image_processor"] if card.family == "i2v" else [])
    pipeline = _from_pretrained(card, source, device, **dict.fromkeys(unloaded))
    placed = time.perf_counter()
    load.read_s = placed - started
    place(pipeline, device, (options or PipelineOptions()).offload)
    load.to_device_s = time.perf_counter() - placed
    return pipeline


def _from_pretrained(card: ModelCard, source: str, device: str, **components: Any) -> DiffusionPipeline:
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    pipeline_class = getattr(diffusers, card.pipeline_class_name)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipeline = pipeline_class.from_pretrained(source, dtype=dtype, **components)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@torch.no_grad()
def encode_text(pipeline: DiffusionPipeline, text: str) -> torch.Tensor:
    """One text's embeddings [1, 512, dim]. The pipeline encodes a prompt and its negative prompt separately with
    the same function, so one call per text gives both."""
    embeddings, _ = pipeline.encode_prompt(
        prompt=text,
        do_classifier_free_guidance=False,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        device=pipeline._execution_device,
    )
    return embeddings


def place(pipeline: DiffusionPipeline, device: str, offload: Offload) -> None:
    """Put the pipeline's models on the device, or keep their weights in host memory (offload)."""
    if offload == "model":
        # Each model moves to the device when it runs and the previous one in `model_cpu_offload_seq` leaves.
        pipeline.enable_model_cpu_offload(device=device)
    elif offload == "group":
        # As diffusers' Wan docs (the same components): text encoder in groups of 4 blocks, transformer leaf by leaf
        # with transfers overlapped on a CUDA stream; the VAE and image encoder are small and stay on the device.
        onload = torch.device(device)
        if pipeline.text_encoder is not None:
            apply_group_offloading(
                pipeline.text_encoder, onload_device=onload, offload_type="block_level", num_blocks_per_group=4
            )
        if pipeline.transformer is not None:
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
    """A row's parameters as plain (non diffusion-forcing) pipeline arguments; the generator and the prompt
    embeddings are the caller's."""
    return dict(
        height=params.height,
        width=params.width,
        num_frames=params.num_frames,
        num_inference_steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale,
    )
