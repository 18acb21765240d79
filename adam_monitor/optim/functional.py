"""One step of the Adam family for one tensor: the specification, and its compiled fast path.

``adam_step_`` is the readable reference. The fast path, ``fused_step_``, steps a whole list of
tensors with the same math compiled by ``torch.compile`` (vectorized, OpenMP-parallel loops on CPU,
kernels on GPU):

* a tensor of at least ``SMALL`` elements (a head) runs its first ``numel // BLOCK · BLOCK``
  coordinates as a ``(k, BLOCK)`` alias, up to ``heads_per_call`` heads per compiled call (a call
  costs ~0.1 ms of dynamo guards and wrappers, more than a head of 64K elements takes to step);
  statistics and the clipping RMS are summed per row in the compute dtype, the rows in float64,
  as ``adam_monitor.diagnostics.compiled`` does;
* the small tensors and those tails are concatenated and stepped in one call, their statistics
  returned per coordinate and summed per tensor in float64;
* with clipping or statistics, pass 1 reads what the step needs of the state before writing it:
  the tensor-wide RMS of ``g²/max(v̂_t, ε²)`` that sets the clipping scale, the gradient jump
  against ``v̂_{t-1}``; pass 2 steps, and sums the statistics of the values it writes (u², the
  staleness, ε-dominance) in the same loops.

The step's scalars travel in one tensor of coefficients (``_COEFFICIENTS``): one graph serves every
step and tensor of a dtype. ``FusedLayout`` holds what outlives a step (the aliases of params and
moments, index tensors), kept by ``Adam`` while the storages stay. float32 and narrower compute
atan2 with ``atan2_nonnegative_x`` (a polynomial, ≤ 1.5 ulp), float64 with ``torch.atan2``.

With hyper-parameters of the step (β2_t may vary, see ``Adam``)::

    v_t = β2_t·v_{t-1} + (1-β2_t)·g²                 v̂_t = v_t / c2_t
    adam:   m_t = β1·m_{t-1} + (1-β1)·g              u = (m_t/c1) / (√v̂_t + ε)
    laprop: m_t = β1·m_{t-1} + (1-β1)·g/(√v̂_t + ε)   u = m_t/c1
    atan2:  m_t = β1·m_{t-1} + (1-β1)·g              u = a·atan2(m_t/c1, b·√v̂_t)
    clip d: u ← u / max(1, RMS_t/d),   RMS_t = √mean(g²/max(v̂_t, ε²))
    p ← p·(1 - η·λ·s) - η·u      (s = 1/max(1, RMS_t/d) with clipping, else 1)

``c1 = 1 - β1^t`` with momentum bias correction, else 1.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from adam_monitor._runtime import host_values, independent_sizes

__all__ = [
    "ATAN2_A",
    "ATAN2_B",
    "BLOCK",
    "HEADS_PER_CALL",
    "NORMALIZE",
    "SMALL",
    "FusedLayout",
    "adam_step_",
    "atan2_nonnegative_x",
    "flat_alias",
    "foreach_step_",
    "fused_step_",
    "heads_per_call",
    "torch_fused_step_",
    "layout_key",
]

#: atan2 constants of Everett et al. 2024 ("Scaling Exponents Across Parameterizations and
#: Optimizers", Adam-atan2): u = a·atan2(m̂, b·√v̂). a = 1.27 ≈ 4/π makes a steady signal
#: (m̂ = √v̂, Adam's |u| = 1) move by a·π/4 ≈ 1, as Adam does; |u| ≤ a·π/2 ≈ 2 always.
ATAN2_A = 1.27
ATAN2_B = 1.0

NORMALIZE = ("adam", "laprop", "atan2")

#: Coordinates summed in the compute dtype before the float64 sum over blocks (fast path).
BLOCK = 1024
#: Tensors below this many elements are concatenated and stepped in one compiled call.
SMALL = 1 << 16


def _direction(
    grad: Tensor,
    exp_avg: Tensor,
    sqrt_v_hat: Tensor,
    beta1,
    one_minus_beta1,
    eps,
    inv_c1,
    normalize: str,
    atan2=torch.atan2,
    atan2_a=ATAN2_A,
    atan2_b=ATAN2_B,
) -> tuple[Tensor, Tensor]:
    """The new momentum m_t and the direction u (before clipping); ``exp_avg`` is read, not written."""
    if normalize == "adam":
        m = exp_avg * beta1 + grad * one_minus_beta1
        return m, m * inv_c1 / (sqrt_v_hat + eps)
    if normalize == "laprop":
        # momentum of the normalized gradient; only m is bias-corrected at the update
        m = exp_avg * beta1 + grad / (sqrt_v_hat + eps) * one_minus_beta1
        return m, m * inv_c1
    if normalize == "atan2":
        m = exp_avg * beta1 + grad * one_minus_beta1
        return m, atan2_a * atan2(m * inv_c1, atan2_b * sqrt_v_hat)
    raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")


def adam_step_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    eps_sq: float,
    inv_c1: float,
    inv_sqrt_c2: float,
    inv_c2_prev: float,
    update_clip: float | None,
    normalize: str,
    statistics: bool,
) -> Tensor | None:
    """Update ``param``, ``exp_avg``, ``exp_avg_sq`` in place; return a statistics row if asked.

    Scalars come pre-inverted (``inv_c1 = 1/c1``, ``inv_sqrt_c2 = 1/√c2_t``) because a division by
    a scalar costs a vector division per element in the compiled loop. ``inv_c2_prev = 1/c2_{t-1}``
    (0 at the first step) is read only with ``statistics``: pass a constant otherwise, since the
    compiler specializes on the value of a float it does not use (a recompile every step).
    ``eps_sq`` is ``max(ε², tiny)``: the floor of ``max(v̂, ε²)`` that keeps 0/0 out when ε = 0.

    The row has the columns of ``adam_monitor.diagnostics.STAT_FIELDS`` with the semantics of
    ``tensor_statistics(grad, u, v̂_t, v̂_{t-1}, ε)``; sums accumulate in float64.
    """
    f64 = torch.float64
    g2 = grad * grad
    if statistics:
        # gradient_jump compares g_t with the v̂_{t-1} the step found: read v before overwriting it.
        had_moment = exp_avg_sq > 0
        v_hat_prev = (exp_avg_sq * inv_c2_prev).clamp_min(eps_sq)
        jump_sq = torch.where(had_moment, g2 / v_hat_prev, 0.0).sum(dtype=f64)
        jump_count = had_moment.sum(dtype=f64)
    exp_avg_sq.mul_(beta2).add_(g2 * (1 - beta2))
    v_hat = exp_avg_sq * (inv_sqrt_c2 * inv_sqrt_c2)
    sqrt_v_hat = exp_avg_sq.sqrt() * inv_sqrt_c2
    momentum, update = _direction(grad, exp_avg, sqrt_v_hat, beta1, 1 - beta1, eps, inv_c1, normalize)
    exp_avg.copy_(momentum)

    if update_clip is not None or statistics:
        staleness_sq = (g2 / v_hat.clamp_min(eps_sq)).sum(dtype=f64)
    decay = 1 - lr * weight_decay
    if update_clip is not None:
        # step over max(1, RMS_t/d) = step·min(1, d/RMS_t); RMS_t = 0 gives d/0 = inf → 1.
        rms = (staleness_sq / grad.numel()).sqrt()
        scale = (update_clip / rms).clamp_max(1.0).to(update.dtype)
        update = update * scale
        decay = 1 - lr * weight_decay * scale  # the clipped lr also sets the decay (Wortsman et al.)
    param.mul_(decay).sub_(update * lr)

    if not statistics:
        return None
    return torch.stack(
        [
            update.square().sum(dtype=f64),
            staleness_sq,
            jump_sq,
            jump_count,
            (sqrt_v_hat <= eps).sum(dtype=f64),
            torch.full((), grad.numel(), dtype=f64, device=grad.device),
        ]
    )


def flat_alias(t: Tensor) -> Tensor:
    """A 1-D tensor on ``t``'s storage that is not a view of ``t`` (``t`` must be contiguous).

    A view would carry its base's shape into the compiled graph's guards, costing one compile per
    parameter rank; a plain alias gives one graph for every shape.
    """
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), (t.numel(),), (1,))


# ----------------------------------------------------------------------------- fast path

NUM_SUMS = 5  # the summed statistics; the row's last column is the count
#: The coefficients of the compiled functions, in one tensor of the compute dtype: every scalar
#: expression is evaluated here, in float64, and rounded once. The compiled loop reads each with a
#: broadcast load; an expression of them inside the loop (1 - β2 from β2, a float64 → float32
#: conversion) is evaluated again for every vector: the compiler cannot hoist it out of the loop,
#: since the vector stores of the loop may alias the scalars' memory. That costs ~20% of an Adam
#: step, so does a float global (``ATAN2_A``), which dynamo turns into a tensor input too.
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


#: Heads stepped by one compiled call. A call costs ~0.1 ms of dynamo guards and wrappers, a head
#: inside it ~20 µs; each head of the graph adds 1-3 s to its first compile, so the graph does not
#: take the whole list (compile time growing with the model) but this many heads, the last call of
#: a step padded with tiny dummy heads: one graph per configuration for any model with this many
#: heads or more (fewer: the next power of two). 4 rather than 8: 15 s less first compile with
#: statistics (20M params, 2 cores), ~1% more step time.
HEADS_PER_CALL = 4


def heads_per_call(normalize: str) -> int:
    """At most this many heads per call: ``HEADS_PER_CALL``, but 1 for atan2, whose loop takes
    ~5-10 s per head to generate and compile (and its step is compute-bound: 0.1 ms per call is
    ~2% of it)."""
    return 1 if normalize == "atan2" else HEADS_PER_CALL


# atan2_nonnegative_x: atan(z) ≈ z + z·w·Q(w), w = z², for z in [0, 1]; Q of degree 8 minimizes the
# maximum relative error of atan over [0, 1] (2.6e-9 in float64, 0.04 float32 ulp). Derived for
# this module with numpy in float64: Lawson's iteratively reweighted least squares (it converges to
# the minimax fit), 500 iterations on 20000 points z = sin(θ), θ uniform in (0, π/2], design rows
# w^(k+1)/f and target (f - 1)/f with f = atan(z)/z (so that the residual is the relative error of
# atan), coefficients rounded to 9 significant digits. The leading 1 stays exact so that the last
# operation is z + (a small term): the float32 evaluation stays within ~1.5 ulp.


def atan2_nonnegative_x(y: Tensor, x: Tensor) -> Tensor:
    """``torch.atan2(y, x)`` for ``x ≥ 0`` (the atan2 direction's ``b·√v̂``), float32 and narrower.

    A division and a polynomial, ~3x cheaper than the vectorized ``atan2`` of the compiled loop;
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
    # _COEFFICIENTS). Estrin's scheme: half the dependency chain of Horner's, and the loop,
    # compute-bound here, runs ~15% faster.
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


# Rows of the per-param sums (the statistics row's columns, then the count).
UPDATE_SQ, STALENESS_SQ, JUMP_SQ, JUMP_COUNT, EPS_COUNT = range(NUM_SUMS)


def _pre_sums(clip: bool, statistics: bool) -> list[int]:
    """The sums pass 1 returns, in order: what must be read before the step writes the state."""
    return ([STALENESS_SQ] if clip else []) + ([JUMP_SQ, JUMP_COUNT] if statistics else [])


def _step_sums(clip: bool, statistics: bool) -> list[int]:
    """The sums pass 2 returns with ``statistics``, in order: those of the values it writes."""
    return [UPDATE_SQ] + ([] if clip else [STALENESS_SQ]) + [EPS_COUNT] if statistics else []


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
    terms.append((sqrt_v_hat <= k["eps"]).to(grad.dtype))
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
    tensor, allocated at each call: 2-3x the time of the step. A value that reads
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


_COMPILED: dict[tuple, Callable] = {}


def _compiled(fn: Callable, *key, pointwise: bool = False) -> Callable:
    """``fn`` compiled, one distinct code object per configuration (lazy, cached per process), so
    that configurations do not share dynamo's per-function recompile limit. ``pointwise``: ``fn``
    has no per-row sums (see below)."""
    full_key = (fn.__name__, *key)
    compiled = _COMPILED.get(full_key)
    if compiled is None:
        name = "_".join(str(k) for k in full_key)
        copy = types.FunctionType(fn.__code__.replace(co_name=name), fn.__globals__, name)
        # size_asserts: the compiled wrapper re-checks the size and stride of every input (~1 µs
        # each, 33 per call of 8 heads) that dynamo's guards have just checked.
        options: dict[str, Any] = {"size_asserts": False}
        if pointwise:
            # Inductor inlines a value into each of its uses unless it takes more than this many
            # operations: the atan2 polynomial, whose values have up to 7 uses each, was traced
            # thousands of times (5 s per head). A stored value of a pointwise loop stays in
            # registers (the default threshold, 30, matters for reductions: a stored value there
            # becomes a temporary the size of the tensor, 2-4x slower).
            options["realize_opcount_threshold"] = 8
        compiled = _COMPILED[full_key] = torch.compile(copy, dynamic=True, fullgraph=True, options=options)
    return compiled


def _head_alias(t: Tensor, h: int, static: bool = True) -> Tensor:
    """The first ``h`` coordinates of contiguous ``t`` as a ``(h/BLOCK, BLOCK)`` alias (not a view:
    see ``flat_alias``). ``static``: BLOCK stays a constant in the graph (static loop bounds); the
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
    """How ``fused_step_`` splits a list of tensors into heads and batch, with what of it outlives
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
        self.heads = heads = [k // BLOCK * BLOCK if k >= SMALL else 0 for k in numels]
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


def fused_step_(
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
        return _fused_step(layout, grads, update_clip, normalize, statistics, scalars)


def _fused_step(
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
        sums = torch.zeros(NUM_SUMS, n + 1, dtype=f64, device=device)

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


#: The dtypes torch's fused AdamW kernel steps (``torch_fused_step_``).
TORCH_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def torch_fused_available() -> bool:
    return hasattr(torch, "_fused_adamw_")


def torch_fused_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    t: int,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    inv_c1: float,
    **_: Any,
) -> None:
    """``normalize="adam"`` without clipping, β2 schedule or statistics, on torch's own fused
    AdamW kernel (the one ``torch.optim.AdamW(fused=True)`` runs): one pass over the state, on
    the CPU and on CUDA.

    That kernel divides the momentum by ``1 - β1^t``. Without momentum bias correction
    (``inv_c1 = 1``) it gets ``lr·(1 - β1^t)``, which cancels that division, and the weight decay
    ``λ/(1 - β1^t)``, which keeps the decay ``η·λ``: the same step up to rounding (a relative
    1e-16 in float64, tested against the specification). Its v̂ is ``v/(1 - β2^t)``, so a β2
    schedule, whose bias correction is ``1 - Π β2_k``, does not come here.
    """
    bias_correction1 = 1 - beta1**t
    lr_kernel = lr * bias_correction1 * inv_c1  # = lr with momentum bias correction
    decay_kernel = weight_decay * lr / lr_kernel if lr_kernel else weight_decay
    step = host_values([float(t)], torch.float32, params[0].device).reshape(())
    torch._fused_adamw_(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        [step] * len(params),
        lr=lr_kernel,
        beta1=beta1,
        beta2=beta2,
        weight_decay=decay_kernel,
        eps=eps,
        amsgrad=False,
        maximize=False,
    )


def foreach_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    eps_sq: float,
    inv_c1: float,
    inv_sqrt_c2: float,
    update_clip: float | None,
    normalize: str,
    **_: Any,
) -> None:
    """``adam_step_`` (without statistics) on every tensor of the lists with torch's multi-tensor
    ``_foreach_`` kernels, all sharing the step's scalars: a few launches per step whatever the
    number of tensors. The GPU path: there a step of a large model takes well under a millisecond
    of device time, and the compiled path's per-call overhead (dynamo guards, one call per few
    tensors) dominates it. Temporaries: one to three times the tensors' size (√v̂, the direction,
    the clipping ratio): ``Adam`` steps them in runs of at most ``FOREACH_CHUNK_NUMEL`` elements.
    """
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    sqrt_v_hat = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_mul_(sqrt_v_hat, inv_sqrt_c2)
    if update_clip is not None:
        # RMS_t² = mean(g²/max(v̂_t, ε²)), from √v̂_t: max(√v̂_t, ε)² = max(v̂_t, ε²)
        floor = torch._foreach_maximum(sqrt_v_hat, eps_sq**0.5)
        ratio = torch._foreach_div(grads, floor)
        del floor
        norms = torch._foreach_norm(ratio)
        del ratio
        numels = host_values([g.numel() for g in grads], norms[0].dtype, grads[0].device)
        rms = torch.stack(norms) / numels.sqrt()
        scales = (update_clip / rms).clamp_max(1.0)  # RMS_t = 0: d/0 = inf → 1
    torch._foreach_mul_(exp_avgs, beta1)
    if normalize == "laprop":
        torch._foreach_add_(sqrt_v_hat, eps)
        normalized = torch._foreach_div(grads, sqrt_v_hat)
        torch._foreach_add_(exp_avgs, normalized, alpha=1 - beta1)
        del normalized
    else:
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
    if update_clip is None and normalize != "atan2":
        # without a scale, straight into the params: no temporary for the direction
        torch._foreach_mul_(params, 1 - lr * weight_decay)
        if normalize == "adam":
            torch._foreach_add_(sqrt_v_hat, eps)
            torch._foreach_addcdiv_(params, exp_avgs, sqrt_v_hat, value=-lr * inv_c1)
        else:  # laprop
            torch._foreach_add_(params, exp_avgs, alpha=-lr * inv_c1)
        return None
    if normalize == "adam":
        torch._foreach_add_(sqrt_v_hat, eps)
        update = torch._foreach_div(exp_avgs, sqrt_v_hat)
        torch._foreach_mul_(update, inv_c1)
    elif normalize == "laprop":
        update = torch._foreach_mul(exp_avgs, inv_c1)
    elif normalize == "atan2":
        # no multi-tensor atan2: one kernel per tensor
        momentum = torch._foreach_mul(exp_avgs, inv_c1)
        update = [torch.atan2(m, ATAN2_B * x) for m, x in zip(momentum, sqrt_v_hat)]
        del momentum
        torch._foreach_mul_(update, ATAN2_A)
    else:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    del sqrt_v_hat
    if update_clip is None:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
        torch._foreach_add_(params, update, alpha=-lr)
        return None
    # the clipped lr also sets the decay (see adam_step_)
    scale_list = list(scales.to(update[0].dtype).unbind())
    torch._foreach_mul_(update, scale_list)
    torch._foreach_mul_(params, list((1 - lr * weight_decay * scales).to(params[0].dtype).unbind()))
    torch._foreach_add_(params, update, alpha=-lr)
    return None


def warn_eager_fallback(error: BaseException) -> None:
    warnings.warn(
        f"torch.compile failed for the Adam step ({type(error).__name__}: {error}); "
        "running the eager step instead. Pass fused=False to skip compilation.",
        RuntimeWarning,
        stacklevel=3,
    )
