"""Pipeline options applied once per actor: --offload, --attention-backend, --compile.

On this CPU-only machine host and device are the same memory, so the offload tests show the hooks are installed
and driven (including by the streaming decoder, which calls the VAE's parts directly), not the memory they save."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from diffusers.hooks.group_offloading import _is_group_offload_enabled

from skyreels_batch.config import PipelineOptions
from skyreels_batch.models import card_for
from tests.conftest import EncodeThenRender
from tests.test_modes import ROW, render

LONG_ROW = {**ROW, "id": "long", "num_frames": 45, "base_num_frames": 21, "overlap_history": 9}


def stage(output: Path, **options) -> EncodeThenRender:
    card = card_for("tiny-df")
    return EncodeThenRender(card, output=str(output), options=PipelineOptions(**options))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    plain = stage(tmp_path_factory.mktemp("none"))
    return {row["id"]: render(plain, plain.card, row) for row in (ROW, LONG_ROW)}


def test_model_offload_renders_the_same_frames_and_the_decoder_onloads_the_vae(
    reference: dict[str, np.ndarray], tmp_path: Path
) -> None:
    offloaded = stage(tmp_path, offload="model")
    vae = offloaded.pipeline.vae
    onloads = []
    pre_forward = vae._hf_hook.pre_forward
    vae._hf_hook.pre_forward = lambda module: onloads.append(module) or pre_forward(module)
    for row in (ROW, LONG_ROW):
        # Within 1/255, not bit-identical: the offload hooks move the weights from "cpu" to "cpu:0", a copy into
        # 64-byte-aligned memory, while from_pretrained leaves them where safetensors put them (40 bytes past a
        # 64-byte boundary here), and the CPU's GEMM kernels round differently for the two (latents 2e-6 apart).
        difference = np.abs(render(offloaded, offloaded.card, row).astype(int) - reference[row["id"]]).max()
        assert difference <= 1, row["id"]
    # One onload per decoded segment: 1 for the short row, 3 for the long one.
    assert len(onloads) == 4


def test_group_offload_renders_the_same_frames(reference: dict[str, np.ndarray], tmp_path: Path) -> None:
    offloaded = stage(tmp_path, offload="group")
    assert _is_group_offload_enabled(offloaded.pipeline.transformer)
    assert _is_group_offload_enabled(offloaded.encode.pipeline.text_encoder)  # in the text-encoding stage
    assert not _is_group_offload_enabled(offloaded.pipeline.vae)
    for row in (ROW, LONG_ROW):
        assert np.array_equal(render(offloaded, offloaded.card, row), reference[row["id"]]), row["id"]


def test_an_attention_backend_is_set_on_the_transformer_and_renders_the_same_video(
    reference: dict[str, np.ndarray], tmp_path: Path
) -> None:
    math = stage(tmp_path, attention_backend="_native_math")  # PyTorch's reference SDPA kernel, on any device
    backends = {block.attn1.processor._attention_backend for block in math.pipeline.transformer.blocks}
    assert backends == {"_native_math"}
    for row in (ROW, LONG_ROW):
        difference = np.abs(render(math, math.card, row).astype(int) - reference[row["id"]]).max()
        assert difference <= 2, row["id"]  # the same attention, summed in another order


@pytest.mark.slow
def test_compiled_transformer_blocks_render_the_same_video(reference: dict[str, np.ndarray], tmp_path: Path) -> None:
    compiled = stage(tmp_path, compile=True)
    blocks = compiled.pipeline.transformer.blocks
    assert all(block._compiled_call_impl is not None for block in blocks), "every repeated block is compiled"
    difference = np.abs(render(compiled, compiled.card, ROW).astype(int) - reference[ROW["id"]]).max()
    assert difference <= 2  # the same computation, fused and summed in another order
