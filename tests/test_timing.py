"""The transformer-time measurement behind the results' `transformer_s`."""

from __future__ import annotations

import time

import torch

from skyreels_batch.render.timing import ForwardTimer


class Sleeper(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.05)
        return x


def test_forward_timer_counts_time_inside_forward_passes_only() -> None:
    module = Sleeper()
    timer = ForwardTimer(module)
    time.sleep(0.1)  # outside any pass
    for _ in range(3):
        module(torch.zeros(1))
    assert 0.15 <= timer.seconds < 0.25
