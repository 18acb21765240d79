"""Device plumbing and the tuning constants of the fast paths.

Host values onto a device without stalling the host, host copies that do not wait for the device,
bounded runs of tensors, the compile switches; and every size constant of the compiled and
multi-tensor paths, each with the benchmark that set it. Nothing here knows Adam.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx.experimental._config as _fx_config
from torch import Tensor

# ---------------------------------------------------------------------------------------------- tuning constants
#: Coordinates summed in the compute dtype before the float64 sum over blocks.
BLOCK = 1024
#: Tensors smaller than this go through one batched foreach call: a compiled call has a fixed cost
#: (guards, launch) larger than the foreach kernels spend on a bias or a norm
#: (tests/benchmarks/bench_monitor.py).
MIN_COMPILED_NUMEL = 1 << 16
#: The eager foreach path (off the CPU) holds about three temporaries the size of its input: it
#: runs on runs of tensors of at most this many elements in all (a larger tensor alone), so they
#: stay within 3 x 128 MiB in float32, or three times the largest tensor.
EAGER_CHUNK_NUMEL = 1 << 25
#: Tensors summed by one compiled call. A call costs guards, wrappers and output allocation
#: whatever its size, so a few tensors a call beat one (tests/benchmarks/bench_monitor.py); the
#: last call of a step is padded with tiny dummy tensors, so one graph serves any number of
#: tensors, and each head adds seconds to the first compilation.
HEADS_PER_CALL = 4
#: Environment variable that forces the eager foreach path when set to a true value.
EAGER_ENV = "ADAM_MONITOR_EAGER"

#: ``adam_statistics`` concatenates the tensors of one call into one flat buffer when they hold at
#: most this many elements in all: a handful of single kernels then replace ~20 foreach passes,
#: each of which costs a fixed dispatch per tensor (the copies are cheap at this size).
FLAT_MAX_NUMEL = 1 << 20
#: Larger CPU calls run the numpy path on pieces of this many elements: its half-dozen working
#: buffers then stay in the cache, and its memory stays flat whatever the model's size
#: (tests/benchmarks/bench_monitor.py, first step and memory).
PIECE_NUMEL = 1 << 18

# The optimizer step (``adam_monitor.optim``), set by ``tests/benchmarks/bench_optim.py``.
#: Below this many elements in all, ``compiled=None`` steps eagerly: the first step's compilation
#: takes seconds and pays back only on large steps (first-step and step times of bench_optim.py).
COMPILE_MIN_ELEMENTS = 1 << 20
#: Devices where ``compiled=None`` steps with torch's multi-tensor kernels when no statistics are
#: recorded: there a step's device time is so short that the compiled step's fixed cost per call
#: (dynamo guards, one call per few tensors) is most of it (``bench_optim.py --device cuda``).
FOREACH_DEVICES = ("cuda",)
#: The multi-tensor step holds one to three temporaries of its tensors' size: it steps runs of at
#: most this many elements (a larger tensor alone), which bounds them to 3 x 128 MiB in float32.
FOREACH_CHUNK_NUMEL = 1 << 25
#: Devices of torch's fused AdamW kernel, which ``compiled=None`` uses for ``normalize="adam"``
#: without clipping, β2 schedule or statistics: torch's own speed, no compilation.
TORCH_FUSED_DEVICES = ("cpu", "cuda")
#: Tensors of the compiled step below this many elements are concatenated and stepped in one call;
#: from this size on a tensor is a head of its own, whose step outweighs the fixed cost of a call.
STEP_MIN_HEAD_NUMEL = 1 << 16
#: Heads stepped by one compiled call (``bench_optim.py --compiled --heads-per-call N``). Each head
#: of the graph adds to its first compilation, so a graph takes this many heads rather than the
#: whole list, the last call of a step padded with tiny dummy heads: one graph per configuration
#: for any model (with fewer heads: the next power of two). 4 rather than 8 compiles much faster
#: with statistics for about 1% more step time.
STEP_HEADS_PER_CALL = 4


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


_COMPILED: dict[tuple, Callable] = {}


def compile_per_configuration(fn: Callable, name: str, **compile_kwargs: Any) -> Callable:
    """``torch.compile(copy, **compile_kwargs)`` of a copy of ``fn`` whose code object is named
    ``name``, once per process for each ``(fn, name)``: ``name`` spells the configuration.

    Dynamo keeps its graphs and its recompile limit per code object: a code object of its own per
    configuration holds that configuration's graph alone, so configurations never evict each other
    nor add up to the limit. Compiles lazily, at the first call of the result, which says so on
    stderr: a first step that takes seconds would otherwise look like a hung run.
    """
    key = (fn, name)
    compiled = _COMPILED.get(key)
    if compiled is None:
        copy = types.FunctionType(
            fn.__code__.replace(co_name=name), fn.__globals__, name, fn.__defaults__, fn.__closure__
        )
        copy.__kwdefaults__ = fn.__kwdefaults__
        compiled = _COMPILED[key] = _AnnouncedFirstCall(torch.compile(copy, **compile_kwargs), name)
    return compiled


class _AnnouncedFirstCall:
    """A compiled function whose first call (the compilation) is announced and timed on stderr,
    on rank zero only."""

    __slots__ = ("fn", "name", "pending")

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name, self.pending = fn, name, True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.pending:
            return self.fn(*args, **kwargs)
        self.pending = False
        loud = is_rank_zero()
        if loud:
            print(
                f"adam-monitor: compiling {self.name} (once per process; inductor caches it on disk, "
                "so later runs start faster; ADAM_MONITOR_EAGER=1 skips compilation)",
                file=sys.stderr,
                flush=True,
            )
        start = time.perf_counter()
        out = self.fn(*args, **kwargs)
        if loud:
            print(
                f"adam-monitor: compiled {self.name} in {time.perf_counter() - start:.1f} s",
                file=sys.stderr,
                flush=True,
            )
        return out


def eager_forced() -> bool:
    """Whether ``ADAM_MONITOR_EAGER`` asks for the eager paths (compile nothing)."""
    return os.environ.get(EAGER_ENV, "").lower() in ("1", "true", "yes", "on")


def is_rank_zero() -> bool:
    """True outside ``torch.distributed`` and on its rank 0: the one process that writes."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )
