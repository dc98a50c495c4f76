"""Embedded models: the real SkyReels-V2 architectures at tiny sizes, weights from a fixed seed.

They are built in code (nothing is downloaded), saved as standard diffusers directories and loaded back through
`from_pretrained`, exactly like a Hub checkpoint. Built directories are cached per build spec.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers
from diffusers import (
    AutoencoderKLWan,
    DiffusionPipeline,
    SkyReelsV2DiffusionForcingPipeline,
    SkyReelsV2ImageToVideoPipeline,
    SkyReelsV2Pipeline,
    SkyReelsV2Transformer3DModel,
    UniPCMultistepScheduler,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    PreTrainedTokenizerFast,
    UMT5Config,
    UMT5EncoderModel,
)

from skyreels_batch.models import CARD_FILENAME, ModelCard
from skyreels_batch.models.checkpoints import cache_root

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]
# Part of a built directory's cache key: raised when the same spec builds different weights (2: bf16 builds keep
# the modules the transformer's class keeps in float32, as from_pretrained does).
BUILD = 2


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (any language, no training) that pads and ends sequences the way UMT5's does."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


PIPELINES = {
    "df": SkyReelsV2DiffusionForcingPipeline,
    "t2v": SkyReelsV2Pipeline,
    "i2v": SkyReelsV2ImageToVideoPipeline,
}


def build_pipeline(card: ModelCard) -> DiffusionPipeline:
    spec = card.embedded
    if spec is None:
        raise ValueError(f"{card.name} is not an embedded model")
    if card.family not in PIPELINES:
        raise ValueError(f"embedded family {card.family!r} is not buildable yet")
    tokenizer = build_tokenizer()
    # Built where the spec says (bench-1.3b: on the GPU, in bf16; its 5.7B-parameter text encoder takes minutes on
    # a CPU); the VAE stays fp32, as the job loads it.
    device, dtype = spec.get("device", "cpu"), getattr(torch, spec.get("dtype", "float32"))
    torch.manual_seed(spec["seed"])
    with torch.device(device) if device != "cpu" else contextlib.nullcontext():
        text_config = {"vocab_size": len(tokenizer), "tie_word_embeddings": False, **spec["text_encoder"]}
        text_encoder = UMT5EncoderModel(UMT5Config(**text_config)).to(dtype)
        transformer = cast_as_loaded(SkyReelsV2Transformer3DModel(**spec["transformer"]), dtype)
        vae = AutoencoderKLWan(**spec["vae"])
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        num_train_timesteps=1000,
        flow_shift=card.defaults.shift,
    )
    components = dict(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae)
    if card.family == "i2v":
        encoder = spec["image_encoder"]
        components["image_encoder"] = CLIPVisionModelWithProjection(CLIPVisionConfig(**encoder))
        size = encoder["image_size"]
        # Imported here: without torchvision, transformers warns as the name is first looked up (and falls back to
        # the PIL processor), and only image-to-video models have one.
        from transformers import CLIPImageProcessor

        components["image_processor"] = CLIPImageProcessor(size={"shortest_edge": size}, crop_size=size)
    return PIPELINES[card.family](scheduler=scheduler, **components)


def cast_as_loaded(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model` in `dtype` as diffusers' `from_pretrained(torch_dtype=dtype)` loads it: the modules the class keeps in
    float32 (`_keep_in_fp32_modules`: SkyReels-V2's norms, rope, time embedder) stay float32. `.to(dtype)` would
    cast them too, and diffusers warns that it does."""
    if dtype == torch.float32:
        return model
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not keep.intersection(name.split(".")):
            tensor.data = tensor.data.to(dtype)
    return model


def export_embedded(card: ModelCard, directory: Path) -> Path:
    """Write `card`'s embedded model to `directory` as a diffusers directory that `from_pretrained` loads."""
    with _no_progress_bars():
        build_pipeline(card).save_pretrained(directory)
    (Path(directory) / CARD_FILENAME).write_text(json.dumps({"card": card.name}))
    return Path(directory)


def materialize(card: ModelCard) -> Path:
    """The cached diffusers directory of an embedded model, built once per build spec.

    Several actors on one node may race here: each builds into its own temporary directory and the first
    rename wins, so a reader never sees a half-written model.
    """
    build = {**card.embedded, "build": BUILD}
    digest = hashlib.sha256(json.dumps(build, sort_keys=True).encode()).hexdigest()[:12]
    target = cache_root() / "models" / f"{card.name}-{digest}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{card.name}-", dir=target.parent))
    try:
        export_embedded(card, staging)
        os.rename(staging, target)
    except OSError:
        if not (target / "model_index.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers draws a progress bar of the shards it writes, even for one small file: not a line for the job's
    output, where an embedded model is built on its first load."""
    shown = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            transformers.utils.logging.enable_progress_bar()
