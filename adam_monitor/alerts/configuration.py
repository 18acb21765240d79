"""The configuration rules: what the betas alone say, before any step."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..theory import asymptotic_bound, worst_case_bound
from .records import Alert

__all__ = ["configuration_alerts", "configuration_alerts_by_group"]


def configuration_alerts(
    betas_by_group: Sequence[tuple[float, float] | None], *, optimizer: str, step: int
) -> list[Alert]:
    """``beta_coupling`` (β1² ≥ β2) and ``beta_order`` (β1 ≥ β2 > β1²) alerts, one per offending group.

    ``None`` marks a group whose update is not Adam's ``m̂/(√v̂+ε)`` (LaProp, atan2): their size is
    bounded whatever the betas, so the coupling rules do not apply. Every pair torch accepts gets a
    verdict: β1 = 0 (RMSprop, sign descent at β2 = 0) is bounded by 1/√(1-β2) and raises nothing;
    β2 = 0 < β1 is unbounded (v̂ holds only the last gradient, m̂ all of them).
    """
    return [alert for _, alert in configuration_alerts_by_group(betas_by_group, optimizer=optimizer, step=step)]


def configuration_alerts_by_group(
    betas_by_group: Sequence[tuple[float, float] | None], *, optimizer: str, step: int
) -> list[tuple[int, Alert]]:
    """:func:`configuration_alerts` with the index of the param group each alert is about."""
    found = []
    for gi, betas in enumerate(betas_by_group):
        if betas is not None:
            alert = _group_alert(gi, float(betas[0]), float(betas[1]), optimizer, step)
            if alert is not None:
                found.append((gi, alert))
    return found


def _group_alert(gi: int, beta1: float, beta2: float, optimizer: str, step: int) -> Alert | None:
    if beta1 == 0.0:
        return None  # no momentum: |u_t| = |g_t|/√v̂_t ≤ 1/√(1-β2) whatever β2 (theory.asymptotic_bound)
    gamma = beta1 * beta1 / beta2 if beta2 > 0 else math.inf
    per_step = beta1 / math.sqrt(beta2) if beta2 > 0 else math.inf
    if beta1 * beta1 >= beta2:
        bounds = ", ".join(f"B_{t} = {worst_case_bound(beta1, beta2, t):.3g}" for t in (10, 100, 1000))
        return Alert(
            rule="beta_coupling",
            severity="error",
            step=step,
            message=(
                f"param group {gi}: betas=({beta1:g}, {beta2:g}) have beta1^2 >= beta2 "
                f"(gamma = beta1^2/beta2 = {gamma:.4g}), so the largest possible update/lr grows "
                f"without limit ({bounds}); once gradients shrink each update can grow by "
                f"beta1/sqrt(beta2) = {per_step:.4g} per step. Raise beta2 above "
                f"beta1^2 = {beta1 * beta1:.4g} (e.g. beta2 >= 0.95 with beta1 = 0.9) or lower beta1."
            ),
            optimizer=optimizer,
            parameter=None,
            value=gamma,
            threshold=1.0,
        )
    if beta1 >= beta2:
        return Alert(
            rule="beta_order",
            severity="info",
            step=step,
            message=(
                f"param group {gi}: betas=({beta1:g}, {beta2:g}) have beta1 >= beta2: momentum "
                f"remembers gradients at least as long as the second moment that scales them. The "
                f"update stays bounded (at most B_inf = {asymptotic_bound(beta1, beta2):.3g} x lr; "
                f"1 at beta1 = beta2), so this is safe when chosen on purpose; with beta2 > beta1 "
                f"(e.g. 0.95 with beta1 = 0.9) a shrinking gradient shrinks the step sooner."
            ),
            optimizer=optimizer,
            parameter=None,
            value=beta1,
            threshold=beta2,
        )
    return None
