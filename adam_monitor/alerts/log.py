"""Where alerts go: ``alerts.jsonl`` (flushed line by line), TensorBoard text, warnings, the error.

An alert is on disk before anything acts on it, so a run that is killed, or that raises
``InstabilityError`` a moment later, still leaves every alert readable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from .records import SEVERITY_ORDER, Alert

__all__ = ["AlertLog", "read_alerts", "alerts_path", "summary_table", "ALERTS_FILE"]

ALERTS_FILE = Path("adam_monitor") / "alerts.jsonl"


def alerts_path(log_dir: str | os.PathLike) -> Path:
    return Path(log_dir) / ALERTS_FILE


class AlertLog:
    """Appends alerts to ``<log_dir>/adam_monitor/alerts.jsonl`` and to a TensorBoard writer.

    The file is created at start (empty), so ``adam-monitor check`` can tell a clean run from a run
    that was never monitored. Only one process writes (``enabled=False`` on the others).
    """

    def __init__(self, log_dir: str | os.PathLike | None, *, writer=None, enabled: bool = True):
        self.path = alerts_path(log_dir) if (log_dir is not None and enabled) else None
        self.writer = writer if enabled else None
        self.count = 0
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()

    def record(self, alerts: Iterable[Alert], x_step: int) -> None:
        alerts = list(alerts)
        if not alerts:
            return
        self.count += len(alerts)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                for a in alerts:
                    # x_step: where the alert sits on the logged charts' axis (Lightning counts batches).
                    f.write(json.dumps({**a.to_dict(), "x_step": x_step}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        if self.writer is not None:
            for a in alerts:
                where = f" / `{a.parameter}`" if a.parameter else ""
                self.writer.add_text(
                    "adam/alert",
                    f"**{a.severity}** `{a.rule}` at optimizer step {a.step} ({a.optimizer}{where}): "
                    f"value {a.value:.4g}, threshold {a.threshold:.4g}. {a.message}",
                    x_step,
                )
            self.writer.add_scalar("adam/alerts", self.count, x_step)
            self.writer.flush()


def read_alerts(path: str | os.PathLike) -> list[Alert]:
    """Alerts from an ``alerts.jsonl``; a last line cut short by a kill is ignored."""
    return [alert for alert, _ in read_alert_records(path)]


def read_alert_records(path: str | os.PathLike) -> list[tuple[Alert, int]]:
    """``(alert, x_step)`` pairs: ``x_step`` is the alert's position on the charts' step axis."""
    alerts = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            alerts.append((Alert.from_dict(record), int(record.get("x_step", record["step"]))))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            if i == len(lines) - 1:
                break  # the write in progress when the process died
            raise ValueError(f"{path}:{i + 1} is not an alert record: {line[:120]!r}") from None
    return alerts


def summary_table(alerts: Sequence[Alert]) -> str:
    """One line per (rule, optimizer, parameter): count, first step, worst value."""
    if not alerts:
        return "adam-monitor: no alerts."
    groups: dict[tuple, list[Alert]] = {}
    for a in alerts:
        groups.setdefault((a.severity, a.rule, a.optimizer, a.parameter or "-"), []).append(a)
    rows = [("severity", "rule", "optimizer", "parameter", "alerts", "first step", "worst value", "threshold")]
    for (sev, rule, opt, param), group in sorted(
        groups.items(), key=lambda kv: (-SEVERITY_ORDER[kv[0][0]], kv[1][0].step)
    ):
        worst = max(group, key=lambda a: a.value if a.value == a.value else float("inf"))
        rows.append(
            (sev, rule, opt, param, str(len(group)), str(group[0].step), f"{worst.value:.4g}", f"{worst.threshold:.4g}")
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return f"adam-monitor: {len(alerts)} alert(s)\n" + "\n".join(lines)
