"""The Adam step compiled by ``torch.compile``: ``compiled_step_`` steps a whole list of tensors with
the math of ``adam_step_`` (``optim/reference.py``) in vectorized, OpenMP-parallel loops on CPU and
kernels on GPU, and is tested against it.

* a tensor of at least ``STEP_MIN_HEAD_NUMEL`` elements (a head) runs its first
  ``numel // BLOCK · BLOCK`` coordinates as a ``(k, BLOCK)`` alias, up to ``heads_per_call`` heads
  per compiled call (a call has a fixed cost of dynamo guards and wrappers, more than a small head
  takes to step); statistics and the clipping RMS are summed per row in the compute dtype, the
  rows in float64, as ``adam_monitor.diagnostics.compiled`` does;
* the small tensors and those tails are concatenated and stepped in one call, their statistics
  returned per coordinate and summed per tensor in float64;
* with clipping or statistics, pass 1 reads what the step needs of the state before writing it:
  the tensor-wide RMS of ``g²/max(v̂_t, ε²)`` that sets the clipping scale, the gradient jump
  against ``v̂_{t-1}``; pass 2 steps, and sums the statistics of the values it writes (u², the
  staleness, ε-dominance and the count of coordinates with a gradient) in the same loops.

The step's scalars travel in one tensor of coefficients (``_COEFFICIENTS``): one graph serves every
step and tensor of a dtype. ``FusedLayout`` holds what outlives a step (the aliases of params and
moments, index tensors), kept by ``Adam`` while the storages stay. float32 and narrower compute
atan2 with ``atan2_nonnegative_x`` (a polynomial, ≤ 1.5 ulp), float64 with ``torch.atan2``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from adam_monitor._runtime import (
    BLOCK,
    COMPILE_MIN_ELEMENTS,
    STEP_HEADS_PER_CALL,
    STEP_MIN_HEAD_NUMEL,
    compile_per_configuration,
    host_values,
    independent_sizes,
)
from adam_monitor.diagnostics.rows import COUNT, EPS_COUNT, GRAD_COUNT, JUMP_COUNT, JUMP_SQ, STALENESS_SQ, UPDATE_SQ
from adam_monitor.optim.reference import ATAN2_A, ATAN2_B, _direction

__all__ = [
    "FusedLayout",
    "atan2_nonnegative_x",
    "compiled_step_",
    "heads_per_call",
    "layout_key",
    "warn_eager_fallback",
]

#: The coefficients of the compiled functions, in one tensor of the compute dtype: every scalar
#: expression is evaluated here, in float64, and rounded once. The compiled loop reads each with a
#: broadcast load; an expression of them inside the loop (1 - β2 from β2, a float64 → float32
#: conversion) is evaluated again for every vector: the compiler cannot hoist it out of the loop,
#: since the vector stores of the loop may alias the scalars' memory. A float global (``ATAN2_A``)
#: costs the same, since dynamo turns it into a tensor input too (``tests/benchmarks/bench_optim.py``).
_COEFFICIENTS = (
    "lr",
    "beta1",
    "one_minus_beta1",
    "beta2",
    "one_minus_beta2",
    "decay",
    "lr_wd",
    "eps",
    "eps_sq",
    "inv_c1",
    "inv_sqrt_c2",
    "inv_c2",
    "inv_c2_prev",
    "atan2_a",
    "atan2_b",
)


def _coefficients(scalars: dict[str, float], dtype: torch.dtype, device: torch.device) -> Tensor:
    lr, beta1, beta2, inv_sqrt_c2 = scalars["lr"], scalars["beta1"], scalars["beta2"], scalars["inv_sqrt_c2"]
    lr_wd = lr * scalars["weight_decay"]
    values = (
        lr,
        beta1,
        1 - beta1,
        beta2,
        1 - beta2,
        1 - lr_wd,
        lr_wd,
        scalars["eps"],
        scalars["eps_sq"],
        scalars["inv_c1"],
        inv_sqrt_c2,
        inv_sqrt_c2 * inv_sqrt_c2,
        scalars["inv_c2_prev"],
        ATAN2_A,
        ATAN2_B,
    )
    return host_values(values, _acc(dtype), device)


def heads_per_call(normalize: str) -> int:
    """At most this many heads per call: ``STEP_HEADS_PER_CALL``, but 1 for atan2, whose loop is
    the slowest to generate and compile per head (and its step is compute-bound: the fixed cost of
    a call is a small part of it)."""
    return 1 if normalize == "atan2" else STEP_HEADS_PER_CALL


# atan2_nonnegative_x: atan(z) ≈ z + z·w·Q(w), w = z², for z in [0, 1]; Q of degree 8 minimizes the
# maximum relative error of atan over [0, 1] (2.6e-9 in float64, 0.04 float32 ulp). Derived for
# this module with numpy in float64: Lawson's iteratively reweighted least squares (it converges to
# the minimax fit), 500 iterations on 20000 points z = sin(θ), θ uniform in (0, π/2], design rows
# w^(k+1)/f and target (f - 1)/f with f = atan(z)/z (so that the residual is the relative error of
# atan), coefficients rounded to 9 significant digits. The leading 1 stays exact so that the last
# operation is z + (a small term): the float32 evaluation stays within ~1.5 ulp.


def atan2_nonnegative_x(y: Tensor, x: Tensor) -> Tensor:
    """``torch.atan2(y, x)`` for ``x ≥ 0`` (the atan2 direction's ``b·√v̂``), float32 and narrower.

    A division and a polynomial, cheaper than the vectorized ``atan2`` of the compiled loop;
    within 1.5 float32 ulp of the exact angle for finite inputs (``tests/test_optim.py`` measures
    it), and exact (as float32 rounds it) where the angle is a multiple of π/4:
    ``atan2(±0, x) = ±0``, ``atan2(y, 0) = ±π/2``, ``atan2(±x, x) = ±π/4`` (inf included);
    NaN in, NaN out.
    """
    ay = y.abs()
    num, den = torch.minimum(ay, x), torch.maximum(ay, x)
    z = num / den
    w = z * z
    # Literals, not a global tuple: dynamo would pass global floats as tensor inputs (see
    # _COEFFICIENTS). Estrin's scheme: half the dependency chain of Horner's, for a loop that is
    # compute-bound here.
    w2 = w * w
    w4 = w2 * w2
    q = (-0.333332991 + 0.199985483 * w) + (-0.142642417 + 0.109521859 * w) * w2
    q = q + ((-0.0840345066 + 0.0579575988 * w) + (-0.0311778507 + 0.0109146081 * w) * w2 - 0.0017936222 * w4) * w4
    angle = z + z * w * q  # atan(min/max) in [0, π/4]
    # |y| = x: π/4 exactly (float32), also for inf/inf (0/0: y = 0, returned below)
    angle = torch.where(num == den, 0.7853981852531433, angle)
    # π/2 - angle with π/2 = 1.5707963705062866 (float32) - 4.371139006309477e-08 (the bits it drops)
    angle = torch.where(ay > x, (1.5707963705062866 - angle) - 4.371139006309477e-08, angle)
    # the sign of y; y itself for y = ±0, which keeps the sign of zero
    return torch.where(y < 0, -angle, torch.where(y == 0, y, angle))


def _atan2_for(dtype: torch.dtype) -> Callable[[Tensor, Tensor], Tensor]:
    # The polynomial is accurate to float32; float64 keeps the library's atan2.
    return torch.atan2 if dtype == torch.float64 else atan2_nonnegative_x


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the per-row sums: float32 for float32 and narrower, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _moments(
    grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, k: dict[str, Tensor], normalize: str, ones: Tensor | None = None
):
    """``g²``, ``v_t``, ``√v̂_t``, ``m_t`` and u of the step, out of place: what both compiled passes
    compute from the state the step starts from."""
    g2 = grad * grad
    v = exp_avg_sq * k["beta2"] + g2 * k["one_minus_beta2"]
    sqrt_v_hat = v.sqrt() * k["inv_sqrt_c2"]
    atan2 = _atan2_for(grad.dtype)
    if ones is not None and normalize == "atan2":  # the angle is stored: it must read ones too
        atan2 = lambda y, x: atan2_nonnegative_x(y * ones, x * ones)  # noqa: E731
    m, update = _direction(
        grad,
        exp_avg,
        sqrt_v_hat,
        k["beta1"],
        k["one_minus_beta1"],
        k["eps"],
        k["inv_c1"],
        normalize,
        atan2,
        k["atan2_a"],
        k["atan2_b"],
    )
    return g2, v, sqrt_v_hat, m, update


def _row_sums(terms: list[Tensor], rows: bool) -> Tensor:
    """``rows``: ``(k, BLOCK)`` terms summed per row in the compute dtype, the rows in float64
    (one float64 sum per term); else the 1-D terms stacked ``(len(terms), N)``."""
    if rows:
        return torch.stack([t.sum(-1, dtype=_acc(t.dtype)) for t in terms]).sum(-1, dtype=torch.float64)
    return torch.stack(terms)


def _pre_sums(clip: bool, statistics: bool) -> list[int]:
    """The sums pass 1 returns, in order: what must be read before the step writes the state."""
    return ([STALENESS_SQ] if clip else []) + ([JUMP_SQ, JUMP_COUNT] if statistics else [])


def _step_sums(clip: bool, statistics: bool) -> list[int]:
    """The sums pass 2 returns with ``statistics``, in order: those of the values it writes."""
    return [UPDATE_SQ] + ([] if clip else [STALENESS_SQ]) + [EPS_COUNT, GRAD_COUNT] if statistics else []


def _pre_kernel(grad: Tensor, exp_avg_sq: Tensor, c: Tensor, *, clip: bool, statistics: bool, rows: bool) -> Tensor:
    """Pass 1, from the state the step starts from (read, not written): with ``clip``,
    ``g²/max(v̂_t, ε²)`` (``v_t`` rebuilt as the step will), for the tensor-wide RMS that scales the
    step; with ``statistics``, the gradient jump against the v̂_{t-1} the step finds, over the
    coordinates that have a second moment, and their count. See ``_pre_sums``."""
    k = dict(zip(_COEFFICIENTS, c.unbind()))
    eps_sq = k["eps_sq"]
    g2 = grad * grad
    terms = []
    if clip:
        v = exp_avg_sq * k["beta2"] + g2 * k["one_minus_beta2"]
        terms.append(g2 / (v * k["inv_c2"]).clamp_min(eps_sq))
    if statistics:
        had_moment = exp_avg_sq > 0
        v_hat_prev = (exp_avg_sq * k["inv_c2_prev"]).clamp_min(eps_sq)
        terms += [torch.where(had_moment, g2 / v_hat_prev, 0.0), had_moment.to(grad.dtype)]
    return _row_sums(terms, rows)


def _step_kernel(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    c: Tensor,
    scale: Tensor | None,
    ones: Tensor | None,
    *,
    normalize: str,
    statistics: bool,
    rows: bool,
) -> Tensor | None:
    """Pass 2: ``adam_step_`` with the clipping scale given (or none); with ``statistics``, the sums
    of ``_step_sums`` from the values it writes (u² after clipping). ``ones``: see
    ``_heads_step_kernel``."""
    k = dict(zip(_COEFFICIENTS, c.unbind()))
    if ones is not None:
        grad, m_prev, v_prev = grad * ones, exp_avg * ones, exp_avg_sq * ones
    else:
        m_prev, v_prev = exp_avg, exp_avg_sq
    g2, v, sqrt_v_hat, m, update = _moments(grad, m_prev, v_prev, k, normalize, ones)
    exp_avg_sq.copy_(v)
    exp_avg.copy_(m)
    if scale is None:
        decay = k["decay"]
    else:
        update = update * scale
        decay = 1 - k["lr_wd"] * scale
    if ones is None:
        param.mul_(decay).sub_(update * k["lr"])
    else:
        param.copy_((param * decay - update * k["lr"]) * ones)
    if not statistics:
        return None
    terms = [update.square()]
    if scale is None:
        terms.append(g2 / (v * k["inv_c2"]).clamp_min(k["eps_sq"]))
    has_grad = grad != 0  # ε-dominance counts only the coordinates that got a gradient
    terms += [((sqrt_v_hat <= k["eps"]) & has_grad).to(grad.dtype), has_grad.to(grad.dtype)]
    return _row_sums(terms, rows)


def _heads_pre_kernel(
    grads: list[Tensor], exp_avg_sqs: list[Tensor], c: Tensor, *, clip: bool, statistics: bool
) -> Tensor:
    """``_pre_kernel`` over a call's heads: float64 sums ``(len(grads), len(_pre_sums(...)))``."""
    return torch.stack(
        [_pre_kernel(g, v, c, clip=clip, statistics=statistics, rows=True) for g, v in zip(grads, exp_avg_sqs)]
    )


def _heads_step_kernel(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    c: Tensor,
    scales: Tensor | None,
    ones: Tensor | None,
    *,
    normalize: str,
    statistics: bool,
) -> Tensor | None:
    """``_step_kernel`` over a call's heads (``scales``: one per head); with statistics, float64
    sums ``(len(params), len(_step_sums(...)))``.

    ``ones`` (with statistics) is a ``(BLOCK,)`` row of ones that multiplies (exactly) the step's
    inputs, its new param and the atan2 arguments. Without it inductor runs the step as one loop
    over all the coordinates (flat: the tensors are contiguous) and the per-row sums in loops of
    their own, storing what they share with the step (u, √v̂, m_t) in temporaries the size of the
    tensor, allocated at each call: several times the time of the step. A value that reads
    ``ones[column]`` cannot be flattened: the step runs per row like the sums, in one loop nest,
    and what they share stays in buffers of a row.
    """
    rows = [
        _step_kernel(
            p,
            g,
            m,
            v,
            c,
            None if scales is None else scales[j],
            ones,
            normalize=normalize,
            statistics=statistics,
            rows=True,
        )
        for j, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs))
    ]
    return torch.stack(rows) if statistics else None


def _compiled(fn: Callable, *key, pointwise: bool = False) -> Callable:
    """``fn`` compiled for the configuration ``key`` (see ``compile_per_configuration``).
    ``pointwise``: ``fn`` has no per-row sums (see below)."""
    name = "_".join(str(k) for k in (fn.__name__, *key))
    # size_asserts: the compiled wrapper would re-check the size and stride of every input (dozens
    # per call) that dynamo's guards have just checked.
    options: dict[str, Any] = {"size_asserts": False}
    if pointwise:
        # Inductor inlines a value into each of its uses unless it takes more than this many
        # operations: the atan2 polynomial, whose values have up to 7 uses each, was traced
        # thousands of times per head. A stored value of a pointwise loop stays in registers (the
        # default threshold, 30, matters for reductions: a stored value there becomes a temporary
        # the size of the tensor, several times slower).
        options["realize_opcount_threshold"] = 8
    return compile_per_configuration(fn, name, dynamic=True, fullgraph=True, options=options)


def _head_alias(t: Tensor, h: int, static: bool = True) -> Tensor:
    """The first ``h`` coordinates of contiguous ``t`` as a ``(h/BLOCK, BLOCK)`` alias on its storage,
    not a view: a view would carry its base's shape into the graph's guards, one compile per
    parameter rank; an alias gives one graph for every shape. ``static``: BLOCK stays a constant in the graph (static loop bounds); the
    gradients, aliased anew at each step, skip the marking: every graph also takes a marked
    moment of the same shape, which makes their BLOCK static too."""
    alias = t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), (h // BLOCK, BLOCK), (BLOCK, 1))
    if static:
        torch._dynamo.mark_static(alias, 1)
    return alias


_DUMMY_HEADS: dict[tuple, list[tuple[Tensor, Tensor, Tensor, Tensor]]] = {}


def _dummy_heads(dtype: torch.dtype, device: torch.device, count: int) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """``count`` distinct (param, grad, exp_avg, exp_avg_sq) sets of ``(2, BLOCK)`` zeros that pad
    the last call of a step (distinct: dynamo guards that its inputs do not alias). Written by
    every step and never read back. Two rows, not one: a size of 1 would specialize the graph."""
    dummies = _DUMMY_HEADS.setdefault((dtype, device), [])
    while len(dummies) < count:
        # marked static like the aliases they stand in for (the gradient's is not): dynamo guards
        # on the marking, a mismatch would compile a second graph
        dummies.append(
            tuple(
                _head_alias(torch.zeros(2 * BLOCK, dtype=dtype, device=device), 2 * BLOCK, static=k != 1)
                for k in range(4)
            )
        )
    return dummies[:count]


_ONES: dict[tuple, Tensor] = {}


def _ones_row(dtype: torch.dtype, device: torch.device) -> Tensor:
    """A ``(BLOCK,)`` row of ones (see ``_heads_step_kernel``), one per dtype and device."""
    ones = _ONES.get((dtype, device))
    if ones is None:
        ones = _ONES[(dtype, device)] = torch.ones(BLOCK, dtype=dtype, device=device)
    return ones


class FusedLayout:
    """How ``compiled_step_`` splits a list of tensors into heads and batch, with what of it outlives
    a step: the aliases of the params and moments, index tensors. Gradients are not part of it (a
    new tensor every step, usually). ``Adam`` keeps a layout while ``key`` stays the same, the
    identity, storage and size of every param and moment (an alias holds its storage, so a new
    storage of a param cannot reuse the address of the old one).
    """

    def __init__(
        self, params: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], max_per_call: int
    ) -> None:
        self.key = layout_key(params, exp_avgs, exp_avg_sqs)
        self.params = list(params)  # keeps the ids in ``key`` taken
        self.dtype, self.device = dtype, device = params[0].dtype, params[0].device
        n = len(params)
        numels = [p.numel() for p in params]
        self.heads = heads = [k // BLOCK * BLOCK if k >= STEP_MIN_HEAD_NUMEL else 0 for k in numels]
        self.head_index = head_index = [i for i, h in enumerate(heads) if h]
        self.head_params = [params[i] for i in head_index]
        self.max_per_call = max_per_call
        self.per_call = per_call = min(max_per_call, 1 << max(len(head_index) - 1, 0).bit_length())
        dummies = _dummy_heads(dtype, device, -len(head_index) % per_call)
        self.dummy_grads = [d[1] for d in dummies]
        param_views, exp_avg_views, exp_avg_sq_views = (
            [_head_alias(ts[i], heads[i]) for i in head_index] + [d[k] for d in dummies]
            for k, ts in ((0, params), (2, exp_avgs), (3, exp_avg_sqs))
        )
        starts = range(0, len(param_views), per_call)
        self.calls = [
            (param_views[c : c + per_call], exp_avg_views[c : c + per_call], exp_avg_sq_views[c : c + per_call])
            for c in starts
        ]
        # Slots of the per-param sums: one per param, then one (n) for everything padding.
        self.head_slots = torch.tensor(head_index + [n] * len(dummies), device=device)
        self.numel_ext = torch.tensor(numels + [1], dtype=torch.float64, device=device)
        self.numel_col = self.numel_ext[:n, None]

        self.pieces = pieces = [(i, h, k - h) for i, (h, k) in enumerate(zip(heads, numels)) if k > h]
        self.sizes = [k for _, _, k in pieces]
        self.total = sum(self.sizes)
        # The tails and small tensors as views, concatenated at each step (copies, written back).
        # (Views of detached tensors: they share the version counters, so the copies still bump p's,
        # but autograd does not track them: no error if p is ever modified in grad mode.)
        self.flats = [[ts[i].detach().view(-1)[h:] for i, h, _ in pieces] for ts in (params, exp_avgs, exp_avg_sqs)]
        self._batch_slots: Tensor | None = None

    def batch_slots(self) -> Tensor:
        """The slot of each coordinate of the batch (its padding: slot n); only clipping and
        statistics need it."""
        if self._batch_slots is None:
            device = self.device
            ids = torch.tensor([i for i, _, _ in self.pieces], device=device)
            slots = torch.repeat_interleave(ids, torch.tensor(self.sizes, device=device))
            if self.total == 1:
                slots = torch.cat([slots, slots.new_full((1,), len(self.params))])
            self._batch_slots = slots
        return self._batch_slots


def layout_key(params: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor]) -> tuple:
    """What a ``FusedLayout`` depends on (see there)."""
    return tuple(
        (id(p), p.data_ptr(), p.numel(), m.data_ptr(), v.data_ptr()) for p, m, v in zip(params, exp_avgs, exp_avg_sqs)
    )


def compiled_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    update_clip: float | None,
    normalize: str,
    statistics: bool,
    layout: FusedLayout | None = None,
    **scalars: float,
) -> list[Tensor] | None:
    """``adam_step_`` on every tensor of the lists (compiled), all sharing the step's scalars.

    The tensors must be contiguous, non-empty, of one dtype and device; ``layout`` (of these
    params and moments, else built here) may come from an earlier step. Returns the statistics
    rows (float64, as ``adam_step_``) when asked. Compilation errors surface before any tensor
    is written (every graph a step uses compiles at its first call, before the first in-place
    write: pass 1 reads, the batch is stepped in copies first).
    """
    if layout is None or layout.max_per_call != heads_per_call(normalize):
        layout = FusedLayout(params, exp_avgs, exp_avg_sqs, heads_per_call(normalize))
    # Heads of equal size in a call get a size symbol each: one graph serves calls of any sizes
    # (instead of one per pattern of equal sizes).
    with independent_sizes():
        return _compiled_step(layout, grads, update_clip, normalize, statistics, scalars)


def _compiled_step(
    layout: FusedLayout,
    grads: list[Tensor],
    update_clip: float | None,
    normalize: str,
    statistics: bool,
    scalars: dict[str, float],
) -> list[Tensor] | None:
    device, dtype, f64 = layout.device, layout.dtype, torch.float64
    c = _coefficients(scalars, dtype, device)
    n, per_call, pieces, total = len(layout.params), layout.per_call, layout.pieces, layout.total
    clip = update_clip is not None
    heads = layout.heads
    head_grads = [_head_alias(grads[i], heads[i], static=False) for i in layout.head_index] + layout.dummy_grads
    grad_calls = [head_grads[i : i + per_call] for i in range(0, len(head_grads), per_call)]

    if pieces:  # the batch: small tensors and tails, concatenated
        grad_flats = [grads[i].view(-1)[h:] if h else grads[i].view(-1) for i, h, _ in pieces]
        batch = [torch.cat(ts) for ts in (layout.flats[0], grad_flats, layout.flats[1], layout.flats[2])]
        if total == 1:  # a size-1 dimension would specialize a graph of its own
            batch = [torch.cat([b, b.new_zeros(1)]) for b in batch]

    if statistics or clip:
        sums = torch.zeros(COUNT, n + 1, dtype=f64, device=device)  # the summed columns

    def add_sums(which: list[int], head_outs: list[Tensor] | None, batch_terms: Tensor | None) -> None:
        """Add per-head sums ``(heads, len(which))`` and per-coordinate terms ``(len(which), N)``."""
        heads_sums = torch.cat(head_outs).T if head_outs else None
        for row, name in enumerate(which):
            if heads_sums is not None:
                sums[name].index_add_(0, layout.head_slots, heads_sums[row])
            if batch_terms is not None:
                sums[name].index_add_(0, layout.batch_slots(), batch_terms[row].to(f64))

    # Pass 1, for clipping or statistics: what the state the step starts from gives.
    if clip or statistics:
        config = dict(clip=clip, statistics=statistics)
        head_outs = batch_terms = None
        if grad_calls:
            fn = _compiled(_heads_pre_kernel, clip, statistics, per_call)
            head_outs = [fn(g, v, c, **config) for g, (_, _, v) in zip(grad_calls, layout.calls)]
        if pieces:
            batch_terms = _compiled(_pre_kernel, clip, statistics, False, pointwise=True)(
                batch[1], batch[3], c, rows=False, **config
            )
        add_sums(_pre_sums(clip, statistics), head_outs, batch_terms)

    call_scales = batch_scale = None
    if clip:
        # s_t from the tensor-wide Σ g²/max(v̂_t, ε²); the padding slot: 0/1 → RMS 0 → d/0 → 1
        scale = (update_clip / (sums[STALENESS_SQ] / layout.numel_ext).sqrt()).clamp_max(1.0).to(dtype)
        if grad_calls:
            call_scales = scale[layout.head_slots].view(-1, per_call).unbind()
        if pieces:
            batch_scale = scale[layout.batch_slots()]

    # Pass 2, the batch first: its compiled call writes only the concatenated copies.
    config = dict(normalize=normalize, statistics=statistics)
    head_outs = batch_terms = None
    if pieces:
        fn = _compiled(_step_kernel, normalize, clip, statistics, False, pointwise=True)  # rows=False: no sums
        batch_terms = fn(*batch, c, batch_scale, None, rows=False, **config)
    if grad_calls:
        fn = _compiled(_heads_step_kernel, normalize, clip, statistics, per_call, pointwise=not statistics)
        ones = _ones_row(dtype, device) if statistics else None
        head_outs = [
            fn(p, g, m, v, c, None if call_scales is None else call_scales[j], ones, **config)
            for j, (g, (p, m, v)) in enumerate(zip(grad_calls, layout.calls))
        ]
        for p in layout.head_params:
            torch.autograd.graph.increment_version(p)  # the alias wrote p behind autograd's back
    if pieces:
        for flats, b in zip(layout.flats, (batch[0], batch[2], batch[3])):  # param, exp_avg, exp_avg_sq
            torch._foreach_copy_(flats, list(b[:total].split(layout.sizes)))
    if not statistics:
        return None
    add_sums(_step_sums(clip, statistics), head_outs, batch_terms)
    return list(torch.cat([sums[:, :n].T, layout.numel_col], dim=1).unbind())


def warn_eager_fallback(error: BaseException) -> None:
    warnings.warn(
        f"torch.compile failed for the Adam step ({type(error).__name__}: {error}); "
        "running the eager step instead. Pass compiled=False to skip compilation.",
        RuntimeWarning,
        stacklevel=3,
    )


class CompiledSteps:
    """The compiled path of one optimizer: whether it runs, and the layouts it keeps from step to step.

    ``mode`` is the optimizer's ``compiled``: ``True`` runs it (a failure raises), ``False`` never,
    ``None`` once the optimizer holds ``COMPILE_MIN_ELEMENTS`` (a failure warns and turns it off).
    """

    def __init__(self, mode: bool | None):
        self.required = mode is True
        self.enabled: bool | None = mode
        # The layout (aliases of params and moments, index tensors) outlives the step while the
        # params and moments keep their storages: rebuilt after load_state_dict, p.data = ...
        self._layouts: dict[tuple, FusedLayout] = {}

    def decide(self, numel: int) -> bool:
        """Whether this step compiles (``numel``: elements the optimizer holds; read once)."""
        if self.enabled is None:
            self.enabled = numel >= COMPILE_MIN_ELEMENTS
        return self.enabled

    def forget_layouts(self) -> None:
        self._layouts = {}

    def step(self, cache_key: tuple, params, grads, exp_avgs, exp_avg_sqs, scalars: dict) -> list | None:
        """The compiled step of one batch (its statistics rows, or ``None`` each), or ``None`` if
        compilation failed, after which this path stays off."""
        try:
            layout = self._layouts.get(cache_key)
            per_call = heads_per_call(scalars["normalize"])
            if (
                layout is None
                or layout.max_per_call != per_call
                or layout.key != layout_key(params, exp_avgs, exp_avg_sqs)
            ):
                layout = self._layouts[cache_key] = FusedLayout(params, exp_avgs, exp_avg_sqs, per_call)
            rows = compiled_step_(params, grads, exp_avgs, exp_avg_sqs, layout=layout, **scalars)
        except Exception as error:  # no compiler, unsupported device, ...
            if self.required:
                raise
            warn_eager_fallback(error)
            self.enabled = False
            self._layouts.clear()
            return None
        return rows if rows is not None else [None] * len(params)
