"""The configuration rules: what the betas alone say, before any step."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..theory import asymptotic_bound, worst_case_bound
from .records import Alert

__all__ = ["configuration_alerts", "configuration_alerts_by_group", "scheduled_configuration_alerts"]


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
    betas_by_group: Sequence[tuple[float, float] | None],
    *,
    optimizer: str,
    step: int,
    rising: Sequence[bool] | None = None,
) -> list[tuple[int, Alert]]:
    """:func:`configuration_alerts` with the index of the param group each alert is about.

    ``rising``: per group, whether its β2 rose since the last check (a β2 schedule). B_t grows
    without limit for betas that stay coupled; with β2 scheduled, the sum behind the bound is
    ``S_t = S_{t-1}·β1²/β2_t + (1-β1)²/(1-β2_t)``, which stays finite once β2_t rises past β1²
    (PaLM's and Adafactor's ``β2_t = 1 - t^-0.8`` starts at 0). So a coupled pair whose β2 is rising
    is ``beta_order`` (info); where β2 stops rising below β1² (or only β1 moves, as OneCycleLR's
    ``cycle_momentum`` does) it is ``beta_coupling``.
    """
    found = []
    for gi, betas in enumerate(betas_by_group):
        if betas is not None:
            now_rising = bool(rising[gi]) if rising is not None and gi < len(rising) else False
            alert = _group_alert(gi, float(betas[0]), float(betas[1]), optimizer, step, now_rising)
            if alert is not None:
                found.append((gi, alert))
    return found


def scheduled_configuration_alerts(
    betas_by_group: Sequence[tuple[float, float] | None],
    before: Sequence[tuple[float, float] | None],
    *,
    optimizer: str,
    step: int,
    at_step: bool,
) -> tuple[list[tuple[int, Alert]], list[bool]]:
    """:func:`configuration_alerts_by_group` of betas that may be scheduled: ``before`` holds each
    group's betas at the last check. At a step (``at_step``), betas that a change of β2 made coupled
    (β1² ≥ β2) are judged at the next step, when it shows whether a β2 schedule is raising β2
    (HeavyBall's ``palm`` sets β2_1 = 0 inside its first step): a first step's update is ±1
    whatever the betas, and the bound grows only over steps. Returns the alerts by group and, per
    group, whether to judge it again at the next step though its betas did not change."""
    n = len(betas_by_group)
    known = [gi < len(before) and before[gi] is not None for gi in range(n)]
    coupled = [b is not None and b[0] ** 2 >= b[1] for b in betas_by_group]
    was = [k and before[gi][0] ** 2 >= before[gi][1] for gi, k in enumerate(known)]
    rising = [k and b is not None and b[1] > before[gi][1] for gi, (k, b) in enumerate(zip(known, betas_by_group))]
    moved = [k and b is not None and b[1] != before[gi][1] for gi, (k, b) in enumerate(zip(known, betas_by_group))]
    deferred = [at_step and c and not w and m for c, w, m in zip(coupled, was, moved)]
    found = configuration_alerts_by_group(betas_by_group, optimizer=optimizer, step=step, rising=rising)
    found = [(gi, alert) for gi, alert in found if not deferred[gi]]
    return found, [c and (d or r) for c, d, r in zip(coupled, deferred, rising)]


def _scheduled_coupling(gi: int, beta1: float, beta2: float, optimizer: str, step: int) -> Alert:
    return Alert(
        rule="beta_order",
        severity="info",
        step=step,
        message=(
            f"param group {gi}: betas=({beta1:g}, {beta2:g}) at this step have beta1^2 >= beta2 while "
            f"a schedule raises beta2 (it rose since the last step): the update's bound is that of the "
            f"betas' history, which stays finite once beta2 passes beta1^2 = {beta1 * beta1:.4g} (a "
            f"beta2 schedule such as 1 - t^-0.8 starts at 0). If beta2 stops below it, that is the "
            f"error beta_coupling."
        ),
        optimizer=optimizer,
        parameter=None,
        value=beta1,
        threshold=beta2,
    )


def _group_alert(gi: int, beta1: float, beta2: float, optimizer: str, step: int, rising: bool) -> Alert | None:
    if beta1 == 0.0:
        return None  # no momentum: |u_t| = |g_t|/√v̂_t ≤ 1/√(1-β2) whatever β2 (theory.asymptotic_bound)
    gamma = beta1 * beta1 / beta2 if beta2 > 0 else math.inf
    per_step = beta1 / math.sqrt(beta2) if beta2 > 0 else math.inf
    if beta1 * beta1 >= beta2 and rising:
        return _scheduled_coupling(gi, beta1, beta2, optimizer, step)
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
