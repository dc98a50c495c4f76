"""Diffusion forcing one segment at a time, with the SkyReels-V2 pipeline's own components.

Why this module reaches inside diffusers: `SkyReelsV2DiffusionForcingPipeline.__call__` renders a long video in
one call, keeps every segment's latents and decodes the whole video at the end, so memory grows with length and a
crash loses everything. To run each segment as its own task we call the pipeline's own pieces (`prepare_latents`,
`generate_timestep_matrix`, the transformer, per-frame scheduler copies) in the order its `__call__` does, with
prompt embeddings from the text-encoding stage (embeddings.py), and nothing else of diffusers is copied. Two
deliberate differences:

- the `addnoise_condition` noise is drawn from the row's seeded generator (diffusers draws it from torch's global
  RNG, so its long videos are not reproducible);
- `causal_block_size` is always set explicitly: the pipeline stores it in the loaded transformer's config, where
  an async row would otherwise leak its attention mode into every later row.

tests/test_long_video.py pins this module to diffusers' in-process result (latents equal to float tolerance).

Sequence parallelism (`enable_sequence_parallel`, for `--gpus-per-video`) is diffusers' context parallelism with a
plan of our own: the SkyReels-V2 transformer has none, and Wan's, which otherwise fits it, splits the
diffusion-forcing timestep per frame, so a window's latent frames would have to divide by the ranks (25 do not
divide by 2). tests/test_sequence_parallel.py pins it to one process's latents.

Step caches (step_cache.py) are diffusers' hooks. FirstBlockCache finds what a block returns in diffusers'
`TransformerBlockRegistry`, which lists Wan's block and not SkyReels-V2's (the same forward: hidden states in, hidden
states out), so `register_cache_blocks` adds it; and the hooks' state is reset before every window
(`reset_step_cache`), which a pipeline call does only when it ends.

Whether an attention backend takes a mask (`takes_attention_mask`) is asked of the backend's own function: every
backend's signature has `attn_mask`, and those that cannot use one (flash, _flash_3, sage, ...) refuse it only when
called, which without this check happens on a GPU after a model load.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from copy import deepcopy
from functools import lru_cache
from unittest import mock

import numpy as np
import torch
from diffusers import (
    ContextParallelConfig,
    SkyReelsV2DiffusionForcingImageToVideoPipeline,
    SkyReelsV2DiffusionForcingPipeline,
    SkyReelsV2DiffusionForcingVideoToVideoPipeline,
    SkyReelsV2Transformer3DModel,
)
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify
from diffusers.models.transformers.transformer_skyreels_v2 import SkyReelsV2TransformerBlock
from diffusers.utils.torch_utils import randn_tensor
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.attention.flex_attention import _DEFAULT_SPARSE_BLOCK_SIZE, BlockMask

from skyreels_batch.plan import Segment, VideoPlan
from skyreels_batch.schema import RenderParams
from skyreels_batch.step_cache import CacheConfig


@torch.no_grad()
def denoise_segment(
    pipeline: SkyReelsV2DiffusionForcingPipeline,
    *,
    plan: VideoPlan,
    segment: Segment,
    previous_latents: torch.Tensor | None,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None,
    generator: torch.Generator,
    params: RenderParams,
    first_frame: torch.Tensor | None = None,
    last_frame: torch.Tensor | None = None,
    clip: torch.Tensor | None = None,
) -> torch.Tensor:
    """The latents of one window [1, C, window, h, w], float32, exactly as diffusers' loop computes them.

    `previous_latents` ends with the video's latents so far (at least the overlap); None for the first segment.
    `first_frame` / `last_frame` (preprocessed images, i2v and flf2v) are encoded the way
    `SkyReelsV2DiffusionForcingImageToVideoPipeline` does: the first becomes the first window's ready first latent
    frame; the last rides, frozen, at the end of the final window and is not part of the returned latents.
    diffusers sizes that final window wrongly for long videos (it adds the overlap's length, not the last frame's);
    here it is one frame, which is what its short videos do. `clip` (v2v, a preprocessed video) gives the first
    window its overlap: the latents of the clip's last `overlap_history` frames, as
    `SkyReelsV2DiffusionForcingVideoToVideoPipeline` encodes them.
    """
    device = pipeline._execution_device
    transformer = pipeline.transformer
    reset_step_cache(transformer)
    steps, causal_block_size, addnoise = params.num_inference_steps, params.causal_block_size, params.addnoise_condition
    long_video = plan.chained

    pipeline.scheduler.set_timesteps(steps, device=device)
    timesteps = pipeline.scheduler.timesteps
    window_args = dict(
        video_latents=previous_latents,
        base_latent_num_frames=plan.window_latent_frames if long_video else None,
        causal_block_size=causal_block_size,
        overlap_history_latent_frames=plan.overlap_latent_frames if long_video else None,
        long_video_iter=segment.index if long_video else None,
    )
    size = (params.height, params.width, plan.model_num_frames, torch.float32, device, generator)
    end_latents = None
    if clip is not None and segment.index == 0:
        video_pipeline = SkyReelsV2DiffusionForcingVideoToVideoPipeline.from_pipe(pipeline)
        window_args["overlap_history"] = params.overlap_history
        latents, window, prefix, prefix_frames = video_pipeline.prepare_latents(
            clip, 1, transformer.config.in_channels, *size, None, **window_args
        )
    elif first_frame is not None and segment.index == 0:
        image_pipeline = SkyReelsV2DiffusionForcingImageToVideoPipeline.from_pipe(pipeline)
        latents, window, condition, prefix_frames = image_pipeline.prepare_latents(
            first_frame, 1, pipeline.vae.config.z_dim, *size, None, last_frame, **window_args
        )
        prefix = condition[: (condition.shape[0] + 1) // 2]
        end_latents = condition[condition.shape[0] // 2 :] if last_frame is not None else None
    else:
        latents, window, prefix, prefix_frames = pipeline.prepare_latents(
            1, transformer.config.in_channels, *size, None, **window_args
        )
    assert window == segment.length, f"plan says {segment.length} latent frames, diffusers {window}"
    if prefix_frames > 0:
        latents[:, :, :prefix_frames] = prefix.to(transformer.dtype)
    if segment.end_frame:
        if end_latents is None:  # a long video: the last frame's latent, encoded now for the final window
            end_latents = encode_frame(pipeline, last_frame, generator)
        latents = torch.cat([latents, end_latents.to(transformer.dtype).to(latents.dtype)], dim=2)
        window += segment.end_frame

    schedulers = []
    for _ in range(window):
        scheduler = deepcopy(pipeline.scheduler)
        scheduler.set_timesteps(steps, device=device)
        schedulers.append(scheduler)
    step_matrix, _, update_masks, intervals = pipeline.generate_timestep_matrix(
        window, timesteps, window, params.ar_step, prefix_frames, causal_block_size
    )
    if segment.end_frame:
        step_matrix[:, -segment.end_frame :] = 0
        update_masks[:, -segment.end_frame :] = False
    fps_embeds = [0 if params.fps == 16 else 1]

    with block_causal_attention(transformer, causal_block_size):
        for t, update_mask, (start, end) in zip(step_matrix, update_masks, intervals, strict=True):
            model_input = latents[:, :, start:end].to(transformer.dtype).clone()
            timestep = t.expand(1, -1)[:, start:end].clone()
            if addnoise > 0 and start < prefix_frames:
                conditioned = model_input[:, :, start:prefix_frames]
                noise = randn_tensor(conditioned.shape, generator=generator, device=device, dtype=conditioned.dtype)
                factor = 0.001 * addnoise
                model_input[:, :, start:prefix_frames] = conditioned * (1.0 - factor) + noise * factor
                timestep[:, start:prefix_frames] = addnoise

            noise_pred = _predict(transformer, model_input, timestep, prompt_embeds, fps_embeds, "cond")
            if negative_prompt_embeds is not None:
                noise_uncond = _predict(
                    transformer, model_input, timestep, negative_prompt_embeds, fps_embeds, "uncond"
                )
                noise_pred = noise_uncond + params.guidance_scale * (noise_pred - noise_uncond)

            for index in range(start, end):
                if update_mask[index].item():
                    latents[:, :, index] = schedulers[index].step(
                        noise_pred[:, :, index - start], t[index], latents[:, :, index], return_dict=False
                    )[0]
    return latents[:, :, : segment.length]


@torch.no_grad()
def encode_frame(pipeline: SkyReelsV2DiffusionForcingPipeline, frame: torch.Tensor, generator) -> torch.Tensor:
    """One preprocessed image -> its normalised latent frame [1, C, 1, h, w], as the image pipeline encodes it."""
    image_pipeline = SkyReelsV2DiffusionForcingImageToVideoPipeline.from_pipe(pipeline)
    _, _, condition, _ = image_pipeline.prepare_latents(
        frame,
        1,
        pipeline.vae.config.z_dim,
        frame.shape[-2],
        frame.shape[-1],
        1,
        torch.float32,
        pipeline._execution_device,
        None,
    )
    return condition


def _predict(transformer, model_input, timestep, embeds, fps_embeds, branch: str) -> torch.Tensor:
    with transformer.cache_context(branch):
        return transformer(
            hidden_states=model_input,
            timestep=timestep,
            encoder_hidden_states=embeds,
            enable_diffusion_forcing=True,
            fps=fps_embeds,
            return_dict=False,
        )[0]


# Tokens of a window above which the CPU compiles flex attention too (4,096: 0.8 GB of uncompiled scores at 12 heads).
COMPILE_ABOVE = 4096


@contextmanager
def block_causal_attention(
    transformer: SkyReelsV2Transformer3DModel, causal_block_size: int, *, compile_above: int | None = COMPILE_ABOVE
) -> Iterator[None]:
    """The transformer's self-attention, for the forward passes inside, lets a token see its own causal block of
    latent frames and those before it, as SkyReels' asynchronous diffusion forcing wants.

    diffusers' transformer does this with a dense boolean mask over every pair of tokens, built in each forward (8 GB
    for a 97-frame 720P window), which only mask-taking kernels accept. Here its `num_frame_per_block` stays 1, so it
    builds none, and each block's self-attention gets a flex-attention BlockMask instead (a few MB: which 128-token
    tiles to visit), through diffusers' flex backend, as its AnyFlow FAR model does. The self-attention is compiled
    off the CPU and, on the CPU, for windows above `compile_above` tokens (None: never): uncompiled, flex attention
    keeps every score of every head (62 GB at 36,000 tokens, bench/attention_mask.py), and on small windows
    compiling costs more than it saves. A video split over ranks keeps the dense mask: diffusers' flex backend has
    no context parallelism."""
    split = transformer._parallel_config is not None
    transformer._set_ar_attention(causal_block_size if split else 1)
    if causal_block_size == 1 or split:
        yield
        return
    patch_frames, patch_height, patch_width = transformer.config.patch_size
    current: dict[str, BlockMask] = {}

    def build_mask(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        frames, height, width = kwargs["hidden_states"].shape[2:]
        frames //= patch_frames
        tokens = frames * (height // patch_height) * (width // patch_width)
        current["mask"] = causal_block_mask(
            tokens, tokens // frames * causal_block_size, kwargs["hidden_states"].device
        )
        if compile_above is not None and (transformer.device.type != "cpu" or tokens > compile_above):
            for block in transformer.blocks:  # once; a block compiled by --compile compiles its attention with it
                if block._compiled_call_impl is None and block.attn1._compiled_call_impl is None:
                    block.attn1.compile()

    def give_mask(block: torch.nn.Module, args: tuple) -> tuple:
        return (*args[:4], current["mask"], *args[5:])  # forward(hidden, encoder_hidden, temb, rotary, mask)

    backends = [(block.attn1, block.attn1.processor._attention_backend) for block in transformer.blocks]
    hooks = [transformer.register_forward_pre_hook(build_mask, with_kwargs=True)]
    for block in transformer.blocks:
        hooks.append(block.register_forward_pre_hook(give_mask))
        block.attn1.set_attention_backend("flex")
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for attention, backend in backends:
            attention.processor._attention_backend = backend


@lru_cache(maxsize=8)
def causal_block_mask(tokens: int, tokens_per_block: int, device: torch.device) -> BlockMask:
    """Token q attends token k when k's causal block is not after q's. Built tile by tile (128 x 128 tokens), from
    where each tile's first and last tokens fall: `create_block_mask` would evaluate the rule on every pair of tokens,
    65 GB of int64 at a 97-frame 720P window, the very cost the BlockMask is there to avoid."""

    def mask_mod(batch, head, query, key):
        return query // tokens_per_block >= key // tokens_per_block

    tile = _DEFAULT_SPARSE_BLOCK_SIZE
    starts = torch.arange(0, tokens, tile)
    first, last = starts // tokens_per_block, (torch.clamp(starts + tile, max=tokens) - 1) // tokens_per_block
    full = last[None, :] <= first[:, None]  # [query tile, key tile]: every key's block at or before every query's
    if tokens % tile:  # tiles running past the end are never full, as create_block_mask has them
        full[-1, :] = full[:, -1] = False
    partial = (first[None, :] <= last[:, None]) & ~full  # some pairs of the tile are allowed, not all

    def packed(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        order = torch.argsort((~tiles).to(torch.uint8), dim=-1, stable=True)  # the tiles that count first, in order
        return tiles.sum(-1, dtype=torch.int32)[None, None], order.to(torch.int32)[None, None]

    (counts, indices), (full_counts, full_indices) = packed(partial), packed(full)
    return BlockMask.from_kv_blocks(
        counts.to(device),
        indices.to(device),
        full_counts.to(device),
        full_indices.to(device),
        BLOCK_SIZE=tile,
        mask_mod=mask_mod,
        seq_lengths=(tokens, tokens),
    )


def register_cache_blocks() -> None:
    """Lets FirstBlockCache (and MagCache) hook SkyReels-V2's blocks: their forward returns the hidden states alone."""
    TransformerBlockRegistry.register(
        SkyReelsV2TransformerBlock,
        TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=None),
    )


def use_step_cache(transformer: SkyReelsV2Transformer3DModel, config: CacheConfig | None) -> None:
    """The row's step cache on the transformer (None: none), in place of the last row's if it differs."""
    if transformer._cache_config == config:
        return
    if transformer.is_cache_enabled:
        transformer.disable_cache()
    if config is not None:
        register_cache_blocks()
        transformer.enable_cache(config)


def reset_step_cache(transformer: SkyReelsV2Transformer3DModel) -> None:
    """A new window starts a new sampling run: nothing a hook kept from the last one carries over."""
    if transformer.is_cache_enabled:
        transformer._reset_stateful_cache()


def enable_sequence_parallel(transformer: SkyReelsV2Transformer3DModel, ranks: int, device: str) -> None:
    """Split every window's token sequence over the `ranks` processes of the default torch.distributed group
    (Ulysses: each rank runs attention over all tokens for its share of the heads). Every rank calls this, after
    loading the same weights, and then runs the same forward calls; every rank gets the whole output."""
    check_heads(transformer, ranks)
    mesh = init_device_mesh(device, (1, ranks), mesh_dim_names=("ring", "ulysses"))
    config = ContextParallelConfig(ulysses_degree=ranks, mesh=mesh)
    # diffusers records each rank's device as `rank % torch.accelerator.device_count()`, which divides by zero on a
    # host without accelerators; that device is only recorded, and a CPU group's mesh is built above.
    count = max(1, torch.accelerator.device_count())
    with mock.patch.object(torch.accelerator, "device_count", lambda: count):
        transformer.enable_parallelism(config=config, cp_plan=sequence_parallel_plan(len(transformer.blocks)))


def takes_attention_mask(backend: str) -> bool:
    """Whether diffusers' attention backend `backend` takes the mask the transformer builds for asynchronous rows
    (`causal_block_size` > 1: a boolean [1, 1, L, L]). The backend is called with a tiny one on the CPU: those that
    take no mask refuse it before any kernel runs; any other failure (no kernel here) is not about the mask."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    function = _AttentionBackendRegistry._backends[AttentionBackendName(backend)]
    tokens = torch.zeros(1, 4, 1, 8)
    try:
        with warnings.catch_warnings():  # flex attention warns that it is not compiled
            warnings.simplefilter("ignore")
            function(query=tokens, key=tokens, value=tokens, attn_mask=torch.ones(1, 1, 4, 4, dtype=torch.bool))
    except ValueError as error:
        return "mask" not in str(error).lower()
    except Exception:  # noqa: BLE001 - a missing kernel or device, not the mask
        return True
    return True


def check_heads(transformer: SkyReelsV2Transformer3DModel, ranks: int) -> None:
    """Each rank attends with an equal share of the heads (SkyReels-V2 1.3B has 12, 14B 40)."""
    heads = transformer.config.num_attention_heads
    if heads % ranks:
        raise ValueError(f"--gpus-per-video {ranks} does not divide the transformer's {heads} attention heads")


def sequence_parallel_plan(num_blocks: int) -> dict:
    """Where the token sequence is split and gathered. The rotary embedding and the first block's input are split
    along the sequence. Diffusion forcing modulates each token by its frame's timestep: the forward hands every
    block the same per-token tensor [B, 6, tokens, dim], so each block takes its share of it (a plain checkpoint's
    is per video, [B, 6, dim], and left whole). The last block's output is gathered, so the final norm, whose
    modulation is per token too, and the projection see the whole sequence."""
    split_sequence = ContextParallelInput(split_dim=1, expected_dims=4, split_output=True)
    return {
        "rope": {0: split_sequence, 1: split_sequence},
        "blocks.0": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)},
        "blocks.*": {"temb": ContextParallelInput(split_dim=2, expected_dims=4, split_output=False)},
        f"blocks.{num_blocks - 1}": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


class StreamingDecoder:
    """Decodes a video segment by segment, bit-identical to one whole-video `AutoencoderKLWan.decode`.

    The Wan VAE decoder is causal in time and already decodes one latent frame at a time, carrying a cache of its
    last features from frame to frame (its `_decode`). Keeping that cache between segments, instead of clearing
    it, makes the seams exact where decoding each segment with a few frames of context does not (the cache is
    recurrent: on the embedded model 12 frames of context still leave the seam at 30 dB). Memory stays one
    segment's worth. A video resumed elsewhere rebuilds the cache by replaying its earlier latents (`skip`).
    """

    def __init__(self, pipeline: SkyReelsV2DiffusionForcingPipeline) -> None:
        self.vae = pipeline.vae
        self.video_processor = pipeline.video_processor
        self.cache: list[torch.Tensor | None] = [None] * self.vae._cached_conv_counts["decoder"]
        self.frames_seen = 0

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """The next latent frames of the video -> their float frames [T, H, W, 3] in [0, 1]."""
        video = torch.cat(list(self._decode_frames(latents)), dim=2)
        if self.vae.config.patch_size is not None:
            video = unpatchify(video, patch_size=self.vae.config.patch_size)
        video = torch.clamp(video, min=-1.0, max=1.0)
        return self.video_processor.postprocess_video(video, output_type="np")[0]

    @torch.no_grad()
    def skip(self, latents: torch.Tensor) -> None:
        """Advance past latent frames decoded by an earlier run, discarding their pixels."""
        for _ in self._decode_frames(latents):
            pass

    def _decode_frames(self, latents: torch.Tensor):
        vae = self.vae
        # Model offload hooks wrap `forward`, `encode` and `decode`; this calls the VAE's parts directly, so it
        # onloads the VAE itself, as diffusers' `apply_forward_hook` does for `decode`.
        hook = getattr(vae, "_hf_hook", None)
        if hook is not None:
            hook.pre_forward(vae)
        latents = latents.to(vae.device, vae.dtype)
        mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(latents)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(latents)
        x = vae.post_quant_conv(latents / inverse_std + mean)
        for index in range(x.shape[2]):
            yield vae.decoder(
                x[:, :, index : index + 1],
                feat_cache=self.cache,
                feat_idx=[0],
                first_chunk=self.frames_seen == 0,
            )
            self.frames_seen += 1
