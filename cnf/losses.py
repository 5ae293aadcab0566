"""Training objectives. Each takes a flow and a batch and returns a scalar loss to minimise.

- ``likelihood``: negative log-likelihood in nats per sample (maximum likelihood).
"""

from __future__ import annotations

import torch
from torch import nn


def nll_loss(flow: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood -E[log p1(x)] of the batch, in nats."""
    return -flow.log_prob(batch).mean()


OBJECTIVES = {"likelihood": nll_loss}
