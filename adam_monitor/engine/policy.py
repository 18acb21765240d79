"""What happens to an alert: recorded (alerts.jsonl before anything acts), warned about with
repeats condensed, then acted on by ``on_alert``: nothing more, raise, or ask the run to stop."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from .._faults import warn
from ..alerts.log import AlertLog
from ..alerts.records import SEVERITY_ORDER, Alert, InstabilityError, InstabilityWarning

__all__ = ["AlertPolicy", "REPEAT_WARNING_STEPS", "warn"]

#: Once a warning-level rule has warned in full on an optimizer, its later alerts there are
#: counted and warned as one short line at most every this many optimizer steps (and at
#: ``close()``). A run at Adam's edge of stability raises a precursor alert every few steps; the
#: full text each time buries the console. Every alert is still recorded (``Monitor.alerts``,
#: alerts.jsonl, TensorBoard) and acted on.
REPEAT_WARNING_STEPS = 100

#: ``info`` alerts (a regime, not a danger) go to this logger, not to ``warnings``: a run whose ε
#: sets the step of one tensor is not unstable, and a test suite run with ``-W error`` must not fail.
LOGGER = logging.getLogger("adam_monitor")


@dataclass
class _Repeats:
    """Alerts of one (optimizer, rule) not warned in full since the step ``since``."""

    since: int
    count: int = 0
    latest: Alert | None = None


class AlertPolicy:
    """Records every alert, warns, and acts on those at or above ``fail_on``.

    ``before_raise`` runs before :class:`InstabilityError` leaves (the writer's flush), so what the
    run logged so far is on disk when it ends.
    """

    def __init__(self, log: AlertLog, *, on_alert: str, fail_on: str, before_raise: Callable[[], None]):
        self.log = log
        self.on_alert = on_alert
        self.fail_on = fail_on
        self._before_raise = before_raise
        #: Every alert so far, in order.
        self.alerts: list[Alert] = []
        #: Alerts that asked the run to stop (``on_alert="stop"``).
        self.stop_alerts: list[Alert] = []
        self._repeats: dict[tuple[str, str], _Repeats] = {}

    @property
    def alerts_file(self) -> str | None:
        return str(self.log.path) if self.log.path else None

    def handle(self, alerts: list[Alert], x: int) -> None:
        """Record, warn about and act on ``alerts``; ``x`` is their step's value on the charts' axis."""
        if not alerts:
            return
        self.alerts.extend(alerts)
        self.log.record(alerts, x)  # on disk before anything acts on it
        acting = [a for a in alerts if SEVERITY_ORDER[a.severity] >= SEVERITY_ORDER[self.fail_on]]
        for a in alerts:
            if a.severity == "info":
                LOGGER.info("adam-monitor [info] %s at step %d: %s", a.rule, a.step, a.message)
            elif self.on_alert == "warn" or a not in acting:
                self._warn(a)
        if not acting or self.on_alert == "warn":
            return
        if self.on_alert == "raise":
            self._before_raise()
            raise InstabilityError(acting, where=self.alerts_file, note=self.unwritten_note())
        self.stop_alerts.extend(acting)

    def _warn(self, alert: Alert) -> None:
        """The first alert of a warning-level rule on an optimizer (and every error) in full, the
        repeats condensed (see ``REPEAT_WARNING_STEPS``)."""
        if alert.severity == "warning":
            key = (alert.optimizer, alert.rule)
            repeats = self._repeats.get(key)
            if repeats is not None:
                repeats.count += 1
                repeats.latest = alert
                if alert.step - repeats.since >= REPEAT_WARNING_STEPS:
                    self._warn_repeats(repeats)
                return
            self._repeats[key] = _Repeats(since=alert.step)
        warn(f"adam-monitor [{alert.severity}] {alert.rule} at step {alert.step}: {alert.message}", InstabilityWarning)

    def _warn_repeats(self, repeats: _Repeats) -> None:
        a = repeats.latest
        if a is None or not repeats.count:
            return
        where = self.alerts_file or "Monitor.alerts"
        more = f"{repeats.count} more alert{'s' if repeats.count > 1 else ''}"
        warn(
            f"adam-monitor [{a.severity}] {a.rule}: {more} on {a.optimizer} after step {repeats.since}, the "
            f"latest at step {a.step} ({a.parameter}); each one is in {where}",
            InstabilityWarning,
        )
        repeats.since, repeats.count, repeats.latest = a.step, 0, None

    def unwritten_note(self) -> str | None:
        """What the error must carry itself when the alerts file could not take it."""
        unwritten = self.log.unwritten
        if not unwritten:
            return None
        return f"{len(unwritten)} alert record(s) could not be written to {self.log.path}:\n" + "\n".join(unwritten)

    def close(self) -> None:
        """Warn the repeats not warned yet; last try at writing what is pending."""
        for repeats in self._repeats.values():
            self._warn_repeats(repeats)
        self.log.close()

    def take_stop_alerts(self) -> list[Alert]:
        stop, self.stop_alerts = self.stop_alerts, []
        return stop

    def load(self, alerts: list[Alert]) -> None:
        """The alerts of a resumed run (counted on, not written again)."""
        self.alerts = list(alerts)
        self.log.count = len(self.alerts)
