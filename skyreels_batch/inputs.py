"""Conditioning inputs: images fetched by the worker from a local path or fsspec URL, fitted as SkyReels does."""

from __future__ import annotations

import io
import math

import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load as load_tensors

from skyreels_batch import storage


class InputError(ValueError):
    """An input a row names cannot be fetched or read."""


def fetch_image(uri: str, field: str) -> Image.Image:
    """The image at `uri`; InputError naming `field` (the manifest column) when it cannot be had."""
    data = _fetch(uri, field)
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise InputError(f"{field}: {uri!r} is not a readable image: {error}") from None


def fetch_video(uri: str, field: str = "video") -> list[Image.Image]:
    """Every frame of the clip at `uri`, as RGB images; InputError naming `field` when it cannot be had."""
    import av  # PyAV only for clips (v2v): the render stage also runs where it is not installed

    data = _fetch(uri, field)
    try:
        with av.open(io.BytesIO(data)) as container:
            frames = [frame.to_image() for frame in container.decode(video=0)]
    except (av.FFmpegError, IndexError, ValueError) as error:
        raise InputError(f"{field}: {uri!r} is not a readable video: {error}") from None
    if not frames:
        raise InputError(f"{field}: {uri!r} has no frames")
    return frames


LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def fetch_lora(uri: str, field: str = "lora") -> dict[str, torch.Tensor]:
    """A diffusers/peft LoRA state dict from a .safetensors file or a directory holding the standard file name."""
    file_uri = uri if uri.endswith(".safetensors") else storage.join(uri, LORA_WEIGHTS_NAME)
    data = _fetch(file_uri, field)
    try:
        return load_tensors(data)
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
        raise InputError(f"{field}: {file_uri!r} is not a safetensors LoRA: {error}") from None


def _fetch(uri: str, field: str) -> bytes:
    try:
        return storage.read_bytes(storage.normalize(uri))
    except (OSError, ValueError) as error:
        raise InputError(f"{field}: cannot fetch {uri!r}: {type(error).__name__}: {error}") from None


def fit_to_area(image: Image.Image, area: int, multiple: int) -> tuple[Image.Image, int, int]:
    """Keep the aspect ratio, fill `area` pixels, round both sides down to `multiple` (the SkyReels-V2 docs'
    aspect_ratio_resize)."""
    ratio = image.height / image.width
    height = max(multiple, round(math.sqrt(area * ratio)) // multiple * multiple)
    width = max(multiple, round(math.sqrt(area / ratio)) // multiple * multiple)
    return image.resize((width, height), Image.Resampling.LANCZOS), height, width


def center_crop_resize(image: Image.Image, height: int, width: int) -> Image.Image:
    """Scale to cover height x width, then crop the centre: a last frame matched to the first frame's size."""
    scale = max(width / image.width, height / image.height)
    scaled = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
    left, top = (scaled.width - width) // 2, (scaled.height - height) // 2
    return scaled.crop((left, top, left + width, top + height))
