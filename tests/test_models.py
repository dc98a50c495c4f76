"""The model registry and the embedded models, loaded through diffusers' own from_pretrained."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import SkyReelsV2DiffusionForcingPipeline

from skyreels_batch.models import UnknownModelError, card_for, cards
from skyreels_batch.models.embedded import build_pipeline, materialize
from tests.conftest import REPO

HUB_CHECKPOINTS = {
    "Skywork/SkyReels-V2-DF-1.3B-540P-Diffusers": ("df", 544, 960, 97),
    "Skywork/SkyReels-V2-DF-14B-540P-Diffusers": ("df", 544, 960, 97),
    "Skywork/SkyReels-V2-DF-14B-720P-Diffusers": ("df", 720, 1280, 121),
    "Skywork/SkyReels-V2-T2V-14B-540P-Diffusers": ("t2v", 544, 960, 97),
    "Skywork/SkyReels-V2-T2V-14B-720P-Diffusers": ("t2v", 720, 1280, 121),
    "Skywork/SkyReels-V2-I2V-1.3B-540P-Diffusers": ("i2v", 544, 960, 97),
    "Skywork/SkyReels-V2-I2V-14B-540P-Diffusers": ("i2v", 544, 960, 97),
    "Skywork/SkyReels-V2-I2V-14B-720P-Diffusers": ("i2v", 720, 1280, 121),
}


def test_registry_holds_the_eight_hub_checkpoints_with_documented_defaults() -> None:
    hub = {card.name: card for card in cards() if card.embedded is None}
    assert set(hub) == set(HUB_CHECKPOINTS)
    for name, (family, height, width, window) in HUB_CHECKPOINTS.items():
        card = hub[name]
        assert (card.family, card.defaults.height, card.defaults.width) == (family, height, width)
        assert card.defaults.base_num_frames == card.defaults.num_frames == window
        assert card.defaults.shift == (5.0 if family == "i2v" else 8.0)


def test_unknown_model_is_refused() -> None:
    with pytest.raises(UnknownModelError, match="unknown model"):
        card_for("Skywork/No-Such-Model")


def test_export_writes_a_directory_diffusers_loads(tmp_path: Path) -> None:
    target = tmp_path / "tiny-df"
    result = subprocess.run(
        [sys.executable, "-m", "skyreels_batch.models", "export", "tiny-df", str(target)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert str(target) in result.stdout
    pipeline = SkyReelsV2DiffusionForcingPipeline.from_pretrained(target)
    reference = build_pipeline(card_for("tiny-df"))
    for name in ("transformer", "vae", "text_encoder"):
        loaded, built = getattr(pipeline, name).state_dict(), getattr(reference, name).state_dict()
        assert loaded.keys() == built.keys()
        assert all(torch.equal(loaded[key], built[key]) for key in built), f"{name} weights differ"
    # A directory keeps the card it was exported from.
    assert card_for(str(target)).defaults == card_for("tiny-df").defaults


def test_models_list_prints_every_card() -> None:
    listing = subprocess.run(
        [sys.executable, "-m", "skyreels_batch.models", "list"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    for card in cards():
        assert card.name in listing


@pytest.mark.parametrize(("height", "width"), [(544, 960), (720, 1280)])
def test_embedded_transformer_takes_production_resolutions(height: int, width: int) -> None:
    # The rotary table is sized as in the real configs (rope_max_seq_len=1024), so real sizes run.
    pipeline = SkyReelsV2DiffusionForcingPipeline.from_pretrained(materialize(card_for("tiny-df")))
    transformer = pipeline.transformer
    latents = torch.randn(1, 16, 1, height // 8, width // 8)
    text = torch.randn(1, 8, transformer.config.text_dim)
    with torch.no_grad():
        out = transformer(
            latents, timestep=torch.tensor([500]), encoder_hidden_states=text, fps=[1], return_dict=False
        )[0]
    assert out.shape == latents.shape
    assert torch.isfinite(out).all()


def test_a_bf16_embedded_transformer_is_cast_as_from_pretrained_loads_one(tmp_path: Path) -> None:
    """bench-1.3b is built in bf16: its transformer keeps in float32 what diffusers' from_pretrained(torch_dtype=)
    keeps there (`.to(dtype)` would cast those too). That no float32 warning is printed is checked on the README's
    first command (test_readme.py)."""
    from diffusers import SkyReelsV2Transformer3DModel

    from skyreels_batch.models.embedded import cast_as_loaded

    config = card_for("tiny-df").embedded["transformer"]
    SkyReelsV2Transformer3DModel(**config).save_pretrained(tmp_path)
    loaded = SkyReelsV2Transformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    built = cast_as_loaded(SkyReelsV2Transformer3DModel(**config), torch.bfloat16)
    dtypes = {name: tensor.dtype for name, tensor in [*built.named_parameters(), *built.named_buffers()]}
    expected = {name: tensor.dtype for name, tensor in [*loaded.named_parameters(), *loaded.named_buffers()]}
    assert dtypes == expected
    assert {torch.float32, torch.bfloat16} <= set(dtypes.values())
