"""The manifest schema: one pydantic model is the source of truth for a manifest row.

A row is validated in two steps: `ManifestRow` checks what a row means on its own (types, ranges, the id), and
`resolve` fills the model card's defaults and checks what depends on the model (sizes, frame counts).
The result, `RenderParams`, is everything a render needs and is recorded in the results index.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from skyreels_batch.models import ModelCard
from skyreels_batch.plan import TEMPORAL_FACTOR, VideoPlan, plan_video
from skyreels_batch.step_cache import parse_cache

ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
Mode = Literal["t2v", "i2v", "flf2v", "v2v"]
CONDITIONING = {"t2v": (), "i2v": ("image",), "flf2v": ("image", "last_image"), "v2v": ("video",)}
MAX_SEED = 2**63 - 1
# Height and width must be multiples of the VAE's spatial factor (8) times the transformer's patch (2).
SPATIAL_MULTIPLE = 16


class RowError(ValueError):
    """A manifest row that cannot be rendered; the message names the row and the field."""


class ManifestRow(BaseModel):
    """One manifest row, as written by the user. Empty optional columns take the model card's defaults."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str = Field(
        pattern=ID_PATTERN,
        description="Unique name of the video; the output is `<output>/videos/<id>.mp4`. "
        "1-128 characters from `A-Z a-z 0-9 . _ -`, not `.` or `..`.",
    )
    prompt: str = Field(min_length=1, description="What the video shows.")
    negative_prompt: str | None = Field(default=None, description="What to steer away from (card default).")
    mode: Mode | None = Field(
        default=None,
        description="`t2v` (text-to-video, default), `i2v` (`image` is the first frame), `flf2v` (`image` first, "
        "`last_image` last), `v2v` (continue the clip `video`).",
    )
    image: str | None = Field(default=None, description="First frame (i2v, flf2v): local path or fsspec URL.")
    last_image: str | None = Field(default=None, description="Last frame (flf2v): local path or fsspec URL.")
    video: str | None = Field(default=None, description="Clip to extend (v2v): an MP4 at a local path or fsspec URL.")
    num_frames: int | None = Field(default=None, ge=1, description="Frames in the video, 4k+1 (card default).")
    height: int | None = Field(default=None, ge=SPATIAL_MULTIPLE, description="Pixels, a multiple of 16.")
    width: int | None = Field(default=None, ge=SPATIAL_MULTIPLE, description="Pixels, a multiple of 16.")
    fps: int | None = Field(default=None, ge=1, le=120, description="Frames per second of the MP4.")
    seed: int | None = Field(
        default=None, ge=0, le=MAX_SEED, description="Random seed; empty derives one stably from `id`."
    )
    num_inference_steps: int | None = Field(default=None, ge=1, le=1000, description="Denoising steps.")
    guidance_scale: float | None = Field(
        default=None, ge=0.0, le=30.0, description="Classifier-free guidance; 1 or less turns it off."
    )
    shift: float | None = Field(default=None, gt=0.0, le=100.0, description="Flow-matching scheduler shift.")
    base_num_frames: int | None = Field(
        default=None, ge=1, description="Frames per model window, 4k+1 (card default: 97 at 540P, 121 at 720P)."
    )
    overlap_history: int | None = Field(
        default=None, ge=1, description="Frames each window after the first continues from, 4k+1 (default 17)."
    )
    addnoise_condition: float | None = Field(
        default=None, ge=0.0, le=60.0, description="Noise added to the overlap frames for smoother long videos (0-60)."
    )
    ar_step: int | None = Field(default=None, ge=0, description="Asynchronous diffusion forcing lag; 0 is synchronous.")
    causal_block_size: int | None = Field(
        default=None, ge=1, description="Latent frames per causal block (async mode); must divide every window."
    )
    lora: str | None = Field(
        default=None,
        description="A LoRA in diffusers/peft format: a .safetensors file or a directory holding "
        "pytorch_lora_weights.safetensors, at a local path or fsspec URL.",
    )
    lora_scale: float | None = Field(default=None, ge=-10.0, le=10.0, description="LoRA weight (default 1; 0: off).")
    segment_prompts: list[str] | None = Field(
        default=None, min_length=1, description="Prompt travel: segment k uses prompt k, the last one repeating."
    )
    cache: str | None = Field(
        default=None,
        description="Step cache: `first_block:THRESHOLD` (diffusers' FirstBlockCache, e.g. 0.1) or "
        "`taylorseer:INTERVAL` (TaylorSeer lite, e.g. 4); empty: none. See docs/performance.md.",
    )

    @field_validator("id")
    @classmethod
    def _not_a_relative_path(cls, value: str) -> str:
        if value in {".", ".."}:
            raise ValueError("must not be '.' or '..'")
        return value

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("cache")
    @classmethod
    def _a_cache_diffusers_applies(cls, value: str | None) -> str | None:
        if value is not None and value.strip():
            parse_cache(value)  # its ValueError says what is accepted
            return value.strip()
        return None

    @field_validator("segment_prompts")
    @classmethod
    def _no_blank_segment_prompt(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not prompt.strip() for prompt in value):
            raise ValueError("must not contain blank prompts")
        return value


class RenderParams(BaseModel):
    """A row with every parameter resolved: what the pipeline is called with, recorded in the results."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    prompt: str
    negative_prompt: str
    mode: Mode
    image: str | None
    last_image: str | None
    video: str | None
    num_frames: int  # for v2v: the frames added after the clip
    height: int | None  # None: follows the first frame, fitted to the model's area by the render actor
    width: int | None
    fps: int
    seed: int
    num_inference_steps: int
    guidance_scale: float
    shift: float
    base_num_frames: int
    overlap_history: int
    addnoise_condition: float
    ar_step: int
    causal_block_size: int
    segment_prompts: tuple[str, ...] | None
    lora: str | None
    lora_scale: float
    model: str
    # Left out of the JSON when unset, so rows without a cache keep the request hash they had before the column.
    cache: str | None = Field(default=None, exclude_if=lambda value: value is None)

    def prompt_for(self, segment_index: int) -> str:
        if not self.segment_prompts:
            return self.prompt
        return self.segment_prompts[min(segment_index, len(self.segment_prompts) - 1)]


def manifest_columns() -> dict[str, str]:
    """Column name -> description, for the README and `--help`."""
    return {name: field.description or "" for name, field in ManifestRow.model_fields.items()}


def derive_seed(video_id: str) -> int:
    """A seed that depends only on the id: stable across machines, runs and Python versions."""
    digest = hashlib.sha256(f"skyreels-batch:{video_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & MAX_SEED


def row_label(raw: dict[str, Any]) -> str:
    value = raw.get("id")
    return f"row {value!r}" if isinstance(value, str) and value else "row with no valid id"


def resolve(raw: dict[str, Any], card: ModelCard, *, max_frames: int) -> RenderParams:
    """Validate a raw manifest row against the schema and the model card; raise RowError naming row and field."""
    label = row_label(raw)
    try:
        row = ManifestRow.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in issue['loc']) or 'row'}: {issue['msg']}" for issue in error.errors()
        )
        raise RowError(f"{label}: {problems}") from None

    defaults = card.defaults
    mode = row.mode or "t2v"
    for field in ("image", "last_image", "video"):
        if getattr(row, field) and field not in CONDITIONING[mode]:
            raise RowError(f"{label}: {field}: not used by mode {mode!r}")
        if field in CONDITIONING[mode] and not getattr(row, field):
            raise RowError(f"{label}: {field}: required by mode {mode!r}")
    if (row.height is None) != (row.width is None):
        raise RowError(f"{label}: height/width: set both or neither")
    sized_by_image = mode != "t2v" and row.height is None  # the image's or the clip's size, fitted
    params = RenderParams(
        id=row.id,
        prompt=row.prompt,
        negative_prompt=defaults.negative_prompt if row.negative_prompt is None else row.negative_prompt,
        mode=mode,
        image=row.image,
        last_image=row.last_image,
        video=row.video,
        # v2v adds frames in whole latent frames (4 each): a window's worth by default.
        num_frames=row.num_frames or (defaults.num_frames - 1 if mode == "v2v" else defaults.num_frames),
        height=row.height or (None if sized_by_image else defaults.height),
        width=row.width or (None if sized_by_image else defaults.width),
        fps=row.fps or defaults.fps,
        seed=derive_seed(row.id) if row.seed is None else row.seed,
        num_inference_steps=row.num_inference_steps or defaults.num_inference_steps,
        guidance_scale=defaults.guidance_scale if row.guidance_scale is None else row.guidance_scale,
        shift=row.shift or defaults.shift,
        base_num_frames=row.base_num_frames or defaults.base_num_frames,
        overlap_history=row.overlap_history or defaults.overlap_history,
        addnoise_condition=row.addnoise_condition or 0.0,
        ar_step=row.ar_step or 0,
        causal_block_size=row.causal_block_size or 1,
        segment_prompts=tuple(row.segment_prompts) if row.segment_prompts else None,
        lora=row.lora,
        lora_scale=1.0 if row.lora_scale is None else row.lora_scale,
        model=card.name,
        cache=row.cache,
    )
    _check_against_card(params, card, max_frames, label)
    return params


def _check_against_card(params: RenderParams, card: ModelCard, max_frames: int, label: str) -> None:
    def fail(field: str, message: str) -> None:
        raise RowError(f"{label}: {field}: {message}")

    if params.mode not in card.modes:
        fail("mode", f"{params.mode!r} is not served by {card.name} ({card.family} family serves {card.modes})")
    if card.family == "i2v" and params.mode == "flf2v" and not card.last_frame:
        fail(
            "mode",
            f"flf2v: {card.name} was converted without a last-frame embedding (diffusers fails on it with a "
            "tensor-size error); use a diffusion-forcing checkpoint",
        )
    for field in ("num_frames", "base_num_frames", "overlap_history"):
        if field == "num_frames" and params.mode == "v2v":
            if params.num_frames % TEMPORAL_FACTOR:
                fail(field, f"v2v adds frames 4 at a time: a multiple of 4 (e.g. 16, 96), got {params.num_frames}")
        elif getattr(params, field) % TEMPORAL_FACTOR != 1:
            fail(field, f"must be 4k+1 (e.g. 17, 97), got {getattr(params, field)}")
    if params.num_frames > max_frames:
        fail("num_frames", f"{params.num_frames} is above --max-frames {max_frames}")
    if params.base_num_frames > card.defaults.base_num_frames:
        window = card.defaults.base_num_frames
        fail("base_num_frames", f"{params.base_num_frames} is above {card.name}'s window of {window}")
    if params.mode == "v2v" and params.overlap_history >= params.base_num_frames:
        fail("overlap_history", f"must be below base_num_frames ({params.base_num_frames})")
    if params.num_frames > params.base_num_frames:
        if card.family != "df":
            limit = params.base_num_frames
            fail("num_frames", f"{params.num_frames} frames need a diffusion-forcing model ({card.name}: {limit})")
        if params.overlap_history >= params.base_num_frames:
            fail("overlap_history", f"must be below base_num_frames ({params.base_num_frames})")
    if (params.ar_step or params.causal_block_size > 1 or params.addnoise_condition) and card.family != "df":
        fail("ar_step", f"asynchronous and long-video options need a diffusion-forcing model, not {card.name}")
    plan = plan_for(params)
    uneven = [s.denoised_length for s in plan.segments if s.denoised_length % params.causal_block_size]
    if uneven:
        fail("causal_block_size", f"{params.causal_block_size} does not divide the windows' latent frames {uneven}")
    if params.height is not None:
        check_size(params.height, params.width, card, label)


def check_size(height: int, width: int, card: ModelCard, label: str) -> None:
    """Height and width against the spatial multiple and the model's maximum (both orientations)."""
    for field, value in (("height", height), ("width", width)):
        if value % SPATIAL_MULTIPLE:
            raise RowError(f"{label}: {field}: must be a multiple of {SPATIAL_MULTIPLE}, got {value}")
    longest, area = max(card.max_height, card.max_width), card.max_height * card.max_width
    if max(height, width) > longest or height * width > area:
        raise RowError(
            f"{label}: height/width: {height}x{width} is above {card.name}'s maximum of "
            f"{card.max_height}x{card.max_width} (either orientation)"
        )


def frame_tokens(height: int, width: int) -> int:
    """Transformer tokens per latent frame: the VAE's 8x and the patch's 2x, both ways."""
    return (height // SPATIAL_MULTIPLE) * (width // SPATIAL_MULTIPLE)


def check_split(height: int, width: int, ranks: int, label: str) -> None:
    """A video split over `ranks` (--gpus-per-video) gives every rank the same number of transformer tokens: each
    frame's must divide by it (diffusers' Ulysses attention splits evenly)."""
    tokens = frame_tokens(height, width)
    if tokens % ranks:
        raise RowError(
            f"{label}: height/width: {height}x{width} makes {tokens} transformer tokens a frame "
            f"((height/16) x (width/16)), which --gpus-per-video {ranks} does not divide; choose a size where it "
            "does (544x960 and 720x1280 do for 2, 4 and 8)"
        )


def split_width(height: int, width: int, ranks: int) -> int:
    """A width fitted to an image, narrowed if need be to one that `check_split` allows (a multiple of 16 x ranks)."""
    if frame_tokens(height, width) % ranks == 0:
        return width
    step = SPATIAL_MULTIPLE * ranks
    return max(step, width // step * step)


def plan_for(params: RenderParams) -> VideoPlan:
    return plan_video(
        num_frames=params.num_frames,
        base_num_frames=params.base_num_frames,
        overlap_history=params.overlap_history,
        num_inference_steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale,
        ar_step=params.ar_step,
        causal_block_size=params.causal_block_size,
        first_frame=params.image is not None,
        last_frame=params.last_image is not None,
        continues_clip=params.mode == "v2v",
    )
