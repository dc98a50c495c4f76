"""The model registry (`model/registry.yaml`): what each checkpoint serves, its limits and row defaults."""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from skyreels_batch import storage
from skyreels_batch.models.checkpoints import CheckpointError, check_checkpoint, check_hub_cache, is_remote

REGISTRY_PATH = Path(__file__).resolve().parents[2] / "model" / "registry.yaml"
# Written next to an exported embedded model so `--model DIR` keeps that model's card (defaults, limits).
CARD_FILENAME = "skyreels_batch_card.json"
# A prefix under which Hub checkpoints are mirrored as `<prefix>/<hub id>` (s3://bucket/hub/Skywork/...).
MIRROR_ENV = "SKYREELS_BATCH_MIRROR"

Family = Literal["df", "t2v", "i2v"]


class UnknownModelError(ValueError):
    """The --model value names neither a registry entry nor a diffusers directory."""


class RowDefaults(BaseModel):
    """What a manifest row gets for a column it leaves empty."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    height: int
    width: int
    num_frames: int
    base_num_frames: int
    fps: int
    num_inference_steps: int
    guidance_scale: float
    shift: float
    negative_prompt: str
    overlap_history: int = 17


class ModelCard(BaseModel):
    """One checkpoint: where it loads from, which pipeline family serves it, its limits and defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Registry name (Hub id or embedded name) or a local directory.")
    family: Family = Field(description="df (diffusion forcing), t2v or i2v.")
    defaults: RowDefaults
    max_height: int
    max_width: int
    embedded: dict[str, Any] | None = Field(
        default=None, description="Build spec of an embedded model (sizes and seed); None for Hub checkpoints."
    )
    path: str | None = Field(default=None, description="Local diffusers directory, when loaded from one.")
    uri: str | None = Field(
        default=None,
        description="A diffusers directory on object storage (any fsspec URL), fetched once per node: a checkpoint "
        "given by URL, or a Hub checkpoint's mirror.",
    )
    last_frame: bool = Field(
        default=False, description="I2V family: the transformer has a last-frame embedding (pos_embed_seq_len), FLF2V."
    )

    @property
    def pipeline_class_name(self) -> str:
        return _registry()["families"][self.family]["pipeline"]

    @property
    def modes(self) -> list[str]:
        return _registry()["families"][self.family]["modes"]


@cache
def _registry() -> dict[str, Any]:
    if not REGISTRY_PATH.is_file():
        raise FileNotFoundError(
            f"model registry not found at {REGISTRY_PATH}; install skyreels-batch from a checkout (pip install -e .)"
        )
    return yaml.safe_load(REGISTRY_PATH.read_text())


def cards() -> list[ModelCard]:
    return [ModelCard(**entry) for entry in _registry()["models"]]


def card_for(model: str) -> ModelCard:
    """The card for a registry name, a diffusers directory on object storage (any fsspec URL) or a local one;
    raises UnknownModelError otherwise, CheckpointError for a checkpoint that is not whole (see checkpoints.py)."""
    by_name = {card.name: card for card in cards()}
    if model in by_name:
        return _registry_card(by_name[model])
    if is_remote(model):
        index = check_checkpoint(model)
        base = _base_card(model, index, _read_card(storage.join(model, CARD_FILENAME)), by_name)
        return base.model_copy(update={"name": model, "uri": model, "path": None, "embedded": None})
    directory = Path(model).expanduser()
    if (directory / "model_index.json").is_file():
        index = json.loads((directory / "model_index.json").read_text())
        base = _base_card(str(directory), index, _read_card(str(directory / CARD_FILENAME)), by_name)
        return base.model_copy(update={"name": str(directory), "path": str(directory.resolve()), "embedded": None})
    raise UnknownModelError(
        f"unknown model {model!r}: not in the registry (python -m skyreels_batch.models list), "
        "not a diffusers directory with model_index.json and not a URL"
    )


def attention_heads(card: ModelCard) -> int | None:
    """The transformer's attention heads, from its config (as loaded: embedded spec, local or object-storage
    directory, the HuggingFace cache or the Hub); None where it cannot be read without loading the model."""
    if card.embedded is not None:
        return card.embedded["transformer"]["num_attention_heads"]
    try:
        if card.path is not None:
            config = (Path(card.path) / "transformer" / "config.json").read_bytes()
        elif card.uri is not None:
            config = storage.read_bytes(storage.join(card.uri, "transformer/config.json"))
        else:
            from huggingface_hub import hf_hub_download  # cached, or a 1 kB download (HF_HUB_OFFLINE: cached only)

            config = Path(hf_hub_download(card.name, "transformer/config.json")).read_bytes()
    except Exception:  # noqa: BLE001 - unreadable here: the render group checks it when it loads the model
        return None
    return json.loads(config).get("num_attention_heads")


def _registry_card(card: ModelCard) -> ModelCard:
    """A registry card as this job loads it: a Hub checkpoint from its mirror when the card or the environment names
    one (checked here, at the door), else from the Hub, which HF_HUB_OFFLINE=1 limits to the local HF cache."""
    if card.embedded is not None:
        return card
    if card.uri is None and os.environ.get(MIRROR_ENV):
        card = card.model_copy(update={"uri": f"{os.environ[MIRROR_ENV].rstrip('/')}/{card.name}"})
    if card.uri is None:
        check_hub_cache(card.name)
        return card
    pipeline = check_checkpoint(card.uri).get("_class_name")
    if pipeline != card.pipeline_class_name:
        raise CheckpointError(
            f"checkpoint {card.uri}: a {pipeline} directory; {card.name} is a {card.pipeline_class_name}"
        )
    return card


def _base_card(where: str, index: dict, sidecar: dict | None, by_name: dict[str, ModelCard]) -> ModelCard:
    """The card a diffusers directory takes: the one its sidecar names (an exported embedded model), else the first
    Hub checkpoint of its pipeline's family."""
    pipeline = index.get("_class_name")
    families = {spec["pipeline"]: family for family, spec in _registry()["families"].items()}
    if pipeline not in families:
        error = CheckpointError if is_remote(where) else UnknownModelError
        raise error(
            f"{'checkpoint ' if is_remote(where) else ''}{where}: pipeline {pipeline!r} is not a SkyReels-V2 pipeline"
        )
    if sidecar is not None:
        return by_name[sidecar["card"]]
    return next(card for card in by_name.values() if card.family == families[pipeline])


def _read_card(uri: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        return None
