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


def fitted_size(image: Image.Image, area: int, multiple: int) -> tuple[int, int]:
    """(height, width) keeping the image's aspect ratio, filling `area` pixels, both rounded down to `multiple` (the
    SkyReels-V2 docs' aspect_ratio_resize). The pipeline's own preprocessing resizes the image to it."""
    ratio = image.height / image.width
    height = max(multiple, round(math.sqrt(area * ratio)) // multiple * multiple)
    width = max(multiple, round(math.sqrt(area / ratio)) // multiple * multiple)
    return height, width


def crop_to_aspect(image: Image.Image, height: int, width: int) -> Image.Image:
    """The largest centred region of `image` with the aspect ratio of height x width, uncropped sides kept whole
    and the cropped side's length truncated to whole pixels, as SkyReels-V2's own inference code fits a frame to the
    video's size; the pipeline's preprocessing then resizes it."""
    if image.height * width > height * image.width:  # taller than the video: keep the whole width
        crop_width, crop_height = image.width, int(image.width * height / width)
    else:
        crop_width, crop_height = int(image.height * width / height), image.height
    left, top = (image.width - crop_width) / 2, (image.height - crop_height) / 2
    return image.crop((left, top, left + crop_width, top + crop_height))
