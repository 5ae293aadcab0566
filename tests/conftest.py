"""Test-wide settings.

One torch thread per test process: the suite runs on 2 processes (pytest -n 2) on 2 cores, and
for these small problems torch's intra-op threads cost more than they give (measured: a
flow-matching step 3 ms on one thread against 30 ms on two, with both cores busy).
"""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def record_time_limits(monkeypatch: pytest.MonkeyPatch):
    """``install(module, name)`` wraps ``module.name`` to record the ``time_limit`` it is called with;
    it returns the list the calls are appended to."""

    def install(module: object, name: str) -> list:
        limits: list = []
        real = getattr(module, name)

        def spy(*args, time_limit=None, **kwargs):
            limits.append(time_limit)
            return real(*args, time_limit=time_limit, **kwargs)

        monkeypatch.setattr(module, name, spy)
        return limits

    return install
