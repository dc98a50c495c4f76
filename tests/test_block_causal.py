"""Asynchronous diffusion forcing without the dense mask: a flex-attention BlockMask gives the transformer's output
diffusers' dense-mask forward gives."""

from __future__ import annotations

import pytest
import torch
from diffusers import SkyReelsV2Transformer3DModel

from skyreels_batch.diffusion_forcing import block_causal_attention, causal_block_mask
from skyreels_batch.embedded import materialize
from skyreels_batch.models import card_for


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


def test_the_block_mask_lets_a_token_see_its_block_and_the_ones_before() -> None:
    mask = causal_block_mask(tokens=6 * 4, tokens_per_block=2 * 4, device=torch.device("cpu"))  # 6 frames of 4
    dense = mask.to_dense()  # [1, 1, tiles, tiles]: one tile of 128 tokens here, partly allowed
    assert dense.shape[-1] == 1 and int(dense.sum()) == 1
    query, key = torch.arange(24).view(-1, 1), torch.arange(24).view(1, -1)
    allowed = mask.mask_mod(0, 0, query, key)
    expected = (query // 8) >= (key // 8)
    assert torch.equal(allowed, expected) and int(allowed.sum()) == 8 * 8 * (1 + 2 + 3)
