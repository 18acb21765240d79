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


class HostCopy:
    """A host copy of a small device tensor that does not wait for the device.

    On CUDA the values go to pinned memory with a queued copy and an event marks their arrival:
    :meth:`ready` asks the event without blocking, :meth:`wait` blocks until then. A CPU tensor is
    its own copy, ready at once; other devices copy synchronously (no portable event to poll).
    """

    __slots__ = ("tensor", "_event")

    def __init__(self, values: Tensor):
        self._event = None
        if values.device.type == "cuda":
            self.tensor = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.tensor.copy_(values, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(values.device))  # the stream the copy went to
        elif values.device.type == "cpu":
            self.tensor = values
        else:
            self.tensor = values.cpu()

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def wait(self) -> Tensor:
        # query() first: once a later sync has drained the stream the copy is known done, and
        # torch's sync debug mode would still count an event synchronize as a sync.
        if self._event is not None and not self._event.query():
            self._event.synchronize()
        return self.tensor
