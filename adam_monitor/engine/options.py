"""The monitor's options: one frozen object, validated once, shared by the engine and its adapters."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal, get_args

from ..alerts.records import GATING_SEVERITIES, Thresholds

__all__ = ["MonitorOptions", "OnAlert", "FailOn"]

OnAlert = Literal["warn", "raise", "stop"]
FailOn = Literal["warning", "error"]


class _InvalidOption(ValueError):
    def __init__(self, option: str, what: str, value: object):
        super().__init__(f"MonitorOptions({option}=...) must be {what}, got {value!r}")
        self.option, self.what, self.value = option, what, value


def _choices(values) -> str:
    return "one of " + ", ".join(map(repr, values))


@dataclass(frozen=True)
class MonitorOptions:
    """What the monitor writes, and what it does on an alert.

    Attributes:
        log_every_n_steps: write every this many optimizer steps (``None``: only on ``flush``).
            Every step is measured; a written value pools all steps since the previous write.
        per_parameter: also write one scalar per parameter tensor and diagnostic.
        histograms: also write a histogram of each tensor's update direction at logged steps.
        on_alert: ``"warn"`` (a warning, the run goes on; each rule's first alert on an optimizer in
            full, its repeats in one line at most every ``REPEAT_WARNING_STEPS`` steps), ``"raise"``
            (``InstabilityError`` at the alert's step, after it is written) or ``"stop"`` (the run is
            asked to stop; ``close`` then raises).
        fail_on: the lowest severity ``"raise"``/``"stop"`` act on: ``"error"`` or ``"warning"``
            (``info`` alerts state a regime, never a danger: they are recorded, never acted on).
        blocking_alerts: whether the rules see each step's statistics before ``optimizer.step``
            returns. On a CUDA device that is one host sync per step, which stops the host from
            queueing the next step while the GPU works. ``False``: the statistics are copied to the
            host without waiting and the rules run once they have arrived, usually at the next step
            and at the latest at the next log point, ``flush`` or ``close``; an alert still names the
            step it was raised for. ``None`` (default): ``False`` under ``on_alert="warn"``, ``True``
            under ``"raise"`` and ``"stop"``, which must act on the step itself. On the CPU the
            statistics are on the host already and the rules always run at once.
        thresholds: the step rules' thresholds.
        sharpness_every: estimate the preconditioned sharpness η·λ(P⁻¹H) over Adam's edge of
            stability (``adam/preconditioned_sharpness``, 1 = the edge) on the two steps ending at
            each multiple of this many steps; ``None`` (default): never. Each estimate is an eager
            pass over gradient and moments on two steps, several times the cost of a fused AdamW
            step (``tests/benchmarks/bench_host.py --only e`` measures it).
    """

    log_every_n_steps: int | None = 50
    per_parameter: bool = True
    histograms: bool = False
    on_alert: OnAlert = "warn"
    fail_on: FailOn = "error"
    blocking_alerts: bool | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)
    sharpness_every: int | None = None

    def __post_init__(self):
        for name in ("log_every_n_steps", "sharpness_every"):
            every = getattr(self, name)
            if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
                raise _InvalidOption(name, "a positive int or None", every)
        if self.on_alert not in get_args(OnAlert):
            raise _InvalidOption("on_alert", _choices(get_args(OnAlert)), self.on_alert)
        if self.fail_on not in GATING_SEVERITIES:
            raise _InvalidOption("fail_on", _choices(GATING_SEVERITIES), self.fail_on)
        if self.blocking_alerts is not None and not isinstance(self.blocking_alerts, bool):
            raise _InvalidOption("blocking_alerts", "True, False or None", self.blocking_alerts)
        for name in ("per_parameter", "histograms"):
            if not isinstance(getattr(self, name), bool):
                raise _InvalidOption(name, "True or False", getattr(self, name))
        if self.thresholds is None:
            object.__setattr__(self, "thresholds", Thresholds())
        elif not isinstance(self.thresholds, Thresholds):
            raise _InvalidOption("thresholds", "an adam_monitor.Thresholds", self.thresholds)

    @classmethod
    def of(cls, owner: str, **options) -> MonitorOptions:
        """Options given to ``owner`` (the class the user called), errors naming it."""
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"{owner}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}")
        try:
            return cls(**options)
        except _InvalidOption as err:
            raise ValueError(f"{owner}({err.option}=...) must be {err.what}, got {err.value!r}") from None

    @property
    def blocking(self) -> bool:
        """``blocking_alerts`` resolved: by default the rules block only where they must act on the step."""
        return self.on_alert != "warn" if self.blocking_alerts is None else self.blocking_alerts
