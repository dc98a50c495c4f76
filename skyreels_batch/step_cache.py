"""Step caches, per row: the manifest's `cache` column -> one of diffusers' cache hooks on the transformer.

A step cache skips transformer work on denoising steps whose result it can predict from earlier ones:

- `first_block:THRESHOLD` is diffusers' FirstBlockCache: every pass runs the first block; when its residual changed
  by less than THRESHOLD (relative mean absolute difference) since the last full pass, the other blocks are skipped
  and their last residual is reused. 0 never skips. ParaAttention suggests 0.05-0.2 on video models.
- `taylorseer:INTERVAL` is diffusers' TaylorSeer in its lite form: after 3 full passes, one pass in INTERVAL runs
  the blocks and the others predict the output projection from a first-order Taylor expansion. The lite form keeps
  only the projection's output per context; the full form keeps two factors of every attention module's output per
  context (SkyReels-V2 1.3B at 540P: 60 modules of 51,000 x 1,536, tens of GB), which no video model can afford.

MagCache (`mag:`) is refused: its skipping follows magnitude ratios calibrated for one checkpoint at one step count
(MagCacheConfig.mag_ratios, from a `calibrate=True` run of that model with real weights), and none are published
for SkyReels-V2; on the embedded models' random weights they would mean nothing.

A window is one sampling run for the hooks: their state is reset before each segment (diffusion_forcing.py), so a
video resumed at segment k renders exactly what an uninterrupted one does.
"""

from __future__ import annotations

import torch
from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

CacheConfig = FirstBlockCacheConfig | TaylorSeerCacheConfig
KINDS = {
    "first_block": "first_block:THRESHOLD (FirstBlockCache, THRESHOLD >= 0, e.g. 0.1)",
    "taylorseer": "taylorseer:INTERVAL (TaylorSeer lite, INTERVAL >= 1 steps between full passes, e.g. 4)",
}
REFUSED = {
    "mag": "MagCache needs magnitude ratios calibrated for the checkpoint at the row's step count "
    "(MagCacheConfig.mag_ratios from a calibrate=True run with real weights); none exist for SkyReels-V2",
}


def parse_cache(spec: str) -> CacheConfig:
    """`first_block:0.1` / `taylorseer:4` -> diffusers' cache config; ValueError saying what is accepted."""
    kind, _, value = spec.strip().partition(":")
    if kind in REFUSED:
        raise ValueError(f"{kind}: not supported: {REFUSED[kind]}")
    if kind not in KINDS:
        raise ValueError(f"{spec!r}: wants {' or '.join(KINDS.values())}")
    try:
        number = float(value) if kind == "first_block" else int(value)
    except ValueError:
        raise ValueError(f"{spec!r}: wants {KINDS[kind]}") from None
    if kind == "first_block":
        if not number >= 0 or number == float("inf"):
            raise ValueError(f"{spec!r}: the threshold must be a number >= 0")
        return FirstBlockCacheConfig(threshold=number)
    if number < 1:
        raise ValueError(f"{spec!r}: the interval must be at least 1")
    # float32 factors: only the projection's output is kept (tens of MB), and bf16 would round its differences away.
    return TaylorSeerCacheConfig(cache_interval=number, use_lite_mode=True, taylor_factors_dtype=torch.float32)
