"""Small host values onto a device without stalling the host."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def host_values(values: Sequence[float] | Sequence[int], dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """``torch.tensor(values, dtype=dtype, device=device)``, queued on CUDA instead of synchronous.

    A copy from pageable host memory to a CUDA device first waits for all the work queued on the
    device, so a per-step scalar copied that way keeps the host from running ahead of the GPU.
    Staged in pinned memory the copy is queued like a kernel; torch's caching host allocator keeps
    the pinned block until the copy has run.
    """
    host = torch.tensor(values, dtype=dtype)
    device = torch.device(device)
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)
