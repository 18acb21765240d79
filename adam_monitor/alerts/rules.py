"""Alert rules: from the per-step statistics rows of one optimizer to :class:`Alert` records.

Pure torch + numpy + stdlib. :class:`AlertRules` moves each optimizer step's rows (one row of
sums per tensor) to the host in one transfer and keeps its running state there as numpy arrays:
the rules are a few dozen operations on arrays of one entry per subject, cheaper on the host than
as many tiny device kernels. Each rule is a function of that step's host arrays, its own state and
the thresholds, returning a named finding or ``None`` (:func:`nonfinite`, :func:`stale_second_moment`,
:func:`update_rms_spike`, :func:`gradient_growth`, :func:`fresh_state`, :func:`step_size_jump`,
:func:`eps_dominance`); the text of the alerts is
in :mod:`adam_monitor.alerts.messages`, the betas' own rules (``beta_coupling``, ``beta_order``) in
:mod:`adam_monitor.alerts.configuration`. Rules (severity):

* ``beta_coupling`` (error): β1² ≥ β2. With γ = β1²/β2 ≥ 1 the worst-case update bound
  B_t = (1-β1)/√(1-β2) · √(1-β2^t)/(1-β1^t) · √(Σ_{k<t} γ^k) grows without limit.
* ``beta_order`` (info): β1 ≥ β2 > β1²: momentum outlives the second moment; bounded (B_∞ is
  finite, 1 at β1 = β2), so a choice to know about, not a danger.
* ``nonfinite`` (error): a NaN/Inf in any statistic (it propagates from gradient, state or update).
* ``stale_second_moment`` (warning): the gradient outran the second moment by a factor a, and the
  jump formula predicts the update will overshoot to ``peak`` × its steady size while v̂ catches up,
  on two steps in a row: the formula assumes the new scale lasts, and one outlier batch (the
  momentum takes 1-β1 of it, v̂ keeps it) makes the next updates smaller, not larger. A jump so
  large that the step just taken already overshoots that much is reported at once.
* ``update_rms_spike`` (warning): update RMS far above its own recent level, or above B_t.
* ``gradient_growth`` (warning): the gradient grew geometrically against v̂ for several steps in a
  row while v̂, not ε, sets the step: the oscillation of Adam's adaptive edge of stability building
  up (once the gradient has vanished, √v̂ decays like β2^{k/2} and the effective step η/(√v̂+ε)
  grows until the preconditioned sharpness crosses (2+2β1)/(1-β1)), once the gradient is at
  least ``growth_floor`` of √v̂; or by a large factor on two steps in a row (an oscillation that
  would spike before the slower test sees it). Within a window after a spike precursor, shorter
  bursts count: such a run keeps spiking.
* ``fresh_state`` (info): a tensor took its first step (a frozen layer unfrozen, a parameter
  that got no gradient until now) while the others had trained for a while, and moved far more
  than they do: a fresh Adam state's first step is sign descent (every coordinate moves by lr),
  where the tensors it joins move by lr × their update RMS (about a quarter of lr on a noisy
  gradient). Whether the loss follows depends on lr against the scale of the weights, which the
  rows do not hold: a regime to know (and the cause of the precursor alerts that follow), not a
  forecast. Its episode's fix is a warmup of that tensor's lr.
* ``step_size_jump`` (info): the parameters of the tensors that have trained for a while moved
  (lr × update RMS) more than twice as far as on any step before: an lr raised at once. Whether
  the loss follows depends on the new lr against the curvature, which the rows do not hold: a
  regime to know and the cause of the precursor alerts that follow, not a forecast. Its
  episode's fix is to raise the lr gradually.
* ``eps_dominance`` (info): √v̂ ≤ ε on most coordinates of a tensor for many steps in a row. A
  regime, not a spike precursor: Adam has become SGD with lr η/ε there (fine when meant: ε that
  large is what keeps a converged full-batch run stable; harmful under gradient underflow).

Every rule alerts once per episode: a condition that persists does not alert again until it has
cleared (per rule and tensor; ``nonfinite`` once per optimizer, since a NaN spreads to all
tensors within a step or two). Thresholds and how they were measured: tests/benchmarks/CALIBRATION.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from numbers import Real
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..diagnostics.rows import COUNT, EPS_COUNT, GRAD_COUNT, NUM_STATS, STALENESS_SQ, UPDATE_SQ
from ..theory import worst_case_bound
from . import messages
from .records import Alert, Thresholds

__all__ = [
    "AlertRules",
    "Subjects",
    "JumpModel",
    "NonfiniteFinding",
    "StaleFinding",
    "SpikeFinding",
    "GrowthFinding",
    "FreshFinding",
    "EpsFinding",
    "subjects",
    "carry_over",
    "jump_model",
    "jump_updates",
    "predicted_peak",
    "subject_bounds",
    "bound_margin",
    "nonfinite",
    "stale_second_moment",
    "update_rms_spike",
    "gradient_growth",
    "fresh_state",
    "eps_dominance",
]

State = dict[str, np.ndarray]


def _jump_grid(max_k: int = 2000, ratio: float = 1.25) -> list[int]:
    """Steps after a jump at which the predicted update is evaluated (geometric, 1 … max_k)."""
    ks, x = set(), 1.0
    while x <= max_k:
        ks.add(int(round(x)))
        x *= ratio
    return sorted(ks)


def _is_pair(betas) -> bool:
    return len(betas) == 2 and all(isinstance(b, Real) for b in betas)


# ---------------------------------------------------------------------------------- one step's subjects


class Subjects(NamedTuple):
    """One step's host quantities per subject: the n tensors, then one pool of small tensors per
    distinct (β1, β2). Arrays of length S = n + pools unless noted."""

    stepped: np.ndarray  # the subject has coordinates in this step (count > 0)
    judged: np.ndarray  # large enough to be judged: a tensor of >= min_numel elements, or a pool of that many
    update_rms: np.ndarray
    stale_sq: np.ndarray  # staleness²
    eps_frac: np.ndarray  # eps_dominance
    small: np.ndarray  # [n] the tensor is judged in its pool
    pool_of: np.ndarray  # [n] the pool (index among the distinct betas) of each tensor


def subjects(rows: np.ndarray, pool_of: np.ndarray, num_pools: int, min_numel: int) -> Subjects:
    """Pool the small tensors' rows per distinct betas and derive the diagnostics the rules judge."""
    count = rows[:, COUNT]
    stepped = count > 0
    small = stepped & (count < min_numel)
    pools = np.zeros((num_pools, NUM_STATS))
    np.add.at(pools, pool_of, np.where(small[:, None], rows, 0.0))  # in index order, as torch's index_add_
    subj = np.concatenate([rows, pools])
    s_count = subj[:, COUNT]
    s_stepped = s_count > 0
    judged = np.concatenate([stepped & ~small, s_count[len(rows) :] >= min_numel])
    safe = np.where(s_stepped, s_count, 1.0)
    return Subjects(
        stepped=s_stepped,
        judged=judged,
        update_rms=np.sqrt(subj[:, UPDATE_SQ] / safe),
        stale_sq=subj[:, STALENESS_SQ] / safe,
        # over the coordinates that got a gradient; 0 where none did (eps_count ≤ grad_count)
        eps_frac=subj[:, EPS_COUNT] / np.maximum(subj[:, GRAD_COUNT], 1.0),
        small=small,
        pool_of=pool_of,
    )


def _worst_member(q: Subjects, subject: int, score: np.ndarray) -> int:
    """For a pool ``subject``: its small tensor with the highest ``score`` (per tensor); else the subject."""
    n = len(q.small)
    if subject < n:
        return subject
    in_pool = q.small & (q.pool_of == subject - n)
    return int(np.where(in_pool, score, -math.inf).argmax())


def _first_worst(new: np.ndarray, score: np.ndarray) -> int:
    """The subject with the highest ``score`` among those that start an episode."""
    return int(np.where(new, score, -math.inf).argmax())


# ---------------------------------------------------------------------------------- theory per subject


class JumpModel(NamedTuple):
    """The betas of the subjects, once per distinct pair (most runs have one), their powers on the
    grid of steps after a jump (``_jump_grid``), and each subject's pair."""

    beta1: np.ndarray  # [P]
    beta2: np.ndarray  # [P]
    beta1_k: np.ndarray  # [P, K]
    beta2_k: np.ndarray  # [P, K]
    pair_of: np.ndarray  # [S]: each subject's row of the above


def jump_model(subject_betas: Sequence[tuple[float, float]]) -> JumpModel:
    ks = np.array(_jump_grid(), dtype=np.float64)
    b = np.array(subject_betas, dtype=np.float64).reshape(-1, 2)
    pairs, pair_of = np.unique(b, axis=0, return_inverse=True)
    pairs = pairs.reshape(-1, 2)
    beta1, beta2 = np.ascontiguousarray(pairs[:, 0]), np.ascontiguousarray(pairs[:, 1])
    return JumpModel(beta1, beta2, pairs[:, :1] ** ks, pairs[:, 1:] ** ks, pair_of.reshape(-1))


def jump_updates(step: int, stale_sq: np.ndarray, model: JumpModel) -> tuple[np.ndarray, np.ndarray]:
    """(update over its steady size k steps after the jump, on the grid of ``_jump_grid`` (k = 1 is
    the step just taken), ``[S, K]``; jump factor a) per subject; 0 and NaN at step 1 and where
    β2 = 0 (no v̂_{t-1}: v̂_t = g_t² makes the staleness 1 whatever the gradients did).

    Inverts the staleness for a (see :class:`AlertRules`) and evaluates the jump formula with bias
    corrections for a gradient that stays at its new scale. What depends on the betas alone is
    computed once per pair of them.
    """
    if step < 2:
        return np.zeros((len(stale_sq), model.beta1_k.shape[1])), np.full_like(stale_sq, math.nan)
    b1, b2 = model.beta1, model.beta2
    p1, p2 = b1 ** (step - 1), b2 ** (step - 1)  # β^(t-1)
    c2 = 1 - p2 * b2  # c2(t)
    prev = c2 - (1 - b2)  # β2·c2(t-1)
    w1 = model.beta1_k * (1 - p1)[:, None] / (1 - p1[:, None] * model.beta1_k)
    w2 = model.beta2_k * (1 - p2)[:, None] / (1 - p2[:, None] * model.beta2_k)
    memoryless = b2 == 0
    if len(b1) > 1:  # per subject
        of = model.pair_of
        b2, c2, prev, w1, w2, memoryless = b2[of], c2[of], prev[of], w1[of], w2[of], memoryless[of]
    room = np.maximum(c2 - (1 - b2) * stale_sq, np.finfo(np.float64).tiny)
    x = np.clip(prev * stale_sq / room, 0.0, 1e12)
    a = np.sqrt(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        u = (w1 + (1 - w1) * a[:, None]) / np.sqrt(w2 + (1 - w2) * (a * a)[:, None])
    memoryless = np.broadcast_to(memoryless, a.shape)
    return np.where(memoryless[:, None], 0.0, u), np.where(memoryless, math.nan, a)


def predicted_peak(step: int, stale_sq: np.ndarray, model: JumpModel) -> tuple[np.ndarray, np.ndarray]:
    """(peak predicted update over its steady size, jump factor a) per subject: the largest of
    :func:`jump_updates` over the steps after the jump."""
    u, a = jump_updates(step, stale_sq, model)
    return u.max(1), a


def _rule_bound(beta1: float, beta2: float, step: int) -> float:
    """B_t as the update_rms_spike rule uses it."""
    if step < 1:
        return math.nan  # steps count from 1: no bound, and a NaN level never fires
    # With β1 > 0 and β1² ≥ β2 B_t grows without limit and beta_coupling already reports the betas
    # as an error; a bound test there would only repeat it on every tensor, so the level is
    # infinite. β1 = 0 is bounded for every β2 (B_t = 1 for sign descent, β2 = 0).
    if beta1 > 0 and beta1 * beta1 >= beta2:
        return math.inf
    return worst_case_bound(beta1, beta2, step)


def bound_margin(state_dtype: torch.dtype) -> float:
    """The relative margin of the B_t test for moments stored in ``state_dtype``: float32 sums of
    squares may round an update at the bound (step 1: |u| = 1) just above it (1e-4); m and v
    stored in a 16-bit float round each write by up to half an ulp, and m̂/√v̂ carries a few of
    those (4 ulp: 3% in bfloat16, 0.4% in float16)."""
    return max(1e-4, 4 * torch.finfo(state_dtype).eps) if state_dtype.is_floating_point else 1e-4


def subject_bounds(step: int, pairs: Sequence[tuple[float, float]], pair_of: np.ndarray) -> np.ndarray:
    """B_t per subject: once per distinct (β1, β2) ``pairs``, spread by each subject's ``pair_of``."""
    return np.array([_rule_bound(b1, b2, step) for b1, b2 in pairs], dtype=np.float64)[pair_of]


# ---------------------------------------------------------------------------------- the rules


class NonfiniteFinding(NamedTuple):
    tensor: int  # the first tensor with a NaN/Inf statistic
    value: float  # its first non-finite statistic


class StaleFinding(NamedTuple):
    subject: int
    member: int  # the worst small tensor of a pool subject, else the subject
    peak: float  # predicted peak update over its steady size
    jump: float  # jump factor a of the gradient against v̂_{t-1}
    staleness: float
    count: int  # subjects starting an episode at this step


class SpikeFinding(NamedTuple):
    subject: int
    member: int
    value: float  # update RMS
    threshold: float  # the lower of the relative level and the bound level
    baseline: float  # the running mean of the update RMS
    bound: float  # bound_factor·(1+1e-4)·B_t, the bound level the update RMS was compared with
    count: int


class GrowthFinding(NamedTuple):
    subject: int
    member: int
    ratio: float  # growth of the gradient against √v̂ per step, over the current run
    staleness: float
    steps: int  # the run length the met condition asks for
    threshold: float  # the growth ratio of the met condition
    count: int


class FreshFinding(NamedTuple):
    tensor: int  # the tensor whose first step moved the most against its peers
    move: float  # its lr × update RMS
    peers: float  # the RMS of lr × update over the coordinates of the tensors trained for a while
    count: int


class StepSizeFinding(NamedTuple):
    tensor: int  # the tensor that moved the most among those whose lr rose
    move: float  # lr × update RMS over the coordinates of the tensors trained for a while
    largest: float  # their largest move on an earlier step
    lr: float  # the named tensor's lr at this step
    lr_before: float  # and at the step before


class EpsFinding(NamedTuple):
    tensor: int
    fraction: float  # of the coordinates with a gradient, those with √v̂ ≤ ε
    count: int
    from_start: bool  # ε-dominated on every step so far: the gradients never rose above ε


def nonfinite(rows: np.ndarray, state: State) -> NonfiniteFinding | None:
    """A NaN/Inf anywhere in the rows; one episode per optimizer (a NaN spreads to all tensors)."""
    bad = ~np.isfinite(rows).all(1)
    any_bad = bool(bad.any())
    new = any_bad and not state["nonfinite_active"]
    state["nonfinite_active"] = np.array(any_bad)
    if not new:
        return None
    tensor = int(bad.argmax())
    row = rows[tensor]
    return NonfiniteFinding(tensor, float(row[(~np.isfinite(row)).argmax()]))


def stale_second_moment(step: int, q: Subjects, model: JumpModel, state: State, th: Thresholds) -> StaleFinding | None:
    """The jump formula predicts an update overshoot above ``stale_peak`` on this step and the one
    before (the jump has lasted), or on the step just taken; the episode lasts while the
    prediction stays above ``stale_clear``."""
    u, jump = jump_updates(step, q.stale_sq, model)
    peak = u.max(1)
    active, before = state["stale_active"], state["stale_before"]
    over = q.judged & (peak > th.stale_peak)
    # A jump so large that the step just taken (k = 1) already overshoots needs no second step.
    cond = over & (before | (u[:, 0] > th.stale_peak))
    new = cond & ~active
    state["stale_active"] = np.where(q.stepped, cond | (active & (peak > th.stale_clear)), active)
    state["stale_before"] = np.where(q.stepped, over, before)
    if not new.any():
        return None
    s = _first_worst(new, peak)
    return StaleFinding(
        subject=s,
        member=_worst_member(q, s, peak[: len(q.small)]),
        peak=float(peak[s]),
        jump=float(jump[s]),
        staleness=float(np.sqrt(q.stale_sq[s])),
        count=int(new.sum()),
    )


def update_rms_spike(
    q: Subjects, bound_t: np.ndarray, state: State, th: Thresholds, margin: np.ndarray | float = 1e-4
) -> SpikeFinding | None:
    """Update RMS above ``spike_ratio`` x its running mean (and ``spike_floor``), once that mean has
    seen 1/(1-spike_decay) steps, or above ``bound_factor`` x B_t (``bound_t``, per subject) by more
    than the rounding ``margin`` (per subject, :func:`bound_margin`)."""
    d = th.spike_decay
    ema, seen, active = state["spike_ema"], state["spike_seen"], state["spike_active"]
    baseline = ema / (1 - d ** np.maximum(seen, 1))
    relative = np.maximum(th.spike_ratio * baseline, th.spike_floor)
    relative = np.where(seen >= 1 / (1 - d), relative, math.inf)
    bound = th.bound_factor * (1 + margin) * bound_t
    level = np.minimum(relative, bound)
    cond = q.judged & (q.update_rms > level)
    new = cond & ~active
    state["spike_active"] = np.where(q.stepped, cond, active)
    ok = q.stepped & np.isfinite(q.update_rms)
    state["spike_ema"] = np.where(ok, d * ema + (1 - d) * q.update_rms, ema)
    state["spike_seen"] = np.where(ok, seen + 1, seen)
    if not new.any():
        return None
    s = _first_worst(new, q.update_rms / level)
    return SpikeFinding(
        subject=s,
        member=_worst_member(q, s, q.update_rms[: len(q.small)]),
        value=float(q.update_rms[s]),
        threshold=float(level[s]),
        baseline=float(baseline[s]),
        bound=float(bound[s]),
        count=int(new.sum()),
    )


def gradient_growth(q: Subjects, in_window: bool, state: State, th: Thresholds) -> tuple[GrowthFinding | None, bool]:
    """Staleness grew by ``growth_ratio`` or more on ``growth_steps`` steps in a row (fewer within the
    window after a precursor alert: ``in_window``), or by ``fast_growth_ratio`` on
    ``fast_growth_steps``, on subjects whose step v̂ (not ε) sets, once it reached ``growth_floor``.

    Staleness is bounded (≤ √(c2/(1-β2))), defined from step 1, and ≈ gradient_jump while the
    gradient is small against √v̂. Returns the finding and whether any subject met the condition
    with the full ``growth_steps`` (which opens or extends the window, alert or not).
    """
    stale_sq, prev, run_before = q.stale_sq, state["growth_prev"], state["growth_run"]
    grew = (stale_sq >= th.growth_ratio**2 * prev) & (prev > 0)
    run = np.where(grew, run_before + 1, 0.0)
    base = np.where(grew & (run_before == 0), prev, state["growth_base"])
    grew_fast = (stale_sq >= th.fast_growth_ratio**2 * prev) & (prev > 0)
    fast_run = np.where(grew_fast, state["fast_growth_run"] + 1, 0.0)
    growth_steps = th.growth_steps_after_alert if in_window else th.growth_steps
    steady_met = run >= growth_steps
    fast_met = fast_run >= th.fast_growth_steps
    cond = q.judged & (steady_met | fast_met) & (q.eps_frac < th.eps_fraction) & (stale_sq >= th.growth_floor**2)
    active = state["growth_active"]
    new = cond & ~active
    ok = q.stepped & np.isfinite(stale_sq)
    state["growth_active"] = np.where(q.stepped, cond | (active & (stale_sq > prev)), active)
    state["growth_run"] = np.where(ok, run, run_before)
    state["fast_growth_run"] = np.where(ok, fast_run, state["fast_growth_run"])
    state["growth_base"] = np.where(ok, base, state["growth_base"])
    state["growth_prev"] = np.where(ok, stale_sq, prev)
    full = bool((cond & (run >= th.growth_steps)).any())
    if not new.any():
        return None, full
    ratio = np.sqrt(stale_sq / np.maximum(base, 1e-300)) ** (1 / np.maximum(run, 1))  # per step
    s = _first_worst(new, ratio)
    steady = bool(steady_met[s])  # else only the fast condition was met
    finding = GrowthFinding(
        subject=s,
        member=_worst_member(q, s, ratio[: len(q.small)]),
        ratio=float(ratio[s]),
        staleness=float(np.sqrt(stale_sq[s])),
        steps=growth_steps if steady else th.fast_growth_steps,
        threshold=float(th.growth_ratio if steady else th.fast_growth_ratio),
        count=int(new.sum()),
    )
    return finding, full


def fresh_state(rows: np.ndarray, lrs: np.ndarray, state: State, th: Thresholds) -> FreshFinding | None:
    """Per tensor (never pooled: a first step is sign-sized on any tensor, however small): its first
    step moved its coordinates by lr × update RMS more than ``fresh_ratio`` × the RMS move of the
    coordinates of the tensors that have stepped 1/(1-``spike_decay``) times (the baseline of
    ``update_rms_spike``). ``lrs`` holds each tensor's lr (NaN where unknown: not judged). At the
    start of a run no tensor has trained yet, and nothing is judged: a run's own warmup is not
    this rule's business."""
    count = rows[:, COUNT]
    stepped = count > 0
    seen = state["fresh_seen"]
    state["fresh_seen"] = np.where(stepped, seen + 1, seen)
    first = stepped & (seen == 0)
    warm = stepped & (seen >= 1 / (1 - th.spike_decay))
    if not first.any() or not warm.any():
        return None
    move_sq = lrs * lrs * rows[:, UPDATE_SQ]  # Σ over each tensor's coordinates of (lr·u)²
    ok = warm & np.isfinite(move_sq)
    peers = math.sqrt(move_sq[ok].sum() / count[ok].sum()) if ok.any() else math.nan
    move = np.sqrt(move_sq / np.where(stepped, count, 1.0))
    new = first & (move > th.fresh_ratio * peers)
    if not new.any():
        return None
    t = _first_worst(new, move_sq)  # the tensor that moved the most in all (its first step's are all ≈ lr)
    return FreshFinding(tensor=t, move=float(move[t]), peers=peers, count=int(new.sum()))


def step_size_jump(rows: np.ndarray, lrs: np.ndarray, seen: np.ndarray, state: State, th: Thresholds):
    """The RMS move lr × u over the coordinates of the tensors that have stepped 1/(1-spike_decay)
    times (``seen``: their steps before this one, ``fresh_state``'s count) above ``step_size_ratio`` ×
    its largest on an earlier step, once that largest has seen as many steps, where the lrs alone
    made it ``step_size_ratio`` × what it would have been at the lrs of the step before (an update
    that grows by itself is ``update_rms_spike``'s). Names the tensor that moved the most among
    those whose lr rose that much. NaN lrs are left out."""
    count, update_sq = rows[:, COUNT], rows[:, UPDATE_SQ]
    lr_before = state["jump_lr"]
    stepped = count > 0
    state["jump_lr"] = np.where(stepped, lrs, lr_before)
    move_sq = lrs * lrs * update_sq  # Σ over each tensor's coordinates of (lr·u)²
    warm = stepped & (seen >= 1 / (1 - th.spike_decay)) & np.isfinite(move_sq)
    if not warm.any():
        return None
    move = math.sqrt(move_sq[warm].sum() / count[warm].sum())
    largest, judged = float(state["jump_largest"]), float(state["jump_steps"])
    state["jump_largest"] = np.array(max(largest, move))
    state["jump_steps"] = np.array(judged + 1)
    if judged < 1 / (1 - th.spike_decay) or not move > th.step_size_ratio * largest:
        return None
    before_sq = lr_before * lr_before * update_sq
    known = warm & np.isfinite(before_sq)
    # numpy scalars: a move from an lr of 0 is an infinite factor, not an error
    if not (known.any() and np.sqrt(move_sq[known].sum() / before_sq[known].sum()) > th.step_size_ratio):
        return None
    rose = known & (lrs > th.step_size_ratio * lr_before)
    t = _first_worst(rose if rose.any() else known, move_sq)
    return StepSizeFinding(tensor=t, move=move, largest=largest, lr=float(lrs[t]), lr_before=float(lr_before[t]))


def eps_dominance(step: int, q: Subjects, state: State, th: Thresholds) -> EpsFinding | None:
    """Per tensor (never pooled): more than ``eps_fraction`` of the coordinates that got a gradient
    under ε for ``eps_steps`` steps in a row; the episode lasts while the fraction stays above
    ``eps_clear``."""
    n = len(q.small)
    frac, stepped = q.eps_frac[:n], q.stepped[:n]
    run = state["eps_run"]
    state["eps_run"] = run = np.where(stepped, np.where(frac > th.eps_fraction, run + 1, 0.0), run)
    active = state["eps_active"]
    cond = run >= th.eps_steps
    new = cond & ~active
    state["eps_active"] = np.where(stepped, cond | (active & (frac > th.eps_clear)), active)
    if not new.any():
        return None
    t = _first_worst(new, frac)
    return EpsFinding(tensor=t, fraction=float(frac[t]), count=int(new.sum()), from_start=bool(run[t] >= step))


# ---------------------------------------------------------------------------------- the rules of one optimizer


def _initial_state(n: int, s: int) -> dict[str, State]:
    """Each rule's running state (numpy; ``state_dict`` hands it out flat, as CPU tensors)."""
    return {
        "nonfinite": {"nonfinite_active": np.zeros((), dtype=bool)},
        "stale": {"stale_active": np.zeros(s, dtype=bool), "stale_before": np.zeros(s, dtype=bool)},
        "spike": {
            "spike_active": np.zeros(s, dtype=bool),
            "spike_ema": np.zeros(s, dtype=np.float64),
            "spike_seen": np.zeros(s, dtype=np.float64),
        },
        "growth": {
            "growth_prev": np.zeros(s, dtype=np.float64),
            "fast_growth_run": np.zeros(s, dtype=np.float64),
            "growth_run": np.zeros(s, dtype=np.float64),
            "growth_base": np.zeros(s, dtype=np.float64),
            "growth_active": np.zeros(s, dtype=bool),
        },
        "eps": {"eps_run": np.zeros(n, dtype=np.float64), "eps_active": np.zeros(n, dtype=bool)},
        # per tensor: the steps on which it had coordinates, since the rules started
        "fresh": {"fresh_seen": np.zeros(n, dtype=np.float64)},
        # the largest RMS move of the tensors trained for a while, the steps it has seen, and each
        # tensor's lr at the step it last stepped
        "jump": {"jump_largest": np.zeros(()), "jump_steps": np.zeros(()), "jump_lr": np.full(n, math.nan)},
        # the last step of the window after a precursor alert
        "window": {"alerted_until": np.zeros((), dtype=np.float64)},
        # the episode the precursor alerts of one event share: its cause (an EPISODE_RULES index, -1:
        # none yet), the tensor it started on, its first step, and the step after which it has ended
        "episode": {
            "episode_cause": np.array(-1.0),
            "episode_tensor": np.zeros(()),
            "episode_step": np.zeros(()),
            "episode_until": np.zeros(()),
        },
    }


#: The precursor rules whose alerts one event raises together, as one episode (new rules go last:
#: a saved episode names its cause by its index here).
EPISODE_RULES = ("stale_second_moment", "update_rms_spike", "gradient_growth", "fresh_state", "step_size_jump")


def join_episode(step: int, alerts: list[Alert], names: Sequence[str], state: State, window: int) -> list[Alert]:
    """One event, one diagnosis: the precursor alerts within ``window`` steps of one another form an
    episode; the first (in the order stale, spike, growth within a step: a scale jump meeting a
    long-memory v̂ explains the growth it sets off, not the reverse) is its cause and keeps its
    message; the alerts of the other rules that follow are evidence and give the cause's fix."""
    precursors = [i for i, a in enumerate(alerts) if a.rule in EPISODE_RULES]
    if not precursors:
        return alerts
    if step > state["episode_until"] or state["episode_cause"] < 0:
        first = alerts[precursors.pop(0)]
        state["episode_cause"] = np.array(float(EPISODE_RULES.index(first.rule)))
        state["episode_tensor"] = np.array(float(names.index(first.parameter)))
        state["episode_step"] = np.array(float(step))
    else:
        _confirm_stale_cause(step, alerts, precursors, names, state)
    state["episode_until"] = np.array(float(step + window))
    cause = EPISODE_RULES[int(state["episode_cause"])]
    where, since = names[int(state["episode_tensor"])], int(state["episode_step"])
    out = list(alerts)
    for i in precursors:
        a = alerts[i]
        if a.rule != cause:
            text = messages.evidence_message(a.rule, a.parameter, a.value, a.threshold, cause, where, since)
            out[i] = dataclasses.replace(a, message=text)
    return out


def _confirm_stale_cause(step: int, alerts: list[Alert], precursors: list[int], names, state: State) -> None:
    """A scale jump shows in the update at once but is told apart from a one-batch outlier by
    ``stale_second_moment`` one step later: its alert there makes the stale second moment the cause
    of the episode the update spike opened (and keeps its own message and fix)."""
    if EPISODE_RULES[int(state["episode_cause"])] != "update_rms_spike" or step > state["episode_step"] + 1:
        return
    for i in precursors:
        if alerts[i].rule == "stale_second_moment":
            precursors.remove(i)
            state["episode_cause"] = np.array(float(EPISODE_RULES.index("stale_second_moment")))
            state["episode_tensor"] = np.array(float(names.index(alerts[i].parameter)))
            return


def carry_over(old: AlertRules, new: AlertRules) -> None:
    """Give ``new``, rules rebuilt for a changed set of tensors (a param group added, a parameter
    added or dropped), the state of ``old`` that still applies: each tensor's running state goes
    with its name; the pools of small tensors, whose members changed, start afresh; the state of
    the whole optimizer (the window after an alert, an open NaN episode) carries over, and an
    open episode stays open where the tensor it started on is still watched."""
    index = {name: i for i, name in enumerate(old.names)}
    src = np.array([index.get(name, -1) for name in new.names], dtype=np.int64)
    kept, n_old, n_new = src >= 0, len(old.names), len(new.names)
    for rule, state in new._state.items():
        for key, value in state.items():
            before = old._state[rule].get(key)
            if before is None:
                continue
            if value.ndim == 0:
                state[key] = before.copy()
            elif len(before) in (n_old, n_old + len(old._pool_betas)):  # per tensor, or per subject
                value[:n_new][kept] = before[src[kept]]
    episode = new._state["episode"]
    moved = np.flatnonzero(src == int(episode["episode_tensor"]))  # where the episode's tensor is now
    if moved.size:
        episode["episode_tensor"] = np.array(float(moved[0]))
    else:
        episode["episode_cause"] = np.array(-1.0)  # its tensor is gone: the next alert opens a new episode
    new.last_step = old.last_step


class AlertRules:
    """The step rules for one optimizer.

    Call :meth:`observe` once per applied optimizer step with that step's statistics rows
    (``StepReader.read()``). Subjects are the tensors with at least ``min_numel`` elements and,
    per distinct (β1, β2), the pool of the smaller tensors.

    ``stale_second_moment``: with bias corrections c_i(t) = 1-β_i^t, the staleness row gives
    S = mean(g_t²/v̂_t); per coordinate g_t²/v̂_t = x·c2(t)/(β2·c2(t-1) + (1-β2)·x) with
    x = g_t²/v̂_{t-1}, so the jump factor is a = √x, x = β2·c2(t-1)·S / (c2(t) - (1-β2)·S).
    Inverting the mean of this bounded function (each coordinate adds at most c2(t)/(1-β2)) is
    robust to a few dead coordinates whose v̂_{t-1} ≈ 0, unlike the unbounded mean of x. If the
    step-(t-1) state held m̂ = G, v̂ = G² and the gradient stays aG, then k steps later

        u_k = (w1 + (1-w1)·a) / √(w2 + (1-w2)·a²),   w_i = β_i^k · c_i(t-1) / c_i(t-1+k),

    (the steady-state jump formula (a + (1-a)β1^k)/√(a² + (1-a²)β2^k) with bias corrections).
    The rule compares its peak over k with ``stale_peak``: it weighs a by how long v̂ stays stale
    (β2) and how soon (t) — a ×10 jump peaks at 5.2 for (0.9, 0.999) and at 1.1 for (0.9, 0.95).
    """

    def __init__(
        self,
        names: Sequence[str],
        *,
        optimizer: str,
        betas: Sequence[tuple[float, float]] | tuple[float, float],
        thresholds: Thresholds | None = None,
        state_dtypes: Sequence[torch.dtype] | None = None,
    ):
        self.names = list(names)
        self.optimizer = optimizer
        self.thresholds = thresholds if thresholds is not None else Thresholds()
        if state_dtypes is not None and len(state_dtypes) != len(self.names):
            raise ValueError(
                f"AlertRules: got {len(state_dtypes)} state dtypes for {len(self.names)} tensor names; pass "
                "one per tensor (the dtype of its exp_avg) or None"
            )
        self._tensor_margins = np.array(
            [bound_margin(d) for d in state_dtypes] if state_dtypes is not None else [1e-4] * len(self.names)
        )
        pairs = self._pairs(betas)
        self._set_layout(pairs)
        self._state = _initial_state(len(pairs), len(self._subject_betas))
        self.last_step = 0

    def _pairs(self, betas) -> list[tuple[float, float]]:
        n = len(self.names)
        if _is_pair(betas):
            pairs = [(float(betas[0]), float(betas[1]))] * n
        else:
            pairs = [(float(b1), float(b2)) for b1, b2 in betas]
            if len(pairs) != n:
                raise ValueError(
                    f"AlertRules: got {len(pairs)} (beta1, beta2) pairs for {n} tensor names; pass one "
                    "pair per tensor (in the optimizer's parameter order) or a single pair"
                )
        for name, (b1, b2) in zip(self.names, pairs):
            if not (0 <= b1 < 1 and 0 <= b2 < 1):
                raise ValueError(f"AlertRules: betas of {name!r} must lie in [0, 1), got ({b1}, {b2})")
        return pairs

    def _set_layout(self, pairs: list[tuple[float, float]]) -> None:
        distinct = sorted(set(pairs))
        self._pool_betas = distinct  # pool j holds the small tensors of distinct[j]
        self._subject_betas = pairs + distinct
        self._pool_of = np.array([distinct.index(p) for p in pairs], dtype=np.int64)
        self._pair_of = np.concatenate([self._pool_of, np.arange(len(distinct), dtype=np.int64)])  # per subject
        self._jump = jump_model(self._subject_betas)
        pools = np.full(len(distinct), 1e-4)
        np.maximum.at(pools, self._pool_of, self._tensor_margins)  # a pool's margin: its widest member's
        self._margins = np.concatenate([self._tensor_margins, pools])

    def set_betas(self, betas: Sequence[tuple[float, float]] | tuple[float, float]) -> None:
        """New betas for the next steps (a β schedule: OneCycleLR's ``cycle_momentum``, a β2
        schedule), keeping every rule's state: the running baselines, the growth runs and the open
        episodes are the tensors', not the betas'. A pool of small tensors keeps its state while
        its members still share their betas; a pool whose members part or join another starts afresh.
        """
        pairs = self._pairs(betas)
        if pairs == self._subject_betas[: len(pairs)]:
            return
        n, old_pool_of, old_pools = len(pairs), self._pool_of, len(self._pool_betas)
        self._set_layout(pairs)
        # The old pool that each new pool continues: the one all its members were in, if no other
        # tensor was (the same partition of the tensors, whatever the betas' values).
        source = np.full(len(self._pool_betas), -1, dtype=np.int64)
        for j in range(len(self._pool_betas)):
            members = self._pool_of == j
            before = np.unique(old_pool_of[members])
            if len(before) == 1 and np.array_equal(old_pool_of == before[0], members):
                source[j] = before[0]
        fresh = _initial_state(n, n + len(self._pool_betas))
        for rule, state in self._state.items():
            for key, value in state.items():
                if value.ndim == 1 and len(value) == n + old_pools:  # per subject: tensors, then pools
                    new = fresh[rule][key]
                    new[:n] = value[:n]
                    kept = source >= 0
                    new[n:][kept] = value[n + source[kept]]
                    state[key] = new

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Plain CPU tensors and numbers (loadable with ``torch.load(weights_only=True)``)."""
        d = {k: torch.from_numpy(np.array(v, copy=True)) for rule in self._state.values() for k, v in rule.items()}
        d["last_step"] = self.last_step
        d["num_tensors"] = len(self.names)
        return d

    def load_state_dict(self, state: dict) -> None:
        if int(state["num_tensors"]) != len(self.names):
            raise ValueError(
                f"AlertRules.load_state_dict: the state is for {int(state['num_tensors'])} tensors, these "
                f"rules watch {len(self.names)}; build the rules with the same parameters as the saved run"
            )
        loaded = {}  # every entry converted before any is replaced: a bad state changes nothing
        for rule in self._state.values():
            for k, current in rule.items():
                if k in state:  # states saved before a rule existed start that rule afresh
                    value = state[k]
                    value = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
                    try:
                        loaded[k] = np.array(value, dtype=current.dtype, copy=True).reshape(current.shape)
                    except (TypeError, ValueError) as err:
                        raise ValueError(
                            f"AlertRules.load_state_dict: entry {k!r} does not fit these rules: {err}"
                        ) from None
        last_step = int(state["last_step"])
        for rule in self._state.values():
            rule.update((k, v) for k, v in loaded.items() if k in rule)
        self.last_step = last_step

    # ------------------------------------------------------------------ rules
    def observe(self, step: int, rows: Tensor, lrs: Sequence[float] | np.ndarray | None = None) -> list[Alert]:
        """Check one optimizer step's rows ``(len(names), NUM_STATS)``; returns the new alerts.

        ``lrs``: the lr each tensor stepped with (NaN where unknown); ``None`` means one lr for all,
        as in an optimizer with a single param group. Only ``fresh_state`` and ``step_size_jump`` read it.

        The rows reach the host in one transfer; the rules are a few dozen numpy operations on
        arrays of one entry per subject, far cheaper than as many tiny device kernels.
        """
        if rows.dim() != 2 or rows.shape != (len(self.names), NUM_STATS):
            raise ValueError(
                f"AlertRules.observe: rows must have shape ({len(self.names)}, {NUM_STATS}) (one row per "
                f"named tensor), got {tuple(rows.shape)}; rebuild AlertRules when parameters change"
            )
        lrs = np.ones(len(self.names)) if lrs is None else np.asarray(lrs, dtype=np.float64)
        if lrs.shape != (len(self.names),):
            raise ValueError(
                f"AlertRules.observe: lrs must hold one lr per named tensor ({len(self.names)}), got shape {lrs.shape}"
            )
        step = int(step)
        host = rows.detach().to(torch.float64).cpu().numpy()  # the one host transfer of this step
        th, st = self.thresholds, self._state
        with np.errstate(all="ignore"):
            q = subjects(host, self._pool_of, len(self._pool_betas), th.min_numel)
            window = st["window"]
            bad = nonfinite(host, st["nonfinite"])
            stale = stale_second_moment(step, q, self._jump, st["stale"], th)
            bound_t = subject_bounds(step, self._pool_betas, self._pair_of)
            spike = update_rms_spike(q, bound_t, st["spike"], th, self._margins)
            growth, full_growth = gradient_growth(q, step <= window["alerted_until"], st["growth"], th)
            eps = eps_dominance(step, q, st["eps"], th)
            jump = step_size_jump(
                host, lrs, st["fresh"]["fresh_seen"], st["jump"], th
            )  # before fresh_state counts this step
            fresh = fresh_state(host, lrs, st["fresh"], th)
        # The window opens (or is extended) by a new stale or spike alert, or by a step on which the
        # growth met the full growth_steps; not by the alerts of short bursts inside it: were they to
        # extend it, the noise bursts of a healthy minibatch run would keep it open for good once
        # one noise burst had reached growth_steps.
        if stale is not None or spike is not None or full_growth:
            window["alerted_until"] = np.array(float(step + th.after_alert_window))
        self.last_step = step
        return self._alerts(step, bad, jump, fresh, stale, spike, growth, eps)

    def _alerts(
        self,
        step: int,
        bad: NonfiniteFinding | None,
        jump: StepSizeFinding | None,
        fresh: FreshFinding | None,
        stale: StaleFinding | None,
        spike: SpikeFinding | None,
        growth: GrowthFinding | None,
        eps: EpsFinding | None,
    ) -> list[Alert]:
        th, names, betas = self.thresholds, self.names, self._subject_betas
        out = []

        def add(rule, severity, subject, member, message, value, threshold):
            parameter = names[subject] if subject < len(names) else names[member]
            out.append(Alert(rule, severity, step, message, self.optimizer, parameter, float(value), float(threshold)))

        if bad is not None:
            text = messages.nonfinite_message(bad, step, names)
            add("nonfinite", "error", bad.tensor, bad.tensor, text, bad.value, math.inf)
        if jump is not None:  # first: a step size never taken before explains what the others then see
            text = messages.step_size_message(jump, step, names, th)
            add("step_size_jump", "info", jump.tensor, jump.tensor, text, jump.move / jump.largest, th.step_size_ratio)
        if fresh is not None:  # so does a fresh state's sign-sized step
            text = messages.fresh_message(fresh, step, names, th)
            add("fresh_state", "info", fresh.tensor, fresh.tensor, text, fresh.move / fresh.peers, th.fresh_ratio)
        if stale is not None:
            text = messages.stale_message(stale, names, betas, th)
            add("stale_second_moment", "warning", stale.subject, stale.member, text, stale.peak, th.stale_peak)
        if spike is not None:
            text = messages.spike_message(spike, step, names, betas, th)
            add("update_rms_spike", "warning", spike.subject, spike.member, text, spike.value, spike.threshold)
        if growth is not None:
            text = messages.growth_message(growth, names, betas, th)
            add("gradient_growth", "warning", growth.subject, growth.member, text, growth.ratio, growth.threshold)
        if eps is not None:
            text = messages.eps_message(eps, names, th)
            add("eps_dominance", "info", eps.tensor, eps.tensor, text, eps.fraction, th.eps_fraction)
        return join_episode(step, out, names, self._state["episode"], th.after_alert_window)
