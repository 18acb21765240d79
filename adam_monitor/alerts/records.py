"""What an alert is: the :class:`Alert` record, its severities, the rules' :class:`Thresholds`, and
the warning and error a run sees."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from numbers import Integral, Real

__all__ = ["Alert", "SEVERITY_ORDER", "GATING_SEVERITIES", "Thresholds", "InstabilityError", "InstabilityWarning"]

#: ``error``: the run is broken or must be (NaN/Inf, β1² ≥ β2). ``warning``: a precursor, a loss
#: spike predicted within the next steps. ``info``: a regime worth knowing that is not a danger (ε
#: sets the step of a tensor; β1 ≥ β2 chosen on purpose). Recorded alike; only warning and error
#: can fail a run or a CI gate.
SEVERITY_ORDER = {"info": 0, "warning": 1, "error": 2}
#: The severities ``fail_on`` and ``adam-monitor check --fail-on`` accept.
GATING_SEVERITIES = ("warning", "error")


def _json_float(x: float) -> float | str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return float(x)


@dataclass(frozen=True)
class Alert:
    """One alert. ``step`` is the 1-based optimizer step; ``parameter`` is ``None`` for the optimizer."""

    rule: str
    severity: str
    step: int
    message: str
    optimizer: str
    parameter: str | None
    value: float
    threshold: float

    def __post_init__(self):
        if self.severity not in SEVERITY_ORDER:
            raise ValueError(f"Alert.severity must be one of {sorted(SEVERITY_ORDER)}, got {self.severity!r}")

    def to_dict(self) -> dict:
        """JSON-safe dict: non-finite ``value``/``threshold`` become the strings "nan", "inf", "-inf"."""
        d = asdict(self)
        d["value"] = _json_float(self.value)
        d["threshold"] = _json_float(self.threshold)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Alert:
        kwargs = {f.name: d[f.name] for f in fields(cls)}
        kwargs["step"] = int(kwargs["step"])
        kwargs["value"] = float(kwargs["value"])  # float("nan"), float("inf") parse the strings
        kwargs["threshold"] = float(kwargs["threshold"])
        return cls(**kwargs)


@dataclass
class Thresholds:
    """Rule thresholds. Defaults come from tests/benchmarks/CALIBRATION.md (measured there).

    Attributes:
        stale_peak: ``stale_second_moment`` fires when the update predicted by the jump formula
            peaks above this multiple of its steady size, on two steps in a row. Unreachable when B_∞ < stale_peak
            (β2 = 0.95 with β1 = 0.9: B_∞ = 1.165): there a stale v̂ cannot inflate updates.
        stale_clear: the episode ends once the predicted peak falls below this.
        spike_ratio: ``update_rms_spike`` fires when update RMS exceeds this multiple of its own
            running mean (EMA with ``spike_decay``) ...
        spike_floor: ... and this absolute level (1 is the RMS of a steady signal; noise gives 0.23).
        spike_decay: decay of the update-RMS baseline EMA (timescale 1/(1-decay) steps); the
            relative test starts after that many observed steps.
        bound_factor: ``update_rms_spike`` also fires when update RMS > bound_factor · B_t (torch
            Adam cannot exceed B_t; use ``math.inf`` for directions not bounded by B_t, e.g. LaProp).
        growth_ratio: ``gradient_growth`` fires when staleness (the gradient over √v̂) grew by at
            least this factor on each of ``growth_steps`` consecutive steps ...
        growth_steps: ... (the geometric growth of an unstable oscillation, not one jump), on a
            subject where fewer than ``eps_fraction`` of the coordinates are ε-dominated (where ε
            sets the step, the effective lr η/ε is fixed and such bursts self-stabilise). The
            episode ends when staleness stops growing.
        eps_fraction: ``eps_dominance`` counts a step when more than this fraction of a tensor's
            coordinates have √v̂ ≤ ε ...
        eps_steps: ... and fires after this many such steps in a row.
        eps_clear: the episode ends once the fraction falls to this or below.
        min_numel: tensors with fewer elements are judged pooled with the other small tensors of
            the same betas (a mean over a handful of coordinates is too noisy to judge alone).
        growth_steps_after_alert: for ``after_alert_window`` steps after a new
            ``stale_second_moment`` or ``update_rms_spike`` alert of the same optimizer, or after a
            step on which a subject's growth met the full ``gradient_growth`` condition
            (``growth_steps``), ``gradient_growth`` fires after this many steps of growth: a run
            that has shown instability spikes again after shorter bursts (at Adam's adaptive edge
            of stability the loss spikes every 3–50 steps). The alerts of these short bursts do not
            extend the window: otherwise one noise burst of a healthy minibatch run reaching
            ``growth_steps`` would keep it open for good.
        after_alert_window: see ``growth_steps_after_alert``; also the steps after its last precursor
            alert for which an episode lasts: a precursor alert of another rule within them is
            evidence of that episode and gives its fix.
        growth_floor: ``gradient_growth`` fires only once the staleness has reached this level (the
            gradient at least this fraction of √v̂): below it the growing gradient does not yet move
            the update, which the momentum and v̂ of earlier steps set.
        fast_growth_ratio: ``gradient_growth`` also fires when staleness grew by at least this
            factor on each of ``fast_growth_steps`` consecutive steps (same floor and ε condition):
            an oscillation growing so fast that the loss spikes before ``growth_steps`` steps have
            passed (stale v̂ after a gradient-scale jump: ×2–5 per step). It opens no after-alert
            window. ``math.inf`` turns it off.
        fast_growth_steps: see ``fast_growth_ratio``.
        fresh_ratio: ``fresh_state`` fires when a tensor takes its first step while others have
            trained for 1/(1-``spike_decay``) steps, and that step moves its coordinates (lr × update
            RMS) more than this multiple of the RMS move of theirs. A fresh Adam state's first step is
            sign descent (|m̂/√v̂| = 1 = B_1: every coordinate moves by lr), where the tensors it
            joins average their gradient's noise in m̂ (update RMS ≈ √((1-β1)/(1+β1)) = 0.23 at
            β1 = 0.9 on pure noise, up to 1 on a steady signal): at their lr it moves 1–4× as far,
            and a new tensor whose lr is ramped up stays below them. 2 is "twice as far as its peers".
        step_size_ratio: ``step_size_jump`` fires when the parameters of the tensors that have
            trained for 1/(1-``spike_decay``) steps move (lr × update RMS, over all their
            coordinates) more than this multiple of their largest move on any earlier step (judged
            once that largest move has seen as many steps). A step size the run has never taken:
            an lr raised at once, not ramped. A warmup, a schedule's restart to an lr the run has
            trained at, and the update RMS moving between about a quarter of 1 (a noisy gradient)
            and 1 (a steady one), which the momentum spreads over several steps, stay below it:
            each step a little above the largest before. ``math.inf`` turns it off.
    """

    stale_peak: float = 2.0
    stale_clear: float = 1.25
    spike_ratio: float = 3.0
    spike_floor: float = 1.0
    spike_decay: float = 0.95
    bound_factor: float = 1.0
    growth_ratio: float = 1.2
    growth_steps: int = 4
    eps_fraction: float = 0.5
    eps_steps: int = 20
    eps_clear: float = 0.25
    min_numel: int = 256
    growth_steps_after_alert: int = 2
    after_alert_window: int = 50
    growth_floor: float = 0.05
    fast_growth_ratio: float = 2.5
    fast_growth_steps: int = 2
    fresh_ratio: float = 2.0
    step_size_ratio: float = 2.0

    def __post_init__(self):
        # Each field's type first, then its range: a comparison with a wrong type must not be
        # the error the user sees.
        for f in fields(self):
            value = getattr(self, f.name)
            integral = f.type in ("int", int)
            if isinstance(value, bool) or not isinstance(value, Integral if integral else Real) or value != value:
                what = "an int" if integral else "a number"
                raise ValueError(f"Thresholds.{f.name} must be {what}, got {value!r}")

        def check(name: str, ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"Thresholds.{name} must be {what}, got {getattr(self, name)!r}")

        check("stale_peak", self.stale_peak > 1, "a number > 1 (1 is the steady update)")
        check("stale_clear", 0 < self.stale_clear <= self.stale_peak, "in (0, stale_peak]")
        check("spike_ratio", self.spike_ratio > 1, "a number > 1")
        check("spike_floor", self.spike_floor >= 0, "a number >= 0")
        check("spike_decay", 0 < self.spike_decay < 1, "in (0, 1)")
        check("bound_factor", self.bound_factor > 0, "a number > 0 (math.inf disables the bound test)")
        check("growth_ratio", self.growth_ratio > 1, "a number > 1")
        check("growth_steps", self.growth_steps >= 1, "an int >= 1")
        check("eps_fraction", 0 <= self.eps_fraction < 1, "in [0, 1)")
        check("eps_clear", 0 <= self.eps_clear <= self.eps_fraction, "in [0, eps_fraction]")
        check("eps_steps", self.eps_steps >= 1, "an int >= 1")
        check("min_numel", self.min_numel >= 1, "an int >= 1")
        check(
            "growth_steps_after_alert",
            1 <= self.growth_steps_after_alert <= self.growth_steps,
            "an int in [1, growth_steps]",
        )
        check("growth_floor", self.growth_floor >= 0, "a number >= 0")
        check("fast_growth_ratio", self.fast_growth_ratio > 1, "a number > 1 (math.inf turns it off)")
        check("fast_growth_steps", self.fast_growth_steps >= 1, "an int >= 1")
        check("after_alert_window", self.after_alert_window >= 0, "an int >= 0")
        check("fresh_ratio", self.fresh_ratio > 0, "a number > 0 (math.inf turns it off)")
        check("step_size_ratio", self.step_size_ratio > 1, "a number > 1 (math.inf turns it off)")


class InstabilityWarning(UserWarning):
    """An alert under ``on_alert="warn"`` (or below ``fail_on``): the run goes on."""


class InstabilityError(RuntimeError):
    """Training was stopped by an instability alert; ``alerts`` holds the alerts that acted."""

    def __init__(self, alerts: Sequence[Alert], where: str | None = None, note: str | None = None):
        self.alerts = list(alerts)
        self.where, self.note = where, note
        lines = [f"[{a.severity}] {a.rule} at step {a.step}: {a.message}" for a in self.alerts]
        tail = f"\nAll alerts of the run: {where}" if where else ""
        tail += f"\n{note}" if note else ""
        super().__init__("adam-monitor stopped the run:\n" + "\n".join(lines) + tail)

    def __reduce__(self):
        # Rebuilt from its alerts, so it crosses process boundaries (multiprocessing, spawn) whole.
        return type(self), (self.alerts, self.where, self.note)
