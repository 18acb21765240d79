"""Device plumbing and the tuning constants of the fast paths.

Host values onto a device without stalling the host, host copies that do not wait for the device,
bounded runs of tensors, the compile switches; and every size constant of the compiled and
multi-tensor paths, each with the benchmark that set it. Nothing here knows Adam.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import torch
import torch.fx.experimental._config as _fx_config
from torch import Tensor

# ---------------------------------------------------------------------------------------------- tuning constants
#: Coordinates summed in the compute dtype before the float64 sum over blocks.
BLOCK = 1024
#: Tensors smaller than this go through one batched foreach call: a compiled call costs a fixed
#: few tens of µs (guards, launch), more than the foreach kernels spend on a bias or a norm.
MIN_COMPILED_NUMEL = 1 << 16
#: The eager path holds about three temporaries the size of its input: it runs on runs of tensors
#: of at most this many elements in all (a larger tensor alone), so they stay within 3 x 128 MiB
#: in float32, or three times the largest tensor.
EAGER_CHUNK_NUMEL = 1 << 25
#: Tensors summed by one compiled call. A call costs 0.1-0.2 ms of guards, wrappers and output
#: allocation whatever its size (2 CPU cores); four tensors a call take 2 ms less than one a call
#: on 8 tensors of 0.26-1M elements. The last call of a step is padded with tiny dummy tensors, so
#: one graph serves any number of tensors; each head adds seconds to the first compilation.
HEADS_PER_CALL = 4
#: Environment variable that forces the eager foreach path when set to a true value.
EAGER_ENV = "ADAM_MONITOR_EAGER"

#: ``adam_statistics`` concatenates the tensors of one call into one flat buffer when they hold at
#: most this many elements in all: a handful of single kernels then replace ~20 foreach passes,
#: each of which costs a fixed dispatch per tensor (the copies are cheap at this size).
FLAT_MAX_NUMEL = 1 << 20


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


def bounded_runs(sizes: Sequence[int], limit: int) -> list[tuple[int, int]]:
    """``(start, stop)`` index ranges covering ``sizes`` in order, each summing to at most
    ``limit`` (an item larger than that alone)."""
    runs: list[tuple[int, int]] = []
    start, total = 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > limit:
            runs.append((start, i))
            start, total = i, 0
        total += size
    runs.append((start, len(sizes)))
    return runs


@contextlib.contextmanager
def independent_sizes():
    """Compile with every input size its own symbol (no duck sizing): heads of equal size in one
    call would otherwise share one, and a call with other equalities would compile a new graph."""
    duck_shape = getattr(_fx_config, "use_duck_shape", None)
    if duck_shape is None:
        yield
        return
    _fx_config.use_duck_shape = False
    try:
        yield
    finally:
        _fx_config.use_duck_shape = duck_shape


def eager_forced() -> bool:
    """Whether ``ADAM_MONITOR_EAGER`` asks for the eager paths (compile nothing)."""
    return os.environ.get(EAGER_ENV, "").lower() in ("1", "true", "yes", "on")


def is_rank_zero() -> bool:
    """True outside ``torch.distributed`` and on its rank 0: the one process that writes."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )
