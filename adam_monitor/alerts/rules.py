"""Alert rules: from the per-step statistics rows of one optimizer to :class:`Alert` records.

Pure torch + numpy + stdlib. :class:`AlertRules` moves each optimizer step's rows (one row of
sums per tensor) to the host in one transfer and keeps its running baselines there as numpy arrays
(a few dozen operations on arrays of one entry per subject: microseconds each, where as many
tiny torch kernels cost tens of microseconds each); :func:`configuration_alerts` checks the
betas. Rules (severity):

* ``beta_coupling`` (error): β1² ≥ β2. With γ = β1²/β2 ≥ 1 the worst-case update bound
  B_t = (1-β1)/√(1-β2) · √(1-β2^t)/(1-β1^t) · √(Σ_{k<t} γ^k) grows without limit.
* ``beta_order`` (warning): β1 ≥ β2 > β1²: momentum outlives the second moment.
* ``nonfinite`` (error): a NaN/Inf in any statistic (it propagates from gradient, state or update).
* ``stale_second_moment`` (warning): the gradient outran the second moment by a factor a, and the
  jump formula predicts the update will overshoot to ``peak`` × its steady size while v̂ catches up.
* ``update_rms_spike`` (warning): update RMS far above its own recent level, or above B_t.
* ``gradient_growth`` (warning): the gradient grew geometrically against v̂ for several steps in a
  row while v̂, not ε, sets the step: the oscillation of Adam's adaptive edge of stability building
  up (once the gradient has vanished, √v̂ decays like β2^{k/2} and the effective step η/(√v̂+ε)
  grows until the preconditioned sharpness crosses (2+2β1)/(1-β1)), once the gradient is at
  least ``growth_floor`` of √v̂; or by a large factor on two steps in a row (an oscillation that
  would spike before the slower test sees it). Within a window after a spike precursor, shorter
  bursts count: such a run keeps spiking.
* ``eps_dominance`` (warning): √v̂ ≤ ε on most coordinates of a tensor for many steps in a row. A
  regime, not a spike precursor: Adam has become SGD with lr η/ε there (fine when meant: ε that
  large is what keeps a converged full-batch run stable; harmful under gradient underflow).

Every rule alerts once per episode: a condition that persists does not alert again until it has
cleared (per rule and tensor; ``nonfinite`` once per optimizer, since a NaN spreads to all
tensors within a step or two). Thresholds and how they were measured: tests/benchmarks/CALIBRATION.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import numpy as np
import torch
from torch import Tensor

from ..diagnostics.rows import COUNT, EPS_COUNT, NUM_STATS, STALENESS_SQ, UPDATE_SQ
from .records import Alert, Thresholds

__all__ = ["AlertRules"]


def _jump_grid(max_k: int = 2000, ratio: float = 1.25) -> list[int]:
    """Steps after a jump at which the predicted update is evaluated (geometric, 1 … max_k)."""
    ks, x = set(), 1.0
    while x <= max_k:
        ks.add(int(round(x)))
        x *= ratio
    return sorted(ks)


def _is_pair(betas) -> bool:
    return len(betas) == 2 and all(isinstance(b, Real) for b in betas)


# Positions in the vector observe() moves to the host.
(
    _NF_NEW,
    _NF_IDX,
    _NF_VAL,
    _ST_NEW,
    _ST_IDX,
    _ST_PEAK,
    _ST_JUMP,
    _ST_STALE,
    _ST_MEMBER,
    _SP_NEW,
    _SP_IDX,
    _SP_VAL,
    _SP_THR,
    _SP_BASE,
    _SP_BOUND,
    _SP_MEMBER,
    _GR_NEW,
    _GR_IDX,
    _GR_RATIO,
    _GR_STALE,
    _GR_MEMBER,
    _GR_STEPS,
    _GR_THR,
    _EPS_NEW,
    _EPS_IDX,
    _EPS_VAL,
    _VEC_LEN,
) = range(27)


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
    ):
        self.names = list(names)
        self.optimizer = optimizer
        self.thresholds = thresholds if thresholds is not None else Thresholds()
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
        distinct = sorted(set(pairs))
        self._pool_betas = distinct
        self._subject_betas = pairs + distinct
        pool_of = [distinct.index(p) for p in pairs]
        ks = np.array(_jump_grid(), dtype=np.float64)
        b = np.array(self._subject_betas, dtype=np.float64).reshape(-1, 2)
        s = n + len(distinct)
        # Constants (numpy, float64, on the host): the rules run on one host copy of the rows.
        self._beta1 = np.ascontiguousarray(b[:, 0])
        self._beta2 = np.ascontiguousarray(b[:, 1])
        self._beta1_k = b[:, :1] ** ks  # [S, K]
        self._beta2_k = b[:, 1:] ** ks
        self._pool_of = np.array(pool_of, dtype=np.int64)
        # Running state (numpy; state_dict() hands it out as CPU tensors).
        self._t: dict[str, np.ndarray] = {
            "nonfinite_active": np.zeros((), dtype=bool),
            "stale_active": np.zeros(s, dtype=bool),
            "spike_active": np.zeros(s, dtype=bool),
            "spike_ema": np.zeros(s, dtype=np.float64),
            "spike_seen": np.zeros(s, dtype=np.float64),
            "growth_prev": np.zeros(s, dtype=np.float64),
            "fast_growth_run": np.zeros(s, dtype=np.float64),
            "growth_run": np.zeros(s, dtype=np.float64),
            "growth_base": np.zeros(s, dtype=np.float64),
            "growth_active": np.zeros(s, dtype=bool),
            "eps_run": np.zeros(n, dtype=np.float64),
            "eps_active": np.zeros(n, dtype=bool),
            "alerted_until": np.zeros((), dtype=np.float64),  # last step of the window after a precursor alert
        }
        self._state_keys = tuple(self._t)
        self.last_step = 0

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Plain CPU tensors and numbers (loadable with ``torch.load(weights_only=True)``)."""
        d = {k: torch.from_numpy(np.array(self._t[k], copy=True)) for k in self._state_keys}
        d["last_step"] = self.last_step
        d["num_tensors"] = len(self.names)
        return d

    def load_state_dict(self, state: dict) -> None:
        if int(state["num_tensors"]) != len(self.names):
            raise ValueError(
                f"AlertRules.load_state_dict: the state is for {int(state['num_tensors'])} tensors, these "
                f"rules watch {len(self.names)}; build the rules with the same parameters as the saved run"
            )
        for k in self._state_keys:
            if k in state:  # states saved before a rule existed start that rule afresh
                value = state[k]
                value = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
                self._t[k] = np.array(value, dtype=self._t[k].dtype, copy=True).reshape(self._t[k].shape)
        self.last_step = int(state["last_step"])

    # ------------------------------------------------------------------ rules
    def observe(self, step: int, rows: Tensor) -> list[Alert]:
        """Check one optimizer step's rows ``(len(names), NUM_STATS)``; returns the new alerts.

        The rows reach the host in one transfer; the rules are a few dozen numpy operations on
        arrays of one entry per subject, far cheaper than as many tiny device kernels.
        """
        if rows.dim() != 2 or rows.shape != (len(self.names), NUM_STATS):
            raise ValueError(
                f"AlertRules.observe: rows must have shape ({len(self.names)}, {NUM_STATS}) (one row per "
                f"named tensor), got {tuple(rows.shape)}; rebuild AlertRules when parameters change"
            )
        step = int(step)
        host = rows.detach().to(torch.float64).cpu().numpy()  # the one host transfer of this step
        with np.errstate(all="ignore"):
            v = self._observe(step, host)
        self.last_step = step
        return self._alerts(step, v)

    def _observe(self, step: int, rows: np.ndarray) -> list[float]:
        th, T = self.thresholds, self._t
        n = rows.shape[0]
        neg_inf = -math.inf

        count = rows[:, COUNT]
        stepped = count > 0
        finite = np.isfinite(rows).all(1)

        # nonfinite: one episode per optimizer.
        bad = ~finite
        any_bad = bool(bad.any())
        nf_new = any_bad and not T["nonfinite_active"]
        T["nonfinite_active"] = np.array(any_bad)
        nf_idx = int(bad.argmax())  # first offending tensor
        nf_row = rows[nf_idx]
        nf_val = nf_row[(~np.isfinite(nf_row)).argmax()]

        # subjects: tensors, then one pool of small tensors per distinct betas.
        small = stepped & (count < th.min_numel)
        masked = np.where(small[:, None], rows, 0.0)
        pools = np.zeros((len(self._pool_betas), NUM_STATS))
        np.add.at(pools, self._pool_of, masked)  # in index order, as torch's index_add_
        subj = np.concatenate([rows, pools])
        s_count = subj[:, COUNT]
        s_stepped = s_count > 0
        judged = np.concatenate([stepped & ~small, s_count[n:] >= th.min_numel])
        safe = np.where(s_stepped, s_count, 1.0)
        update_rms = np.sqrt(subj[:, UPDATE_SQ] / safe)
        stale_sq = subj[:, STALENESS_SQ] / safe

        # stale_second_moment
        peak, jump = self._np_predicted_peak(step, stale_sq)
        st_cond = judged & (peak > th.stale_peak)
        st_new = st_cond & ~T["stale_active"]
        st_keep = T["stale_active"] & (peak > th.stale_clear)
        T["stale_active"] = np.where(s_stepped, st_cond | st_keep, T["stale_active"])
        st_idx = int(np.where(st_new, peak, neg_inf).argmax())
        st_member = self._worst_member(st_idx, small, peak[:n])

        # update_rms_spike: against the running mean, or above the worst-case bound.
        d = th.spike_decay
        seen = T["spike_seen"]
        baseline = T["spike_ema"] / (1 - d ** np.maximum(seen, 1))
        relative = np.maximum(th.spike_ratio * baseline, th.spike_floor)
        relative = np.where(seen >= 1 / (1 - d), relative, math.inf)
        # 1e-4: float32 sums of squares may round an update at the bound (step 1: |u| = 1) just above it.
        bound = th.bound_factor * (1 + 1e-4) * self._np_bound(step)
        sp_thr = np.minimum(relative, bound)
        sp_cond = judged & (update_rms > sp_thr)
        sp_new = sp_cond & ~T["spike_active"]
        T["spike_active"] = np.where(s_stepped, sp_cond, T["spike_active"])
        ok = s_stepped & np.isfinite(update_rms)
        T["spike_ema"] = np.where(ok, d * T["spike_ema"] + (1 - d) * update_rms, T["spike_ema"])
        T["spike_seen"] = np.where(ok, seen + 1, seen)
        sp_idx = int(np.where(sp_new, update_rms / sp_thr, neg_inf).argmax())
        sp_member = self._worst_member(sp_idx, small, update_rms[:n])

        # gradient_growth: staleness grew by growth_ratio or more on growth_steps steps in a row, or
        # by fast_growth_ratio on fast_growth_steps, on subjects whose step v̂ (not ε) sets.
        # Staleness is bounded (≤ √(c2/(1-β2))), defined from step 1, and ≈ gradient_jump while the
        # gradient is small against √v̂.
        s_frac = subj[:, EPS_COUNT] / safe
        prev = T["growth_prev"]
        grew = (stale_sq >= th.growth_ratio**2 * prev) & (prev > 0)
        run = np.where(grew, T["growth_run"] + 1, 0.0)
        base = np.where(grew & (T["growth_run"] == 0), prev, T["growth_base"])
        grew_fast = (stale_sq >= th.fast_growth_ratio**2 * prev) & (prev > 0)
        fast_run = np.where(grew_fast, T["fast_growth_run"] + 1, 0.0)
        growth_steps = th.growth_steps_after_alert if step <= T["alerted_until"] else th.growth_steps
        steady_met = run >= growth_steps
        fast_met = fast_run >= th.fast_growth_steps
        gr_cond = judged & (steady_met | fast_met) & (s_frac < th.eps_fraction) & (stale_sq >= th.growth_floor**2)
        gr_new = gr_cond & ~T["growth_active"]
        gr_keep = T["growth_active"] & (stale_sq > prev)
        ok = s_stepped & np.isfinite(stale_sq)
        T["growth_active"] = np.where(s_stepped, gr_cond | gr_keep, T["growth_active"])
        T["growth_run"] = np.where(ok, run, T["growth_run"])
        T["fast_growth_run"] = np.where(ok, fast_run, T["fast_growth_run"])
        T["growth_base"] = np.where(ok, base, T["growth_base"])
        T["growth_prev"] = np.where(ok, stale_sq, prev)
        gr_ratio = np.sqrt(stale_sq / np.maximum(base, 1e-300)) ** (1 / np.maximum(run, 1))  # per step
        gr_idx = int(np.where(gr_new, gr_ratio, neg_inf).argmax())
        gr_member = self._worst_member(gr_idx, small, gr_ratio[:n])
        gr_steady = bool(steady_met[gr_idx])  # else only the fast condition was met
        gr_steps = growth_steps if gr_steady else th.fast_growth_steps
        gr_thr = th.growth_ratio if gr_steady else th.fast_growth_ratio

        # eps_dominance: per tensor, a run of steps with most coordinates under ε.
        frac = s_frac[:n]
        over = frac > th.eps_fraction
        T["eps_run"] = np.where(stepped, np.where(over, T["eps_run"] + 1, 0.0), T["eps_run"])
        eps_cond = T["eps_run"] >= th.eps_steps
        eps_new = eps_cond & ~T["eps_active"]
        eps_keep = T["eps_active"] & (frac > th.eps_clear)
        T["eps_active"] = np.where(stepped, eps_cond | eps_keep, T["eps_active"])
        eps_idx = int(np.where(eps_new, frac, neg_inf).argmax())

        # The window opens (or is extended) by a new stale or spike alert, or by a step on which the
        # growth met the full growth_steps; not by the alerts of short bursts inside it: were they to
        # extend it, the noise bursts of a healthy minibatch run would keep it open for good once
        # one noise burst had reached growth_steps.
        full_growth = gr_cond & (run >= th.growth_steps)
        if st_new.any() or sp_new.any() or full_growth.any():
            T["alerted_until"] = np.array(float(step + th.after_alert_window))

        vec = [
            nf_new,
            nf_idx,
            nf_val,
            st_new.sum(),
            st_idx,
            peak[st_idx],
            jump[st_idx],
            np.sqrt(stale_sq[st_idx]),
            st_member,
            sp_new.sum(),
            sp_idx,
            update_rms[sp_idx],
            sp_thr[sp_idx],
            baseline[sp_idx],
            bound[sp_idx],
            sp_member,
            gr_new.sum(),
            gr_idx,
            gr_ratio[gr_idx],
            np.sqrt(stale_sq[gr_idx]),
            gr_member,
            gr_steps,
            gr_thr,
            eps_new.sum(),
            eps_idx,
            frac[eps_idx],
        ]
        return [float(x) for x in vec]

    def _np_predicted_peak(self, step: int, stale_sq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if step < 2:
            return np.zeros_like(stale_sq), np.full_like(stale_sq, math.nan)
        b1, b2 = self._beta1, self._beta2
        p1, p2 = b1 ** (step - 1), b2 ** (step - 1)  # β^(t-1)
        c2 = 1 - p2 * b2  # c2(t)
        prev = c2 - (1 - b2)  # β2·c2(t-1)
        room = np.maximum(c2 - (1 - b2) * stale_sq, np.finfo(np.float64).tiny)
        x = np.clip(prev * stale_sq / room, 0.0, 1e12)
        a = np.sqrt(x)[:, None]
        w1 = self._beta1_k * (1 - p1)[:, None] / (1 - p1[:, None] * self._beta1_k)
        w2 = self._beta2_k * (1 - p2)[:, None] / (1 - p2[:, None] * self._beta2_k)
        u = (w1 + (1 - w1) * a) / np.sqrt(w2 + (1 - w2) * a * a)
        return u.max(1), a[:, 0]

    def _predicted_peak(self, step: int, stale_sq: Tensor) -> tuple[Tensor, Tensor]:
        """(peak predicted update, jump factor a) per subject; 0 and NaN at step 1 (no v̂_{t-1})."""
        with np.errstate(all="ignore"):
            peak, jump = self._np_predicted_peak(step, stale_sq.detach().cpu().double().numpy())
        return torch.from_numpy(peak), torch.from_numpy(jump)

    def _np_bound(self, step: int) -> np.ndarray:
        b1, b2 = self._beta1, self._beta2
        gamma = b1 * b1 / b2
        c1, c2 = 1 - b1**step, 1 - b2**step
        geometric = np.where(gamma < 1, (1 - gamma**step) / np.maximum(1 - gamma, 1e-300), math.inf)
        return (1 - b1) / np.sqrt(1 - b2) * np.sqrt(c2) / c1 * np.sqrt(geometric)

    def _bound(self, step: int) -> Tensor:
        """B_t per subject (inf where β1² ≥ β2 makes it grow past any useful size)."""
        with np.errstate(all="ignore"):
            return torch.from_numpy(self._np_bound(step))

    def _worst_member(self, idx: int, small: np.ndarray, score: np.ndarray) -> int:
        """For a pool subject ``idx``: the index of its worst small tensor by ``score`` (else idx)."""
        n = small.shape[0]
        if idx < n:
            return idx
        in_pool = small & (self._pool_of == idx - n)
        return int(np.where(in_pool, score, -math.inf).argmax())

    # ------------------------------------------------------------------ messages
    def _subject(self, idx: int, member: int) -> tuple[str, str]:
        """(parameter name, how the text refers to it)."""
        n = len(self.names)
        if idx < n:
            return self.names[idx], self.names[idx]
        b1, b2 = self._pool_betas[idx - n]
        name = self.names[member]
        return name, (
            f"the tensors under {self.thresholds.min_numel} elements with betas ({b1:g}, {b2:g}), "
            f"pooled (worst: {name})"
        )

    @staticmethod
    def _others(count: float) -> str:
        extra = int(count) - 1
        return f" ({extra} more subject{'s' if extra > 1 else ''} started the same episode)" if extra > 0 else ""

    def _alerts(self, step: int, v: list[float]) -> list[Alert]:
        th = self.thresholds
        out = []

        def add(rule, severity, parameter, message, value, threshold):
            out.append(Alert(rule, severity, step, message, self.optimizer, parameter, float(value), float(threshold)))

        if v[_NF_NEW]:
            name = self.names[int(v[_NF_IDX])]
            add(
                "nonfinite",
                "error",
                name,
                f"{name}: NaN/Inf in its gradient, Adam state or update at step {step} ({v[_NF_VAL]}); the "
                "optimizer state now carries it into every later step. Restore the last good checkpoint, "
                "then lower the learning rate, clip gradients, check the loss and data for NaN/Inf, or "
                "use a GradScaler under fp16.",
                v[_NF_VAL],
                math.inf,
            )
        if v[_ST_NEW]:
            idx = int(v[_ST_IDX])
            name, what = self._subject(idx, int(v[_ST_MEMBER]))
            b1, b2 = self._subject_betas[idx]
            add(
                "stale_second_moment",
                "warning",
                name,
                f"{what}: the gradient outran Adam's second moment about {v[_ST_JUMP]:.3g}x (staleness "
                f"{v[_ST_STALE]:.3g}); with beta2 = {b2:g} v_hat needs ~{1 / (1 - b2):.0f} steps to catch up "
                f"and the update is predicted to overshoot to {v[_ST_PEAK]:.3g}x its steady size (threshold "
                f"{th.stale_peak:g}). A loss spike may follow within a few steps: lower beta2 (e.g. 0.95), "
                "clip the update (StableAdamW / update_clip) or lower the learning rate." + self._others(v[_ST_NEW]),
                v[_ST_PEAK],
                th.stale_peak,
            )
        if v[_SP_NEW]:
            idx = int(v[_SP_IDX])
            name, what = self._subject(idx, int(v[_SP_MEMBER]))
            value, thr, base, bound = v[_SP_VAL], v[_SP_THR], v[_SP_BASE], v[_SP_BOUND]
            if value > bound:
                why = (
                    f"above the worst-case Adam bound B_{step} = {bound / th.bound_factor / (1 + 1e-4):.3g} (x{th.bound_factor:g}): "
                    "this direction is not a bounded Adam update; check the optimizer's betas and update rule"
                )
            else:
                why = (
                    f"{value / base:.3g}x its recent level {base:.3g} (threshold {thr:.3g}); lower the "
                    "learning rate or clip the update (update_clip / StableAdamW) before the loss follows"
                )
            add(
                "update_rms_spike",
                "warning",
                name,
                f"{what}: update RMS {value:.3g} is {why}." + self._others(v[_SP_NEW]),
                value,
                thr,
            )
        if v[_GR_NEW]:
            idx = int(v[_GR_IDX])
            name, what = self._subject(idx, int(v[_GR_MEMBER]))
            b1, _ = self._subject_betas[idx]
            add(
                "gradient_growth",
                "warning",
                name,
                f"{what}: its gradient grew about {v[_GR_RATIO]:.3g}x per step against sqrt(v_hat) for "
                f"{int(v[_GR_STEPS])}+ steps in a row (staleness now {v[_GR_STALE]:.3g}): an oscillation is "
                "building up. Typical of Adam's adaptive edge of stability: after the gradient vanished, "
                "sqrt(v_hat) decayed, the effective step lr/(sqrt(v_hat)+eps) grew and the preconditioned "
                f"sharpness crossed (2+2*beta1)/(1-beta1) = {(2 + 2 * b1) / (1 - b1):.3g}. A loss spike may "
                "follow within a few steps: raise eps (eps >= lr*sharpness/"
                f"{(2 + 2 * b1) / (1 - b1):.3g} caps the effective step), lower the learning rate, or clip "
                "the update (update_clip / StableAdamW)." + self._others(v[_GR_NEW]),
                v[_GR_RATIO],
                v[_GR_THR],
            )
        if v[_EPS_NEW]:
            name = self.names[int(v[_EPS_IDX])]
            add(
                "eps_dominance",
                "warning",
                name,
                f"{name}: eps sets the step of {v[_EPS_VAL]:.0%} of its coordinates (sqrt(v_hat) <= eps) for "
                f"{th.eps_steps} steps in a row, so Adam acts as SGD with lr/eps there. Fine if intended "
                "(a large eps is what keeps a converged full-batch run from Adam's adaptive edge of "
                "stability); if not, the gradients fell below eps: lower eps, scale the loss up, use "
                "Adam-atan2 (no eps), or check for gradient underflow (fp16/bf16)." + self._others(v[_EPS_NEW]),
                v[_EPS_VAL],
                th.eps_fraction,
            )
        return out
