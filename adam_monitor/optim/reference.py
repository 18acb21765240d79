"""One step of the Adam family for one tensor: the specification every fast path is tested against.

With hyper-parameters of the step (β2_t may vary, see ``Adam``)::

    v_t = β2_t·v_{t-1} + (1-β2_t)·g²                 v̂_t = v_t / c2_t
    adam:   m_t = β1·m_{t-1} + (1-β1)·g              u = (m_t/c1) / (√v̂_t + ε)
    laprop: m_t = β1·m_{t-1} + (1-β1)·g/(√v̂_t + ε)   u = m_t/c1
    atan2:  m_t = β1·m_{t-1} + (1-β1)·g              u = a·atan2(m_t/c1, b·√v̂_t)
    clip d: u ← u / max(1, RMS_t/d),   RMS_t = √mean(g²/max(v̂_t, ε²))
    p ← p·(1 - η·λ·s) - η·u      (s = 1/max(1, RMS_t/d) with clipping, else 1)

``c1 = 1 - β1^t`` with momentum bias correction, else 1. The fast paths: ``foreach`` (torch's
multi-tensor kernels, and its own fused AdamW kernel) and ``compiled`` (``torch.compile``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["direction_from_state", "ATAN2_A", "ATAN2_B", "NORMALIZE", "adam_step_"]

#: atan2 constants of Everett et al. 2024 ("Scaling Exponents Across Parameterizations and
#: Optimizers", Adam-atan2): u = a·atan2(m̂, b·√v̂). a = 1.27 ≈ 4/π makes a steady signal
#: (m̂ = √v̂, Adam's |u| = 1) move by a·π/4 ≈ 1, as Adam does; |u| ≤ a·π/2 ≈ 2 always.
ATAN2_A = 1.27
ATAN2_B = 1.0

NORMALIZE = ("adam", "laprop", "atan2")


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
    has_grad = grad != 0  # ε-dominance counts only the coordinates that got a gradient
    return torch.stack(
        [
            update.square().sum(dtype=f64),
            staleness_sq,
            jump_sq,
            jump_count,
            ((sqrt_v_hat <= eps) & has_grad).sum(dtype=f64),
            has_grad.sum(dtype=f64),
            torch.full((), grad.numel(), dtype=f64, device=grad.device),
        ]
    )


def direction_from_state(
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    grad: Tensor | None,
    *,
    c1: float,
    c2: float,
    eps: float,
    normalize: str,
    update_clip: float | None,
) -> Tensor:
    """The direction ``u`` of a finished step from the moments it wrote (``c1``, ``c2``: its bias
    corrections, ``c1 = 1`` without momentum bias correction), clipped by the RMS of
    ``g²/max(v̂, ε²)`` as the step was; the compute dtype is at least float32."""
    compute = torch.promote_types(exp_avg.dtype, torch.float32)
    m, v_hat = exp_avg.to(compute), exp_avg_sq.to(compute) / c2
    if normalize == "atan2":
        eps = 0.0  # ε-free
    if normalize == "laprop":
        u = m / c1
    elif normalize == "atan2":
        u = ATAN2_A * torch.atan2(m / c1, ATAN2_B * v_hat.sqrt())
    else:
        u = m / c1 / (v_hat.sqrt() + eps)
    if update_clip is not None and grad is not None:
        rms = (grad.to(compute).square() / v_hat.clamp_min(max(eps * eps, torch.finfo(compute).tiny))).mean().sqrt()
        u = u / (rms / update_clip).clamp_min(1.0)
    return u
