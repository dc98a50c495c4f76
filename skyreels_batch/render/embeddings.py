"""Prompt embeddings between the text-encoding stage and the render stage.

The text encoder (UMT5-XXL, 5.7B parameters in the real checkpoints) lives in its own actor pool; render actors
never load it. Each text a video needs is encoded once and stored at `<output>/_embeddings/<key>.safetensors`,
keyed by the model and the text, so rows sharing a prompt or the default negative prompt share one encoding and a
retried or resumed row encodes nothing again. Storage, not Ray's object store: a real embedding is 4 MB, the
negative prompt is shared by every row, and any node of the cluster must be able to read it.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from skyreels_batch import storage
from skyreels_batch.render.inputs import InputError
from skyreels_batch.schema import RenderParams, plan_for

MAX_SEQUENCE_LENGTH = 512  # the SkyReels-V2 pipelines' default: prompts are padded / truncated to 512 tokens
CACHED_PER_ACTOR = 32  # embeddings a render actor keeps in memory (the negative prompt, recent prompts)


def texts_for(params: RenderParams) -> list[str]:
    """Every text a row is rendered with: each segment's prompt, and the negative prompt when guidance is on."""
    prompts = [params.prompt_for(segment.index) for segment in plan_for(params).segments]
    negatives = [params.negative_prompt] if params.guidance_scale > 1.0 else []
    return list(dict.fromkeys(prompts + negatives))


def embeddings_dir(output: str) -> str:
    return storage.join(output, "_embeddings")


class EmbeddingStore:
    def __init__(self, output: str, model: str) -> None:
        self.output = output
        self.root = embeddings_dir(output)
        self.model = model
        self.load = lru_cache(maxsize=CACHED_PER_ACTOR)(self._load)

    def __reduce__(self) -> tuple:
        return EmbeddingStore, (self.output, self.model)  # a fresh cache where it is unpickled

    def uri(self, text: str) -> str:
        key = hashlib.sha256(f"{self.model}\0{MAX_SEQUENCE_LENGTH}\0{text}".encode()).hexdigest()
        return storage.join(self.root, f"{key}.safetensors")

    def has(self, text: str) -> bool:
        fs, path = storage.filesystem(self.uri(text))
        return fs.exists(path)

    def save(self, text: str, embeddings: torch.Tensor) -> None:
        storage.write_bytes_atomic(self.uri(text), save_tensors({"embeddings": embeddings.detach().cpu().contiguous()}))

    def _load(self, text: str) -> torch.Tensor:
        try:
            data = storage.read_bytes(self.uri(text))
        except FileNotFoundError:
            raise InputError(
                f"prompt: no text embeddings for {text[:60]!r}: the text-encoding stage did not make them"
            ) from None
        return load_tensors(data)["embeddings"]
