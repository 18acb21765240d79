"""Sufficient statistics of the four Adam diagnostics.

Pure tensor math: no Lightning, no optimizer objects. Every diagnostic is a ratio of sums, so we
carry the sums (one row of ``NUM_STATS`` numbers per tensor) and pool them exactly over tensors,
optimizer steps and ranks by adding rows. Definitions (per coordinate, bias-corrected moments
``v̂_t = v_t / (1 - β2^t)``):

* ``update_rms      = sqrt(Σ u²  / n)``                 u: the direction of the step (over the lr)
* ``staleness       = sqrt(Σ g² / max(v̂_t, ε²) / n)``   v̂_t already holds g_t
* ``gradient_jump   = sqrt(Σ' g² / max(v̂_{t-1}, ε²) / n')`` over the n' coordinates with v_{t-1} > 0
* ``eps_dominance   = #(√v̂ ≤ ε) / n``                  v̂ of the denominator (the running max under amsgrad)

``tensor_statistics`` is the readable one-tensor specification; ``adam_statistics`` computes the
same rows for a list of torch-Adam tensors that share hyper-parameters, batched with
``torch._foreach_*`` kernels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .transfer import host_values

__all__ = [
    "STAT_FIELDS",
    "NUM_STATS",
    "DIAGNOSTICS",
    "tensor_statistics",
    "adam_direction",
    "previous_second_moment",
    "adam_statistics",
    "pool",
    "diagnostics_from_statistics",
]

#: Columns of a statistics row.
STAT_FIELDS = ("update_sq", "staleness_sq", "jump_sq", "jump_count", "eps_count", "count")
NUM_STATS = len(STAT_FIELDS)
UPDATE_SQ, STALENESS_SQ, JUMP_SQ, JUMP_COUNT, EPS_COUNT, COUNT = range(NUM_STATS)

#: Diagnostic names, in the order ``diagnostics_from_statistics`` returns them.
DIAGNOSTICS = ("update_rms", "staleness", "gradient_jump", "eps_dominance")


def _reconstruction_tolerance(dtype: torch.dtype) -> float:
    # v_{t-1} rebuilt as (v_t - (1-β2)·g²)/β2 carries a rounding error of a few ulp of v_t; a
    # remainder below this fraction of v_t is indistinguishable from an exact zero (a coordinate
    # that had never seen a gradient), which must count as "no previous second moment", not as an
    # astronomically small one.
    return 16 * torch.finfo(dtype).eps


def tensor_statistics(
    grad: Tensor,
    update: Tensor,
    v_hat: Tensor,
    v_hat_prev: Tensor | None,
    eps: float,
    v_hat_denominator: Tensor | None = None,
) -> Tensor:
    """One statistics row for one tensor, from bias-corrected second moments.

    Args:
        grad: the gradient the step used (after unscaling, clipping, L2 decay, sign for maximize).
        update: the step direction u (the applied step over the learning rate, decoupled weight
            decay excluded).
        v_hat: ``v_t / c2_t``, the bias-corrected second moment after the step.
        v_hat_prev: ``v_{t-1} / c2_{t-1}``, or ``None`` at the first step (no previous moment).
        eps: the optimizer's ε.
        v_hat_denominator: the second moment the denominator used, if not ``v_hat`` (amsgrad).

    Returns:
        A float64 tensor of shape ``(NUM_STATS,)`` on the tensors' device.
    """
    g2 = grad.double().square()
    v_hat = v_hat.double()
    eps_sq = max(float(eps) ** 2, torch.finfo(torch.float64).tiny)
    row = torch.zeros(NUM_STATS, dtype=torch.float64, device=grad.device)
    row[UPDATE_SQ] = update.double().square().sum()
    row[STALENESS_SQ] = (g2 / v_hat.clamp_min(eps_sq)).sum()
    if v_hat_prev is not None:
        v_hat_prev = v_hat_prev.double()
        valid = v_hat_prev > 0
        row[JUMP_SQ] = (g2[valid] / v_hat_prev[valid].clamp_min(eps_sq)).sum()
        row[JUMP_COUNT] = valid.sum()
    denominator = v_hat if v_hat_denominator is None else v_hat_denominator.double()
    row[EPS_COUNT] = (denominator.sqrt() <= eps).sum()
    row[COUNT] = grad.numel()
    return row


def adam_direction(
    exp_avg: Tensor, denominator_sq: Tensor, *, bias_correction1: float, bias_correction2: float, eps: float
) -> Tensor:
    """``m̂ / (√v̂ + ε)`` in the operation order of ``torch.optim.Adam`` (so it matches to a few ulp)."""
    denom = (denominator_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    return (exp_avg / denom).div_(bias_correction1)


def previous_second_moment(exp_avg_sq: Tensor, grad: Tensor, beta2: float) -> Tensor:
    """``v_{t-1}`` rebuilt exactly from ``v_t = β2·v_{t-1} + (1-β2)·g_t²``; rounding residue → 0."""
    prev = exp_avg_sq - (1 - beta2) * grad.square()
    prev = torch.where(prev > _reconstruction_tolerance(exp_avg_sq.dtype) * exp_avg_sq, prev, 0.0)
    return prev / beta2


#: ``adam_statistics`` concatenates the tensors of one call into one flat buffer when they hold at
#: most this many elements in all: a handful of single kernels then replace ~20 foreach passes,
#: each of which costs a fixed dispatch per tensor (the copies are cheap at this size).
FLAT_MAX_NUMEL = 1 << 20


def _numpy_adam_statistics(g, m, v, v_den, *, beta1, beta2, eps, step, compute_dtype) -> Tensor:
    """``adam_statistics`` for small CPU tensors, on one concatenated numpy buffer: the same
    elementwise operations in the same order as the foreach path, then one float64 segment sum per
    statistic. A numpy call on a few thousand elements costs about a microsecond, a torch dispatch
    ten or more, and the foreach path makes some twenty of them."""
    sizes = [t.numel() for t in g]
    n = len(sizes)

    def cat(ts: Sequence[Tensor]) -> np.ndarray:
        if n == 1:
            return ts[0].detach().numpy().reshape(-1)
        with torch.no_grad():  # one torch concatenation: a reshape per tensor, not three calls
            return torch.cat([t.reshape(-1) for t in ts]).numpy()

    g, m, v = cat(g), cat(m), cat(v)
    v_den = v if v_den is None else cat(v_den)
    dt = g.dtype.type
    c1 = 1 - beta1**step
    c2 = 1 - beta2**step
    eps_sq = max(float(eps) ** 2, torch.finfo(compute_dtype).tiny)
    terms = np.empty((5 if step > 1 else 3, g.shape[0]), dtype=g.dtype)
    with np.errstate(all="ignore"):
        denom = np.sqrt(v_den)
        np.divide(denom, dt(math.sqrt(c2)), out=denom)
        np.add(denom, dt(eps), out=denom)
        u = np.divide(m, denom, out=terms[0])
        np.multiply(u, u, out=u)
        np.subtract(denom, dt(2 * eps), out=denom)
        np.fmax(denom, dt(0.0), out=denom)  # NaN → 0, as torch's sign(clamp_min(NaN)) = sign(NaN) = 0
        np.sign(denom, out=terms[1])
        g2 = g * g
        np.divide(g2, np.maximum(v, dt(c2 * eps_sq)), out=terms[2])
        if step > 1:
            c2_prev = 1 - beta2 ** (step - 1)
            scale = beta2 * c2_prev
            # a + α·b as torch computes it (fused multiply-add in its vector kernels): the
            # cancellation in w = v - (1-β2)·g² makes two roundings visible in the jump sums.
            tv, tg2 = torch.from_numpy(v), torch.from_numpy(g2)
            w_t = torch.add(tv, tg2, alpha=-(1 - beta2))
            w = w_t.numpy()
            tol = _reconstruction_tolerance(compute_dtype)
            torch.add(w_t, tv, alpha=-tol, out=torch.from_numpy(terms[3]))
            residue = terms[3]
            np.fmax(residue, dt(0.0), out=residue)
            np.sign(residue, out=residue)
            np.maximum(w, dt(scale * eps_sq), out=w)
            np.multiply(g2, residue, out=g2)
            np.divide(g2, w, out=terms[4])
        if n == 1:
            sums = terms.sum(1, dtype=np.float64)[:, None]
        else:
            offsets = np.zeros(n, dtype=np.int64)
            np.cumsum(sizes[:-1], out=offsets[1:])
            sums = np.add.reduceat(terms.astype(np.float64), offsets, axis=1)
        counts = np.array(sizes, dtype=np.float64)
        rows = np.zeros((n, NUM_STATS), dtype=np.float64)
        rows[:, UPDATE_SQ] = sums[0] / (c1 * c1)
        rows[:, EPS_COUNT] = counts - sums[1]
        rows[:, STALENESS_SQ] = sums[2] * c2
        if step > 1:
            rows[:, JUMP_COUNT] = sums[3]
            rows[:, JUMP_SQ] = sums[4] * scale
        rows[:, COUNT] = counts
    return torch.from_numpy(rows)


def _sums(terms: list[Tensor]) -> Tensor:
    """Per-tensor sums of non-negative terms, in their dtype: one multi-tensor reduction on a GPU.

    Not ``torch._foreach_norm`` on the CPU: there it accumulates float32 serially (a relative
    error of 1.7e-3 at 8M elements, 2.8e-2 at 33M, against about 1e-8 for ``Tensor.sum``, which
    sums in cascade), enough to put a step-1 update RMS of exactly 1 above its bound.
    """
    if terms[0].device.type == "cpu":
        return torch.stack([t.sum() for t in terms])
    return torch.stack(torch._foreach_norm(terms, 1))


def _sums_of_squares(terms: list[Tensor]) -> Tensor:
    """Per-tensor sums of squares; squares ``terms`` in place on the CPU (see :func:`_sums`)."""
    if terms[0].device.type == "cpu":
        torch._foreach_mul_(terms, terms)
        return _sums(terms)
    return torch.stack(torch._foreach_norm(terms, 2)).square_()


def adam_statistics(
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    step: int,
    max_exp_avg_sqs: Sequence[Tensor] | None = None,
    flat: bool | None = None,
) -> Tensor:
    """Statistics rows ``(len(grads), NUM_STATS)`` for tensors stepped by torch Adam/AdamW.

    All tensors share device, dtype, hyper-parameters and step count ``step`` (the count after the
    step). ``grads`` are the gradients the step used. Reads the moments from the state after the
    step: v_{t-1} is rebuilt from v_t, so no copy of the state is taken. Sums accumulate in float32
    for float32/low-precision tensors (float64 for float64) and come back as float64.

    ``flat``: ``None`` concatenates CPU tensors into one numpy buffer when they hold at most
    ``FLAT_MAX_NUMEL`` elements in all (elementwise terms in the compute dtype, per-tensor sums
    in float64); ``False`` runs the per-tensor ``torch._foreach_*`` passes (always used on other
    devices, where they are batched kernels already); ``True`` takes the buffer whatever the size.
    """
    n = len(grads)
    device = grads[0].device if n else torch.device("cpu")
    if n == 0:
        return torch.zeros(0, NUM_STATS, dtype=torch.float64, device=device)
    compute_dtype = torch.float64 if grads[0].dtype == torch.float64 else torch.float32

    def up(ts: Sequence[Tensor]) -> list[Tensor]:
        return [t if t.dtype == compute_dtype else t.to(compute_dtype) for t in ts]

    g, m, v = up(grads), up(exp_avgs), up(exp_avg_sqs)
    if flat is None:
        flat = sum(t.numel() for t in grads) <= FLAT_MAX_NUMEL
    if flat and device.type == "cpu" and all(t.numel() for t in g):  # reduceat needs non-empty segments
        v_den = None if max_exp_avg_sqs is None else up(max_exp_avg_sqs)
        try:
            return _numpy_adam_statistics(
                g, m, v, v_den, beta1=beta1, beta2=beta2, eps=eps, step=step, compute_dtype=compute_dtype
            )
        except (TypeError, RuntimeError):  # a tensor numpy cannot view (conjugate/negative bit, ...)
            pass
    v_den = v if max_exp_avg_sqs is None else up(max_exp_avg_sqs)
    c1 = 1 - beta1**step
    c2 = 1 - beta2**step
    # ε = 0 is legal; the floor keeps 0/0 (coordinates that never saw a gradient) out of the sums.
    eps_sq = max(float(eps) ** 2, torch.finfo(compute_dtype).tiny)
    rows = torch.empty(n, NUM_STATS, dtype=compute_dtype, device=device)

    # update: m / (sqrt(v_den)/sqrt(c2) + eps) / c1, torch's own operation order.
    denom = torch._foreach_sqrt(v_den)
    torch._foreach_div_(denom, math.sqrt(c2))
    torch._foreach_add_(denom, eps)
    u = torch._foreach_div(m, denom)
    rows[:, UPDATE_SQ] = _sums_of_squares(u) / (c1 * c1)
    del u

    # eps-dominance: sqrt(v_den)/sqrt(c2) <= eps  <=>  denom <= 2·eps (denom = √v̂ + ε).
    torch._foreach_sub_(denom, 2 * eps)
    torch._foreach_clamp_min_(denom, 0.0)
    torch._foreach_sign_(denom)  # 1 where ε does not dominate
    not_dominated = _sums(denom)
    del denom

    # staleness: g² / max(v/c2, ε²) = c2 · g² / max(v, c2·ε²)
    g2 = torch._foreach_mul(g, g)
    v_floor = torch._foreach_clamp_min(v, c2 * eps_sq)
    ratio = torch._foreach_div(g2, v_floor)
    rows[:, STALENESS_SQ] = _sums(ratio) * c2
    del v_floor, ratio

    # gradient jump against v_{t-1} = (v - (1-β2)g²)/β2, bias-corrected by c2' = 1 - β2^(t-1).
    if step > 1:
        c2_prev = 1 - beta2 ** (step - 1)
        scale = beta2 * c2_prev  # v̂_{t-1} = w / scale with w = v - (1-β2)·g²
        w = torch._foreach_add(v, g2, alpha=-(1 - beta2))
        tol = _reconstruction_tolerance(compute_dtype)
        residue = torch._foreach_add(w, v, alpha=-tol)  # > 0 iff w > tol·v
        torch._foreach_clamp_min_(residue, 0.0)
        torch._foreach_sign_(residue)  # the valid-coordinate mask
        rows[:, JUMP_COUNT] = _sums(residue)
        torch._foreach_clamp_min_(w, scale * eps_sq)
        torch._foreach_mul_(g2, residue)
        torch._foreach_div_(g2, w)
        rows[:, JUMP_SQ] = _sums(g2) * scale
        del w, residue
    else:
        rows[:, JUMP_SQ] = 0.0
        rows[:, JUMP_COUNT] = 0.0
    del g2

    counts = host_values([t.numel() for t in grads], compute_dtype, device)
    rows[:, EPS_COUNT] = counts - not_dominated
    rows[:, COUNT] = counts
    return rows.double()


def pool(rows: Tensor) -> Tensor:
    """Pool statistics rows exactly (sum over all leading dimensions)."""
    return rows.reshape(-1, NUM_STATS).sum(0)


def diagnostics_from_statistics(row: Tensor) -> Tensor:
    """The four diagnostics (``DIAGNOSTICS`` order) from pooled rows ``(..., NUM_STATS)``.

    ``gradient_jump`` is NaN where no coordinate had a previous second moment (the first step).
    Works on any device and never syncs with the host.
    """
    count = row[..., COUNT]
    jump_count = row[..., JUMP_COUNT]
    nan = torch.full_like(count, math.nan)
    safe = torch.where(count > 0, count, 1.0)
    safe_jump = torch.where(jump_count > 0, jump_count, 1.0)
    return torch.stack(
        [
            torch.where(count > 0, (row[..., UPDATE_SQ] / safe).sqrt(), nan),
            torch.where(count > 0, (row[..., STALENESS_SQ] / safe).sqrt(), nan),
            torch.where(jump_count > 0, (row[..., JUMP_SQ] / safe_jump).sqrt(), nan),
            torch.where(count > 0, row[..., EPS_COUNT] / safe, nan),
        ],
        dim=-1,
    )
