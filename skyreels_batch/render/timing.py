"""Where a render actor's time goes: wall time inside the transformer's forward passes."""

from __future__ import annotations

import time
from typing import Any

import torch


class ForwardTimer:
    """Adds up the wall time spent inside `module`'s forward passes. On CUDA it synchronises at both ends, so
    the kernels a pass queues are counted in that pass and not in whatever runs next."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.seconds = 0.0
        self._started = 0.0
        module.register_forward_pre_hook(self._start)
        module.register_forward_hook(self._stop)

    def _sync(self) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def _start(self, module: torch.nn.Module, args: Any) -> None:
        self._sync()
        self._started = time.perf_counter()

    def _stop(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self._sync()
        self.seconds += time.perf_counter() - self._started


class PassCounter:
    """Counts the transformer's forward passes and those that ran its last block: a pass a step cache skipped
    (FirstBlockCache past the first block, TaylorSeer predicting the output) never reaches it."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.passes = self.full = 0
        transformer.register_forward_pre_hook(self._pass)
        transformer.blocks[-1].attn1.register_forward_pre_hook(self._full)

    @property
    def skipped(self) -> int:
        return self.passes - self.full

    def _pass(self, module: torch.nn.Module, args: Any) -> None:
        self.passes += 1

    def _full(self, module: torch.nn.Module, args: Any) -> None:
        self.full += 1
