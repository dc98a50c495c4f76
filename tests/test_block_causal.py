"""Asynchronous diffusion forcing without the dense mask: a flex-attention BlockMask gives the transformer's output
diffusers' dense-mask forward gives."""

from __future__ import annotations

import pytest
import torch
from diffusers import SkyReelsV2Transformer3DModel
from torch.nn.attention.flex_attention import create_block_mask

from skyreels_batch.models import card_for
from skyreels_batch.models.embedded import materialize
from skyreels_batch.render.diffusion_forcing import block_causal_attention, causal_block_mask


@pytest.fixture(scope="module")
def transformer() -> SkyReelsV2Transformer3DModel:
    return SkyReelsV2Transformer3DModel.from_pretrained(materialize(card_for("tiny-df")), subfolder="transformer")


def forward(transformer: SkyReelsV2Transformer3DModel, frames: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, frames, 4, 6, generator=generator)
    timestep = torch.randint(0, 1000, (1, frames), generator=generator)
    text = torch.randn(1, 512, transformer.config.text_dim, generator=generator)
    with torch.no_grad():
        return transformer(
            hidden_states=latents, timestep=timestep, encoder_hidden_states=text, enable_diffusion_forcing=True, fps=[1]
        ).sample


@pytest.mark.parametrize("frames, causal_block_size", [(10, 5), (9, 3), (6, 2)])
def test_the_block_mask_forward_equals_diffusers_dense_mask(transformer, frames: int, causal_block_size: int) -> None:
    transformer._set_ar_attention(causal_block_size)  # diffusers' own path: the dense [1, 1, L, L] mask
    dense = forward(transformer, frames, seed=frames)
    hooks = len(transformer._forward_pre_hooks)
    with block_causal_attention(transformer, causal_block_size):
        assert transformer.config.num_frame_per_block == 1  # the forward builds no dense mask
        blocked = forward(transformer, frames, seed=frames)
    torch.testing.assert_close(blocked, dense, rtol=1e-5, atol=1e-5)
    transformer._set_ar_attention(1)
    assert not torch.allclose(forward(transformer, frames, seed=frames), dense, atol=1e-3)  # the mask mattered
    assert len(transformer._forward_pre_hooks) == hooks
    assert all(block.attn1.processor._attention_backend is None for block in transformer.blocks)


@pytest.mark.parametrize("tokens, tokens_per_block", [(24, 8), (300, 90), (1000, 128), (2561, 300), (4000, 1000)])
def test_the_block_mask_built_tile_by_tile_is_create_block_masks(tokens: int, tokens_per_block: int) -> None:
    """The same tiles, full and partial, as torch's create_block_mask, which evaluates every pair of tokens to find
    them (65 GB at a 97-frame 720P window); blocks that end inside a tile, and sequences that end inside one."""
    ours = causal_block_mask(tokens, tokens_per_block, torch.device("cpu"))
    reference = create_block_mask(
        lambda batch, head, query, key: query // tokens_per_block >= key // tokens_per_block,
        None,
        None,
        tokens,
        tokens,
        device="cpu",
        _compile=False,
    )
    for counts, indices in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
        assert torch.equal(getattr(ours, counts), getattr(reference, counts))
        for row, count in enumerate(getattr(ours, counts).flatten().tolist()):
            mine, theirs = getattr(ours, indices)[0, 0, row, :count], getattr(reference, indices)[0, 0, row, :count]
            assert torch.equal(mine.sort().values, theirs.sort().values)
    query, key = torch.arange(tokens).view(-1, 1), torch.arange(tokens).view(1, -1)
    assert torch.equal(ours.mask_mod(0, 0, query, key), (query // tokens_per_block) >= (key // tokens_per_block))


def test_the_block_mask_of_a_720p_window_takes_megabytes() -> None:
    mask = causal_block_mask(25 * 45 * 80, 5 * 45 * 80, torch.device("cpu"))  # 97 frames at 720P: 90,000 tokens
    size = sum(part.numel() * part.element_size() for part in mask.as_tuple() if isinstance(part, torch.Tensor))
    assert size < 16 * 2**20  # the dense mask: 8.1 GB
