"""Statistics rows for many torch-Adam tensors at once: ``torch._foreach_*`` passes, or one numpy
buffer for small CPU tensors. The same rows as :func:`.reference.tensor_statistics`, batched."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .._runtime import FLAT_MAX_NUMEL, host_values
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

__all__ = ["adam_statistics"]


def _flatten(ts: Sequence[Tensor]) -> Tensor:
    """``torch.cat([t.reshape(-1) for t in ts])``, in one call (the helper DDP buckets with)."""
    flatten = getattr(torch._utils, "_flatten_dense_tensors", None)
    return flatten(list(ts)) if flatten is not None else torch.cat([t.reshape(-1) for t in ts])


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
        with torch.no_grad():  # one call: the per-tensor flattening happens in C++, not Python
            return _flatten(ts).numpy()

    g, m, v = cat(g), cat(m), cat(v)
    v_den = v if v_den is None else cat(v_den)
    dt = g.dtype.type
    c1 = 1 - beta1**step
    c2 = 1 - beta2**step
    eps_sq = max(float(eps) ** 2, torch.finfo(compute_dtype).tiny)
    has_previous = step > 1 and beta2 > 0  # β2 = 0: v_t = g_t² keeps nothing of v_{t-1}
    terms = np.empty((6 if has_previous else 4, g.shape[0]), dtype=g.dtype)
    with np.errstate(all="ignore"):
        denom = np.sqrt(v_den)
        np.divide(denom, dt(math.sqrt(c2)), out=denom)
        np.add(denom, dt(eps), out=denom)
        u = np.divide(m, denom, out=terms[0])
        np.multiply(u, u, out=u)
        np.subtract(denom, dt(2 * eps), out=denom)
        np.fmax(denom, dt(0.0), out=denom)  # NaN → 0, as torch's sign(clamp_min(NaN)) = sign(NaN) = 0
        np.sign(denom, out=terms[1])
        has_grad = np.abs(g, out=terms[3])  # not g², which underflows to 0 for tiny gradients
        np.fmax(has_grad, dt(0.0), out=has_grad)  # NaN → 0, as torch's sign(NaN) = 0
        np.sign(has_grad, out=has_grad)
        np.multiply(terms[1], has_grad, out=terms[1])
        g2 = g * g
        np.divide(g2, np.maximum(v, dt(c2 * eps_sq)), out=terms[2])
        if has_previous:
            c2_prev = 1 - beta2 ** (step - 1)
            scale = beta2 * c2_prev
            # a + α·b as torch computes it (fused multiply-add in its vector kernels): the
            # cancellation in w = v - (1-β2)·g² makes two roundings visible in the jump sums.
            tv, tg2 = torch.from_numpy(v), torch.from_numpy(g2)
            w_t = torch.add(tv, tg2, alpha=-(1 - beta2))
            w = w_t.numpy()
            tol = reconstruction_tolerance(compute_dtype)
            torch.add(w_t, tv, alpha=-tol, out=torch.from_numpy(terms[4]))
            residue = terms[4]
            np.fmax(residue, dt(0.0), out=residue)
            np.sign(residue, out=residue)
            np.maximum(w, dt(scale * eps_sq), out=w)
            np.multiply(g2, residue, out=g2)
            np.divide(g2, w, out=terms[5])
        if n == 1:
            sums = terms.sum(1, dtype=np.float64)[:, None]
        else:
            offsets = np.zeros(n, dtype=np.int64)
            np.cumsum(sizes[:-1], out=offsets[1:])
            sums = np.add.reduceat(terms.astype(np.float64), offsets, axis=1)
        counts = np.array(sizes, dtype=np.float64)
        rows = np.zeros((n, NUM_STATS), dtype=np.float64)
        rows[:, UPDATE_SQ] = sums[0] / (c1 * c1)
        rows[:, EPS_COUNT] = sums[3] - sums[1]
        rows[:, GRAD_COUNT] = sums[3]
        rows[:, STALENESS_SQ] = sums[2] * c2
        if has_previous:
            rows[:, JUMP_COUNT] = sums[4]
            rows[:, JUMP_SQ] = sums[5] * scale
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


def _eps_counts(denom: list[Tensor], g: list[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    """``(#(√v̂ ≤ ε and g ≠ 0), #(g ≠ 0))`` per tensor from ``denom = √v̂ + ε``, which it overwrites.

    √v̂ ≤ ε ⟺ denom ≤ 2ε. The gradient mask is |g| > 0, not g² > 0, which underflows for tiny
    gradients, exactly the ones this statistic is about.
    """
    torch._foreach_sub_(denom, 2 * eps)
    torch._foreach_clamp_min_(denom, 0.0)
    torch._foreach_sign_(denom)  # 1 where ε does not dominate
    has_grad = torch._foreach_abs(g)
    torch._foreach_sign_(has_grad)  # 1 where g ≠ 0
    torch._foreach_mul_(denom, has_grad)
    grad_count = _sums(has_grad)
    return grad_count - _sums(denom), grad_count


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

    rows[:, EPS_COUNT], rows[:, GRAD_COUNT] = _eps_counts(denom, g, eps)
    del denom

    # staleness: g² / max(v/c2, ε²) = c2 · g² / max(v, c2·ε²)
    g2 = torch._foreach_mul(g, g)
    v_floor = torch._foreach_clamp_min(v, c2 * eps_sq)
    ratio = torch._foreach_div(g2, v_floor)
    rows[:, STALENESS_SQ] = _sums(ratio) * c2
    del v_floor, ratio

    # gradient jump against v_{t-1} = (v - (1-β2)g²)/β2, bias-corrected by c2' = 1 - β2^(t-1).
    if step > 1 and beta2 > 0:  # β2 = 0: v_t = g_t² keeps nothing of v_{t-1}
        c2_prev = 1 - beta2 ** (step - 1)
        scale = beta2 * c2_prev  # v̂_{t-1} = w / scale with w = v - (1-β2)·g²
        w = torch._foreach_add(v, g2, alpha=-(1 - beta2))
        tol = reconstruction_tolerance(compute_dtype)
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

    rows[:, COUNT] = host_values([t.numel() for t in grads], compute_dtype, device)
    return rows.double()
