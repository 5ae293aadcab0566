"""Exponential moving average of a model's weights (Polyak averaging), as used with flow matching.

The averaged weights of a network trained by stochastic gradients are typically better than the
last iterate; flow-matching codebases (e.g. Lipman et al. 2023; Tong et al. 2023) evaluate them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class ExponentialMovingAverage:
    """EMA of a module's floating parameters and buffers: ema <- d ema + (1 - d) w after each step,
    with the warm-up d_n = min(decay, (1 + n) / (10 + n)) so early weights do not dominate."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    def update(self, module: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        current = module.state_dict()
        floats = [k for k, v in self.shadow.items() if v.is_floating_point()]
        shadow = [self.shadow[k] for k in floats]
        torch._foreach_lerp_(shadow, [current[k].detach() for k in floats], 1 - d)  # d ema + (1 - d) w
        for key, value in self.shadow.items():
            if not value.is_floating_point():
                value.copy_(current[key])

    @contextmanager
    def applied(self, module: nn.Module) -> Iterator[None]:
        """Within the block ``module`` holds the averaged weights; its own come back after."""
        saved = {k: v.detach().clone() for k, v in module.state_dict().items()}
        module.load_state_dict(self.shadow)
        try:
            yield
        finally:
            module.load_state_dict(saved)
