"""Test-wide settings.

One torch thread per test process: the suite runs on 2 processes (pytest -n 2) on 2 cores, and
for these small problems torch's intra-op threads cost more than they give (measured: a
flow-matching step 3 ms on one thread against 30 ms on two, with both cores busy).
"""

import torch

torch.set_num_threads(1)
