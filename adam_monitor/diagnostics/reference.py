"""The readable specification of the statistics: one tensor, float64, in the order of the definitions.

The fast paths (:mod:`.foreach`, :mod:`.compiled`) are tested against :func:`tensor_statistics`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

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

__all__ = [
    "tensor_statistics",
    "adam_direction",
    "nadam_direction",
    "radam_direction",
    "radam_rectification",
    "previous_second_moment",
]


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
    # A coordinate without a gradient this step tells nothing about ε: its v̂ only decays.
    has_grad = grad != 0
    row[EPS_COUNT] = ((denominator.sqrt() <= eps) & has_grad).sum()
    row[GRAD_COUNT] = has_grad.sum()
    row[COUNT] = grad.numel()
    return row


def adam_direction(
    exp_avg: Tensor, denominator_sq: Tensor, *, bias_correction1: float, bias_correction2: float, eps: float
) -> Tensor:
    """``m̂ / (√v̂ + ε)`` in the operation order of ``torch.optim.Adam`` (so it matches to a few ulp)."""
    denom = (denominator_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    return (exp_avg / denom).div_(bias_correction1)


def nadam_direction(
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    step: float,
    momentum_decay: float,
    mu_product: float,
) -> Tensor:
    """``torch.optim.NAdam``'s direction: ``(1-μ_t)/(1-Π_t)·g/d + μ_{t+1}/(1-Π_t·μ_{t+1})·m/d``,
    ``d = √(v/c2) + ε``, ``μ_t = β1·(1 - ½·0.96^(t·ψ))``, ``Π_t`` (``mu_product``) the product of
    μ_1..μ_t. ``grad`` is the gradient the step used, sign included (``maximize`` flips it)."""
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (step * momentum_decay))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((step + 1) * momentum_decay))
    denom = (exp_avg_sq / (1 - beta2**step)).sqrt().add_(eps)
    return grad * ((1.0 - mu) / (1.0 - mu_product)) / denom + exp_avg * (mu_next / (1.0 - mu_product * mu_next)) / denom


def radam_rectification(beta2: float, step: float) -> float | None:
    """RAdam's variance rectification ``r_t`` at ``step``, or ``None`` while ρ_t ≤ 5 (the step is
    then the bias-corrected momentum alone, SGD with momentum)."""
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * beta2**step / (1 - beta2**step)
    if not rho_t > 5.0:
        return None
    return ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5


def radam_direction(
    exp_avg: Tensor, exp_avg_sq: Tensor, *, beta1: float, beta2: float, eps: float, step: float
) -> Tensor:
    """``torch.optim.RAdam``'s direction: ``m̂·r_t·√c2/(√v + ε)`` (ε added to √v, not √v̂), or ``m̂``
    while the variance is not yet rectifiable."""
    m_hat = exp_avg / (1 - beta1**step)
    rect = radam_rectification(beta2, step)
    if rect is None:
        return m_hat
    return m_hat * ((1 - beta2**step) ** 0.5 / exp_avg_sq.sqrt().add_(eps)) * rect


def previous_second_moment(exp_avg_sq: Tensor, grad: Tensor, beta2: float) -> Tensor:
    """``v_{t-1}`` rebuilt exactly from ``v_t = β2·v_{t-1} + (1-β2)·g_t²``; rounding residue → 0."""
    prev = exp_avg_sq - (1 - beta2) * grad.square()
    prev = torch.where(prev > reconstruction_tolerance(exp_avg_sq.dtype) * exp_avg_sq, prev, 0.0)
    return prev / beta2
