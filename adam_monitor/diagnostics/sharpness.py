"""The preconditioned sharpness along Adam's update, read from the state of two consecutive steps.

Adam steps ``θ_{t+1} = θ_t − η·P⁻¹m̂_t`` with ``P = diag(√v̂ + ε)``. On a quadratic with Hessian H
its momentum iteration is stable while ``η·λ_max(P⁻¹H) < (2 + 2β1)/(1 − β1)`` (38 at β1 = 0.9):
Adam's adaptive edge of stability (Cohen et al. 2022), which a converged run reaches when √v̂
decays. Along the direction of the previous update ``u = P⁻¹m̂_{t−1}`` the Rayleigh quotient of
P⁻¹H in the P inner product is ``u·Hu / u·Pu``, a lower bound of λ_max(P⁻¹H) that meets it once
the update runs along the sharpest direction, as it does when an oscillation builds up. With
``g_t − g_{t−1} = H(θ_t − θ_{t−1}) = −η·H·u`` (exact on a quadratic) and ``P·u = m̂_{t−1}``::

    η·u·Hu / u·Pu = (u_{t−1}·g_{t−1} − u_{t−1}·g_t) / (u_{t−1}·m̂_{t−1})

needs no learning rate (for η_t = η_{t−1}) and no copy of any state: ``u_{t−1}·g_{t−1}`` and
``u_{t−1}·m̂_{t−1}`` are sums of step t−1, and ``u_{t−1}`` is rebuilt at step t from
``m_{t−1} = (m_t − (1−β1)·g_t)/β1`` and ``v_{t−1} = (v_t − (1−β2)·g_t²)/β2``. The three sums are
per tensor and pool by addition, over tensors (the quotient of the whole model along its whole
update), steps and ranks. Gradient noise adds about ``(1+β1)`` to the quotient of a minibatch run
(the part of ``u_{t−1}`` that is ``g_{t−1}``'s own noise), 5% of the edge at β1 = 0.9. β1 = 0
keeps nothing from which to rebuild ``u_{t−1}``: no estimate (NaN).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["CURVATURE_FIELDS", "curvature_sums", "preconditioned_sharpness", "edge_of_stability"]

#: Columns of :func:`curvature_sums`: Σ u_t·g_t, Σ u_{t−1}·g_t, Σ u_t·m̂_t.
CURVATURE_FIELDS = ("update_dot_grad", "previous_update_dot_grad", "update_dot_momentum")


def edge_of_stability(beta1: float) -> float:
    """``(2 + 2β1)/(1 − β1)``: the largest η·λ(P⁻¹H) at which Adam's momentum iteration is stable."""
    return (2 + 2 * beta1) / (1 - beta1)


def _direction(m: Tensor, v: Tensor, c1: float, c2: float, eps: float) -> Tensor:
    return (m / c1) / (v.clamp_min(0).div(c2).sqrt() + eps)


def curvature_sums(
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    step: int,
) -> Tensor:
    """Float64 ``(len(grads), 3)``: per tensor the ``CURVATURE_FIELDS`` of the step just taken, from the
    state after it (torch Adam's ``exp_avg``/``exp_avg_sq``, ``grads`` the gradients the step used).

    Sums in float32 for float32 and narrower tensors (float64 for float64). The previous update's
    sum is 0 at step 1 and NaN at β1 = 0 (nothing to rebuild it from).
    """
    out = torch.zeros(len(grads), 3, dtype=torch.float64, device=grads[0].device if grads else None)
    c1, c2 = 1 - beta1**step, 1 - beta2**step
    for i, (g, m, v) in enumerate(zip(grads, exp_avgs, exp_avg_sqs)):
        dt = torch.float64 if g.dtype == torch.float64 else torch.float32
        g, m, v = g.to(dt), m.to(dt), v.to(dt)
        u = _direction(m, v, c1, c2, eps)
        out[i, 0] = torch.dot(u.flatten(), g.flatten()).double()
        out[i, 2] = torch.dot(u.flatten(), (m / c1).flatten()).double()
        if step == 1:
            continue
        if beta1 == 0:
            out[i, 1] = math.nan
            continue
        m_prev = (m - (1 - beta1) * g) / beta1
        v_prev = (v - (1 - beta2) * g * g) / beta2 if beta2 > 0 else torch.zeros_like(v)
        u_prev = _direction(m_prev, v_prev, 1 - beta1 ** (step - 1), 1 - beta2 ** (step - 1), eps)
        out[i, 1] = torch.dot(u_prev.flatten(), g.flatten()).double()
    return out


def preconditioned_sharpness(previous: Tensor, current: Tensor, lr_ratio: float = 1.0) -> Tensor:
    """``η_t·u·Hu / u·Pu`` along the update of the step before ``current`` (``lr_ratio = η_t/η_{t−1}``),
    from the pooled ``curvature_sums`` of two consecutive steps (``(..., 3)``); NaN where the
    previous update had no size."""
    numerator = previous[..., 0] - current[..., 1]
    denominator = previous[..., 2]
    safe = torch.where(denominator > 0, denominator, 1.0)
    return torch.where(denominator > 0, lr_ratio * numerator / safe, math.nan)
