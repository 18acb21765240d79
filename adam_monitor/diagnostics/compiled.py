"""One-pass fast path of :func:`adam_monitor.diagnostics.adam_statistics`.

``adam_statistics`` makes about twenty elementwise ``torch._foreach_*`` passes over the state;
``fast_adam_statistics`` returns the same rows reading ``g``, ``m``, ``v`` (and ``max_exp_avg_sq``
under amsgrad) once per tensor: ``torch.compile`` turns the per-tensor function below into one
fused loop that produces all six sums (inductor: vectorized C++ on CPU, one kernel on GPU).

Per coordinate, with ``a = 1/√c2``, ``w = v - (1-β2)·g²`` (the rebuilt ``β2·v_{t-1}``) and
``s = β2·c2_{t-1}`` (so ``v̂_{t-1} = w/s``)::

    d = a·√v_den + ε                       (the denominator √v̂ + ε of the step)
    update_sq    = Σ (m/d)²          / c1²
    staleness_sq = Σ g²/max(v, c2·ε²) · c2      = Σ g²/max(v̂_t, ε²)
    jump_sq      = Σ' g²/max(w, s·ε²) · s       = Σ' g²/max(v̂_{t-1}, ε²)   over w > tol·v
    jump_count   = #(w > tol·v)                  (0 at t = 1 or β2 = 0: no previous moment)
    eps_count    = #(d ≤ 2ε and g ≠ 0)           ⟺ √v̂ ≤ ε, on a coordinate that got a gradient
    grad_count   = #(g ≠ 0)

Sums are blocked: each run of ``BLOCK`` coordinates is summed in the compute dtype (float32 for
float32 and narrower, float64 for float64), the block sums in float64. A float32 block of 1024
terms carries a relative rounding error of at most ~1024/8·2⁻²⁴ ≈ 8e-6 (8 vector lanes), far less
on real data, and counts stay exact (≤ 1024 per block); one float32 accumulator over a whole 16M
tensor would not be. Temporaries: a ``(numel/BLOCK, 6)`` buffer per tensor, nothing the size of a
parameter.

On the CPU the kernel is built ahead of time in a child process and loaded from disk
(:mod:`.ahead`; the eager path serves until it is ready, and a failed build falls back to
compiling here). Elsewhere compilation is lazy (first call), cached per process (and on disk by
inductor). Either way there is one graph per configuration (the heads' dtypes) with dynamic shapes and ``HEADS_PER_CALL`` tensors a call, so every
tensor size and count and every step reuses it: the step-dependent scalars travel in one float64
tensor. Set ``ADAM_MONITOR_EAGER=1`` (or pass
``compiled=False``) to use the foreach path; a failed compilation warns once and falls back to it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .._runtime import (
    BLOCK,
    EAGER_CHUNK_NUMEL,
    EAGER_ENV,
    HEADS_PER_CALL,
    MIN_COMPILED_NUMEL,
    bounded_runs,
    compile_per_configuration,
    eager_forced,
    host_values,
    independent_sizes,
)
from . import ahead
from .ahead import AHEAD_ENV, KernelUnavailable
from .foreach import FlatRun, adam_statistics, flat_eligible
from .rows import (
    COUNT,
    EPS_COUNT,
    GRAD_COUNT,
    JUMP_COUNT,
    JUMP_SQ,
    NUM_STATS,
    STALENESS_SQ,
    UPDATE_SQ,
    reconstruction_tolerance,
)

__all__ = ["BLOCK", "EAGER_ENV", "MIN_COMPILED_NUMEL", "StateLayout", "fast_adam_statistics", "compiled_available"]


# Positions in the scalar vector handed to the compiled function (float64, shape (7,)).
_INV_SQRT_C2, _EPS, _TWO_EPS, _STALE_FLOOR, _ONE_MINUS_BETA2, _TOL, _JUMP_FLOOR = range(7)
# Columns of the six compiled sums, in the order of the statistics row.
_SUMMED = (UPDATE_SQ, STALENESS_SQ, JUMP_SQ, JUMP_COUNT, EPS_COUNT, GRAD_COUNT)


def _block_sums(g: Tensor, m: Tensor, v: Tensor, v_den: Tensor | None, s: Tensor) -> Tensor:
    """The six sums over the last dimension, in the compute dtype: shape ``(..., 6)``."""
    cdt = torch.float64 if g.dtype == torch.float64 else torch.float32
    g, m, v = g.to(cdt), m.to(cdt), v.to(cdt)
    v_den = v if v_den is None else v_den.to(cdt)
    denom = v_den.sqrt() * s[_INV_SQRT_C2] + s[_EPS]
    u = m / denom
    g2 = g * g
    w = v - s[_ONE_MINUS_BETA2] * g2
    # tol = inf at the first step makes this false everywhere (inf·0 is NaN, also false).
    valid = w > s[_TOL] * v
    has_grad = g != 0
    return torch.stack(
        [
            (u * u).sum(-1),
            (g2 / v.clamp_min(s[_STALE_FLOOR])).sum(-1),
            torch.where(valid, g2 / w.clamp_min(s[_JUMP_FLOOR]), 0.0).sum(-1),
            valid.sum(-1, dtype=cdt),
            ((denom <= s[_TWO_EPS]) & has_grad).sum(-1, dtype=cdt),
            has_grad.sum(-1, dtype=cdt),
        ],
        -1,
    )


def block_sums(g: Tensor, m: Tensor, v: Tensor, v_den: Tensor | None, s: Tensor) -> Tensor:
    """The six raw sums of flat tensors whose length is a multiple of ``BLOCK``: float64 ``(6,)``.

    Each block of ``BLOCK`` coordinates is summed in the compute dtype, the blocks in float64.
    """
    k = g.shape[0] // BLOCK

    def blocks(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.view(k, BLOCK)

    return _block_sums(blocks(g), blocks(m), blocks(v), blocks(v_den), s).sum(0, dtype=torch.float64)


def block_sums_heads(*args: Tensor) -> Tensor:
    """:func:`block_sums` of ``HEADS_PER_CALL`` tensors in one call: ``args`` are each head's
    ``(g, m, v)`` (``(g, m, v, v_den)`` under amsgrad), then the scalars; float64 ``(heads, 6)``."""
    s, state = args[-1], args[:-1]
    per = len(state) // HEADS_PER_CALL
    heads = [state[i : i + per] for i in range(0, len(state), per)]
    return torch.stack([block_sums(g, m, v, rest[0] if rest else None, s) for g, m, v, *rest in heads])


_disabled_reason: str | None = None


def compiled_available() -> bool:
    """False once compilation failed in this process or when ``ADAM_MONITOR_EAGER`` is set."""
    return _disabled_reason is None and not eager_forced()


def _compiled(amsgrad: bool, dtype: torch.dtype) -> Callable:
    name = f"block_sums_{str(dtype).removeprefix('torch.')}{'_amsgrad' if amsgrad else ''}"
    return compile_per_configuration(block_sums_heads, name, dynamic=True, fullgraph=True)


_DUMMY_HEADS: dict[tuple, list[list[Tensor]]] = {}


def _dummy_heads(count: int, dtypes: tuple[torch.dtype, ...], device: torch.device) -> list[list[Tensor]]:
    """``count`` heads of zero tensors of ``dtypes`` and ``2·BLOCK`` elements that pad a step's
    last call (distinct tensors: dynamo guards that inputs do not alias; 2 blocks, not 1, since a
    size of 1 would specialize the graph). Their sums are computed and dropped."""
    dummies = _DUMMY_HEADS.setdefault((dtypes, device), [])
    while len(dummies) < count:
        dummies.append([torch.zeros(2 * BLOCK, dtype=dtype, device=device) for dtype in dtypes])
    return dummies[:count]


def _flat(t: Tensor, length: int) -> Tensor:
    # A 1-D alias of the first `length` elements of the storage, not a view: a view carries its
    # base's shape into dynamo's guards, which would cost one graph per parameter rank.
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), (length,), (1,))


def _scalars(beta2: float, eps: float, step: int, compute_dtype: torch.dtype, device) -> Tensor:
    c2 = 1 - beta2**step
    eps_sq = max(float(eps) ** 2, torch.finfo(compute_dtype).tiny)
    scale = beta2 * (1 - beta2 ** (step - 1))
    # No previous moment at t = 1, and none to rebuild at β2 = 0 (v_t = g_t² forgets v_{t-1}).
    tol = reconstruction_tolerance(compute_dtype) if step > 1 and beta2 > 0 else math.inf
    values = [1 / math.sqrt(c2), eps, 2 * eps, c2 * eps_sq, 1 - beta2, tol, scale * eps_sq]
    return host_values(values, torch.float64, device)


def fast_adam_statistics(
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    step: int,
    max_exp_avg_sqs: Sequence[Tensor] | None = None,
    compiled: bool | None = None,
    layout: StateLayout | None = None,
) -> Tensor:
    """:func:`~adam_monitor.diagnostics.adam_statistics` in one read of the state per tensor.

    Same arguments and rows ``(len(grads), NUM_STATS)`` (float64). ``compiled``: ``None`` uses the
    compiled path unless ``ADAM_MONITOR_EAGER`` is set or compilation failed before; ``False``
    the eager foreach path; ``True`` the compiled path, raising if it cannot compile.

    Tensors of at least ``MIN_COMPILED_NUMEL`` elements go through the compiled loop, all but
    their last ``numel % BLOCK`` coordinates; those tails and the small tensors go through one
    batched eager call.

    ``layout``: a :class:`StateLayout` of these very ``exp_avgs``, ``exp_avg_sqs`` and
    ``max_exp_avg_sqs``, kept by a caller that reads the same tensors at every step: what follows
    from them alone (sizes, runs, flat views) is then not derived again. The rows are the same.
    """
    global _disabled_reason
    kw = dict(beta1=beta1, beta2=beta2, eps=eps, step=step)
    amsgrad = max_exp_avg_sqs is not None
    state = [grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    # On CUDA too: there the eager path's twenty-odd passes cost device time, while the compiled
    # path's larger host cost overlaps the device's work in training (bench_monitor.py --load-ms,
    # figures in the README). Only a step with nothing else on the device, bound by the host, is
    # slower compiled.
    if layout is not None and (len(layout.state) > 2) != amsgrad:
        raise ValueError("fast_adam_statistics: the layout was built for another amsgrad setting")
    if layout is not None and compiled is not False and not layout.large(MIN_COMPILED_NUMEL):
        return layout.eager_rows(grads, kw)  # nothing to compile, whatever compiled_available says
    use_compiled = compiled if compiled is not None else compiled_available()
    if layout is not None:
        large = layout.large(MIN_COMPILED_NUMEL) if use_compiled else []
    else:
        large = [i for i, g in enumerate(grads) if g.numel() >= MIN_COMPILED_NUMEL] if use_compiled else []
    if not large:
        return layout.eager_rows(grads, kw) if layout is not None else _eager_in_chunks(state, amsgrad, kw)
    # Aliases need contiguous tensors; a copy is one tensor at a time (rare: state is contiguous).
    state = [[t if t.is_contiguous() else t.contiguous() for t in ts] for ts in state]
    device = grads[0].device
    compute_dtype = torch.float64 if grads[0].dtype == torch.float64 else torch.float32
    dtypes = tuple(ts[large[0]].dtype for ts in state)
    try:
        fn = _kernel(state, large, dtypes, amsgrad, wait=compiled is True)
    except KernelUnavailable as error:
        if compiled:
            raise
        _warn_once(
            f"adam-monitor: {error}; compiling the statistics in this process instead ({AHEAD_ENV}=0 skips the attempt)"
        )
        fn = _compiled(amsgrad, grads[0].dtype)
    if fn is None:  # being built in the background: the eager rows meanwhile
        return layout.eager_rows(grads, kw) if layout is not None else _eager_in_chunks(state, amsgrad, kw)
    s = _scalars(beta2, eps, step, compute_dtype, device)
    heads = [grads[i].numel() // BLOCK * BLOCK for i in large]
    aliases = [[_flat(ts[i], h) for ts in state] for i, h in zip(large, heads)]
    aliases += _dummy_heads(-len(aliases) % HEADS_PER_CALL, dtypes, device)
    calls = [
        [t for head in aliases[k : k + HEADS_PER_CALL] for t in head] for k in range(0, len(aliases), HEADS_PER_CALL)
    ]
    try:
        with torch.no_grad(), independent_sizes():  # grad mode is part of dynamo's guards: keep it fixed
            sums = torch.cat([fn(*call, s) for call in calls])[: len(large)]
    except Exception as error:  # no compiler, unsupported device or dtype, ...
        if compiled:
            raise
        _disabled_reason = f"{type(error).__name__}: {error}"
        warnings.warn(
            f"adam-monitor: torch.compile of the statistics failed ({_disabled_reason}); using the eager "
            f"foreach path from now on. Set {EAGER_ENV}=1 to skip compilation.",
            RuntimeWarning,
            stacklevel=2,
        )
        return _eager_in_chunks(state, amsgrad, kw)

    c1, c2 = 1 - beta1**step, 1 - beta2**step
    factors = host_values([1 / (c1 * c1), c2, beta2 * (1 - beta2 ** (step - 1)), 1.0, 1.0, 1.0], torch.float64, device)
    rows = torch.zeros(len(grads), NUM_STATS, dtype=torch.float64, device=device)
    index = host_values(large, torch.long, device)
    rows[index[:, None], host_values(_SUMMED, torch.long, device)] = sums * factors
    rows[index, COUNT] = host_values(heads, torch.float64, device)

    # The rest, batched: small tensors whole, and the tails of the large ones.
    small = sorted(set(range(len(grads))) - set(large))
    tails = [(i, h) for i, h in zip(large, heads) if h < grads[i].numel()]
    if small or tails:
        rest = [[ts[i] for i in small] + [ts[i].view(-1)[h:] for i, h in tails] for ts in state]
        rest_rows = adam_statistics(*rest[:3], max_exp_avg_sqs=rest[3] if amsgrad else None, **kw)
        rows.index_add_(0, host_values(small + [i for i, _ in tails], torch.long, device), rest_rows)
    return rows


def _kernel(
    state: list[Sequence[Tensor]], large: list[int], dtypes: tuple, amsgrad: bool, wait: bool
) -> Callable | None:
    """The compiled kernel for the ``large`` heads: built ahead of time where that serves their
    device and dtypes (``None`` while it is being built, unless ``wait``), else compiled here."""
    device = state[0][large[0]].device
    if ahead.available(device) and all(tuple(ts[i].dtype for ts in state) == dtypes for i in large):
        return ahead.kernel(dtypes, wait=wait)
    return _compiled(amsgrad, dtypes[0])


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _eager_in_chunks(state: list[Sequence[Tensor]], amsgrad: bool, kw: dict) -> Tensor:
    """``adam_statistics`` on consecutive runs of tensors of at most ``EAGER_CHUNK_NUMEL``
    elements, rows in order."""
    bounds = bounded_runs([g.numel() for g in state[0]], EAGER_CHUNK_NUMEL)
    rows = [
        adam_statistics(*(ts[a:b] for ts in state[:3]), max_exp_avg_sqs=state[3][a:b] if amsgrad else None, **kw)
        for a, b in bounds
    ]
    return rows[0] if len(rows) == 1 else torch.cat(rows)


class StateLayout:
    """What :func:`fast_adam_statistics` derives from fixed moment tensors alone, derived once:
    which tensors the compiled loop takes, the runs of the eager path, and for runs on the CPU
    the numpy path's offsets and 1-D views (:class:`~.foreach.FlatRun`). Valid while the tensors
    are the optimizer's (updated in place); a caller rebuilds it when they are replaced."""

    __slots__ = ("state", "sizes", "_large", "_runs")

    def __init__(self, exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs=None):
        self.state = [list(exp_avgs), list(exp_avg_sqs)] + ([list(max_exp_avg_sqs)] if max_exp_avg_sqs else [])
        self.sizes = [t.numel() for t in exp_avgs]
        self._large: tuple[int, list[int]] | None = None  # (threshold, indices at or above it)
        self._runs: tuple[int, list[list]] | None = None  # (chunk size, [start, stop, FlatRun or None])

    def large(self, threshold: int) -> list[int]:
        if self._large is None or self._large[0] != threshold:
            self._large = threshold, [i for i, n in enumerate(self.sizes) if n >= threshold]
        return self._large[1]

    def _eager_runs(self) -> list[list]:
        if self._runs is None or self._runs[0] != EAGER_CHUNK_NUMEL:
            runs = []
            for a, b in bounded_runs(self.sizes, EAGER_CHUNK_NUMEL):
                run = [ts[a:b] for ts in self.state]
                runs.append([a, b, FlatRun(*run) if flat_eligible(run[0]) else None])
            self._runs = EAGER_CHUNK_NUMEL, runs
        return self._runs[1]

    def eager_rows(self, grads: Sequence[Tensor], kw: dict) -> Tensor:
        """``_eager_in_chunks`` of these moments and ``grads``: the same runs, the same rows."""
        rows = []
        whole = len(grads)
        for run in self._eager_runs():
            a, b, flat = run
            part = grads if (a, b) == (0, whole) else grads[a:b]
            if flat is not None:
                try:
                    rows.append(flat(part, **kw))
                    continue
                except (TypeError, RuntimeError):  # a tensor numpy cannot view: foreach from now on
                    run[2] = None
            state = [ts[a:b] for ts in self.state]
            rows.append(adam_statistics(part, *state[:2], max_exp_avg_sqs=state[2] if len(state) > 2 else None, **kw))
        return rows[0] if len(rows) == 1 else torch.cat(rows)
