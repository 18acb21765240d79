"""Where alerts go: ``alerts.jsonl`` (appended durably, record by record), the run record
``run.json``, TensorBoard text; and how they are read back, strictly.

An alert is on disk before anything acts on it, so a run that is killed, or that raises
``InstabilityError`` a moment later, still leaves every alert readable. A write that fails (disk
full, folder gone, read-only) never reaches training: the alert stays in memory, one warning
names the path and the error, and the write is tried again at the next alert, log point and
``close()``; what still cannot be written is printed in full in the closing warning.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import time
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from .._faults import SoftWrites, append_lines, replace_file, warn
from .records import SEVERITY_ORDER, Alert

__all__ = [
    "ALERTS_FILE",
    "RUN_FILE",
    "AlertLog",
    "RunData",
    "alerts_path",
    "alerts_text",
    "markdown_code",
    "markdown_escaped",
    "read_alert_records",
    "read_alerts",
    "read_run",
    "summary_table",
    "torn_record",
]

ALERTS_FILE = Path("adam_monitor") / "alerts.jsonl"
#: What the run monitored and how far it got (rewritten atomically); see ``AlertLog.write_status``.
RUN_FILE = ALERTS_FILE.parent / "run.json"
RUN_FORMAT = 1


def alerts_path(log_dir: str | os.PathLike) -> Path:
    return Path(log_dir) / ALERTS_FILE


_FIELD = {
    key: re.compile(rf'"{key}"\s*:\s*("(?:[^"\\]|\\.)*"|-?\d+)') for key in ("rule", "severity", "step", "optimizer")
}


def torn_fields(fragment: str) -> dict[str, object]:
    """The fields of an alert record readable in a line cut short (killed mid-write, disk full)."""
    found: dict[str, object] = {}
    for key, pattern in _FIELD.items():
        match = pattern.search(fragment)
        if match:
            try:
                found[key] = json.loads(match.group(1))
            except ValueError:
                pass
    return found


def torn_record(fragment: str) -> dict:
    """A complete record standing for a line cut short: the fields still readable in it, severity
    ``error`` where the cut took it (a gate must not pass what it could not read)."""
    found = torn_fields(fragment)
    severity = found.get("severity")
    step = found.get("step")
    return {
        "rule": "torn_record",
        "severity": severity if severity in SEVERITY_ORDER else "error",
        "step": step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else 0,
        "message": (
            f"a record was cut short when the process writing it stopped (killed, or the disk was full); "
            f"it began {json.dumps(fragment[:160])}. Its alert ({found.get('rule', 'rule unreadable')}) "
            "may be one the run raised: look at the run's log and TensorBoard around that step."
        ),
        "optimizer": str(found.get("optimizer", "?")),
        "parameter": None,
        "value": "nan",
        "threshold": "nan",
    }


#: The longest ``run.json`` keeps step counts older than the run's (see ``AlertLog.write_status``).
STATUS_EVERY_S = 30.0


class AlertLog:
    """Appends alerts to ``<log_dir>/adam_monitor/alerts.jsonl`` and to a TensorBoard writer, and
    keeps the run record ``run.json`` beside it.

    The file is created at start (empty), so ``adam-monitor check`` can tell a clean run from a run
    that was never monitored. Only one process writes (``enabled=False`` on the others).
    """

    def __init__(self, log_dir: str | os.PathLike | None, *, writer=None, enabled: bool = True):
        self.path = alerts_path(log_dir) if (log_dir is not None and enabled) else None
        self.writer = writer if enabled else None
        self.count = 0
        self.soft = SoftWrites()
        self._unwritten: list[str] = []  # records not on disk yet, in order
        self._status: str | None = None  # the run record not on disk yet
        # A record that differs from the one written only in its step counts waits (``_counts``)
        # up to STATUS_EVERY_S: each write is an fsync'd replace, too slow for every log point.
        self._counts: str | None = None
        self._written: tuple[str, float] | None = None  # (what check reads of it, when)
        self._text_step: int | None = None  # the x_step of the last alert text written...
        self._text_alerts: list[Alert] = []  # ...and every alert of that step
        if self.path is not None:
            self.soft.attempt(str(self.path), self._create, kept="alerts stay in memory (Monitor.alerts)")

    def _create(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        append_lines(self.path, [], torn_record_line)

    def record(self, alerts: Iterable[Alert], x_step: int) -> None:
        alerts = list(alerts)
        if not alerts:
            return
        self.count += len(alerts)
        if self.path is not None:
            # x_step: where the alert sits on the logged charts' axis (Lightning counts batches).
            self._unwritten += [json.dumps({**a.to_dict(), "x_step": x_step}) for a in alerts]
            self.retry()
        if self.writer is not None:
            self.soft.attempt(
                f"alert text to TensorBoard ({_folder(self.writer)})",
                lambda: self._write_text(alerts, x_step),
                kept="alerts stay in alerts.jsonl and Monitor.alerts",
            )

    def _write_text(self, alerts: list[Alert], x_step: int) -> None:
        # TensorBoard shows every text written at a step as its own entry (newest first), and at
        # most 100 texts per tag (10 with --load_fast=false): one text per step, holding all its
        # alerts. Alerts recorded later at the same step (another optimizer, the configuration
        # check) rewrite it in full, so the newest entry at a step is complete.
        if x_step != self._text_step:
            self._text_step, self._text_alerts = x_step, []
        self._text_alerts += alerts
        self.writer.add_text("adam/alert", alerts_text(self._text_alerts, x_step), x_step)
        self.writer.add_scalar("adam/alerts", self.count, x_step)
        self.writer.flush()

    @property
    def unwritten(self) -> list[str]:
        """The records (JSON lines) that could not be written yet."""
        return list(self._unwritten)

    def retry(self) -> bool:
        """Write what is pending (alerts, then the run record); ``True`` when nothing is left."""
        if self.path is None:
            return True
        if self._unwritten:

            def append() -> None:
                self.path.parent.mkdir(parents=True, exist_ok=True)  # a folder deleted mid-run comes back
                append_lines(self.path, self._unwritten, torn_record_line)
                self._unwritten.clear()

            kept = f"{len(self._unwritten)} alert(s) stay in memory (Monitor.alerts)"
            self.soft.attempt(str(self.path), append, kept=kept)
        if self._status is not None:

            def replace() -> None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                replace_file(self.path.parent / RUN_FILE.name, self._status)
                self._status = None

            self.soft.attempt(str(self.path.parent / RUN_FILE.name), replace, kept="the run record is kept in memory")
        return not self._unwritten and self._status is None

    def write_status(self, status: dict) -> None:
        """Replace ``run.json``: ``status`` says what is monitored and how many steps each took.

        At once where what ``adam-monitor check`` reads of it changes (what is monitored, whether
        each optimizer has stepped, whether the run closed); a change of step counts alone at most
        every ``STATUS_EVERY_S`` seconds, and at ``close``.
        """
        if self.path is None:
            return
        text = json.dumps({"format": RUN_FORMAT, **status}, indent=1)
        verdict = json.dumps(
            {**status, "monitored": [[m.get("class"), m.get("steps", 0) > 0] for m in status.get("monitored", [])]}
        )
        now = time.monotonic()
        if self._written is not None and self._written[0] == verdict and now - self._written[1] < STATUS_EVERY_S:
            self._counts = text
        else:
            self._status, self._counts, self._written = text, None, (verdict, now)
        self.retry()

    def close(self) -> None:
        """Last try; records that still cannot be written are printed in the warning, in full."""
        if self._counts is not None:
            self._status, self._counts = self._counts, None
        if not self.retry() and self._unwritten:
            warn(
                f"adam-monitor: {len(self._unwritten)} alert record(s) could not be written to {self.path}; "
                "here they are:\n" + "\n".join(self._unwritten)
            )


def torn_record_line(fragment: str) -> str:
    return json.dumps(torn_record(fragment))


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|])")


def markdown_escaped(text: str) -> str:
    """``text`` shown as written by TensorBoard's Markdown (Python-Markdown with tables, then a
    sanitizer): special characters backslash-escaped, ``& < >`` as entities (``\\<`` is no escape
    there: it would show the backslash), newlines as ``<br>``."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text).replace("\r\n", "\n").replace("\n", "<br>")


def markdown_code(text: str) -> str:
    """``text`` as inline code where a code span can hold it (no backtick, pipe or line break), else escaped."""
    return f"`{text}`" if text and not any(c in text for c in "`|\r\n") else markdown_escaped(text)


def alerts_text(alerts: Sequence[Alert], x_step: int) -> str:
    """Markdown for TensorBoard's Text tab: a heading line, then one item per alert; every message
    escaped, so ``2*beta1*lr`` reads as written."""
    lines = [f"**{len(alerts)} alert{'s' if len(alerts) != 1 else ''} at step {x_step}**", ""]
    for a in alerts:
        where = f" / {markdown_code(a.parameter)}" if a.parameter else ""
        lines.append(
            f"- **{markdown_escaped(a.severity)}** {markdown_code(a.rule)} at optimizer step {a.step} "
            f"({markdown_escaped(a.optimizer)}{where}): value {a.value:.4g}, threshold {a.threshold:.4g}. "
            f"{markdown_escaped(a.message)}"
        )
    return "\n".join(lines)


def _folder(writer) -> str:
    return str(getattr(writer, "log_dir", None) or "the writer")


# ---------------------------------------------------------------------------------------------- reading back

#: The fields of a record and the JSON types each may hold.
_TYPES = {"rule": str, "severity": str, "step": int, "message": str, "optimizer": str}


@dataclass
class RunData:
    """What one run's ``adam_monitor`` folder says, read strictly.

    ``problems`` lists every record or file that could not be read or validated (a gate must fail
    on them); ``torn`` the last line of a run killed mid-write or still writing, kept as an alert.
    """

    folder: Path
    records: list[tuple[Alert, int]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    torn: str | None = None
    status: dict | None = None

    @property
    def alerts(self) -> list[Alert]:
        return [a for a, _ in self.records]


def _alert(record: object) -> tuple[Alert, int]:
    """An alert record as written by :class:`AlertLog`, or ``ValueError`` saying what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"a record is a JSON object, this is a {type(record).__name__}")
    for name in (f.name for f in fields(Alert)):
        if name not in record:
            raise ValueError(f"no {name!r}")
    for name, kind in _TYPES.items():
        value = record[name]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ValueError(f"{name!r} must be a {kind.__name__}, got {_shown(value)}")
    if record["severity"] not in SEVERITY_ORDER:
        raise ValueError(f"severity {_shown(record['severity'])} is not one of {', '.join(SEVERITY_ORDER)}")
    if record["step"] < 0:
        raise ValueError(f"step {record['step']} is negative")
    if record["parameter"] is not None and not isinstance(record["parameter"], str):
        raise ValueError(f"'parameter' must be a string or null, got {_shown(record['parameter'])}")
    for name in ("value", "threshold"):
        value = record[name]
        ok = value in ("nan", "inf", "-inf") if isinstance(value, str) else isinstance(value, (int, float))
        if not ok or isinstance(value, bool):
            raise ValueError(f'{name!r} must be a number (or "nan", "inf"), got {_shown(value)}')
    x_step = record.get("x_step", record["step"])
    if isinstance(x_step, bool) or not isinstance(x_step, int):
        raise ValueError(f"'x_step' must be an int, got {_shown(x_step)}")
    return Alert.from_dict(record), x_step


def _shown(value: object) -> str:
    return printable(repr(value)[:60])


def printable(text: str) -> str:
    """``text`` with control and format characters (newlines, ANSI escapes, bidi overrides) escaped:
    a record cannot drive the terminal or fake a line of the output."""
    return "".join(c if unicodedata.category(c)[0] != "C" else c.encode("unicode_escape").decode("ascii") for c in text)


def _parse_line(raw: bytes) -> tuple[Alert, int]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 (byte {err.start})") from None
    try:
        record = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("nested too deeply to be a record") from None
    except ValueError as err:
        raise ValueError(f"not JSON ({printable(str(err))[:80]})") from None
    return _alert(record)


def _no_constant(name: str):
    raise ValueError(f"bare {name} is not JSON")


def _open_regular(path: Path):
    """A binary handle on ``path`` if it is a regular file (not a link, FIFO or device: those are
    refused without opening them, so nothing blocks or reads another file)."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise OSError(f"{path} is a symbolic link; adam-monitor writes a regular file there, links are not followed")
    if not stat.S_ISREG(info.st_mode):
        raise OSError(f"{path} is not a regular file")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped between the two looks
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    return os.fdopen(fd, "rb")


def read_run(folder: str | os.PathLike) -> RunData:
    """Read ``alerts.jsonl`` and ``run.json`` of one run's ``adam_monitor`` folder; never raises on content."""
    folder = Path(folder)
    data = RunData(folder)
    path = folder / ALERTS_FILE.name
    try:
        with _open_regular(path) as f:
            lines = f.read().split(b"\n")
    except OSError as err:
        data.problems.append(f"cannot read {printable(str(path))}: {printable(err.strerror or str(err))}")
        lines = []
    last = len(lines) - 1  # after the final newline: b"" for a complete file
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue  # holds nothing (the end of a complete file, a blank line)
        try:
            data.records.append(_parse_line(raw))
        except ValueError as err:
            if i == last:  # no newline after it: the write in progress when the process stopped
                data.torn = printable(raw[:160].decode("utf-8", errors="replace"))
                record = torn_record(raw.decode("utf-8", errors="replace"))
                data.records.append((Alert.from_dict(record), record["step"]))
            else:
                data.problems.append(f"{printable(str(path))}:{i + 1}: not an alert record: {err}")
    data.status = _read_status(folder / RUN_FILE.name, data.problems)
    return data


def _read_status(path: Path, problems: list[str]) -> dict | None:
    try:
        with _open_regular(path) as f:
            status = json.loads(f.read(1 << 20).decode("utf-8"), parse_constant=_no_constant)
    except FileNotFoundError:
        problems.append(
            f"{printable(str(path))} is missing: nothing says what this run monitored (the run record could not "
            "be written, or an older adam-monitor wrote this folder)"
        )
        return None
    except (OSError, ValueError, RecursionError) as err:
        problems.append(f"cannot read {printable(str(path))}: {printable(str(err))[:120]}")
        return None
    monitored = status.get("monitored") if isinstance(status, dict) else None
    if (
        not isinstance(monitored, list)
        or not all(isinstance(m, dict) and isinstance(m.get("steps"), int) for m in monitored)
        or not isinstance(status.get("closed"), bool)
    ):
        problems.append(f"{printable(str(path))} is not a run record written by adam-monitor")
        return None
    return status


def read_alerts(path: str | os.PathLike) -> list[Alert]:
    """Alerts from an ``alerts.jsonl``; a last line cut short by a kill is ignored."""
    return [alert for alert, _ in read_alert_records(path)]


def read_alert_records(path: str | os.PathLike) -> list[tuple[Alert, int]]:
    """``(alert, x_step)`` pairs: ``x_step`` is the alert's position on the charts' step axis.

    Raises ``ValueError`` naming the line for a record that cannot be read; a last line cut short
    by a kill is skipped (``read_run`` keeps it, as a ``torn_record`` alert).
    """
    data = read_run(Path(path).parent)
    problems = [p for p in data.problems if RUN_FILE.name not in p]
    if problems:
        raise ValueError(problems[0])
    return data.records[:-1] if data.torn is not None else data.records


def summary_table(alerts: Sequence[Alert], where: str | None = None) -> str:
    """One line per (rule, optimizer, parameter): count, first step, worst value; titled with
    ``where`` (the run's alerts file) when given, so that the tables of several runs are told apart."""
    title = f"adam-monitor: {len(alerts) or 'no'} alert(s)" + (f" in {where}" if where else "")
    if not alerts:
        return title + "."
    groups: dict[tuple, list[Alert]] = {}
    for a in alerts:
        groups.setdefault((a.severity, a.rule, a.optimizer, a.parameter or "-"), []).append(a)
    rows = [("severity", "rule", "optimizer", "parameter", "alerts", "first step", "worst value", "threshold")]
    for (sev, rule, opt, param), group in sorted(
        groups.items(), key=lambda kv: (-SEVERITY_ORDER[kv[0][0]], kv[1][0].step)
    ):
        worst = max(group, key=lambda a: a.value if not math.isnan(a.value) else float("inf"))
        rows.append(
            (sev, rule, opt, param, str(len(group)), str(group[0].step), f"{worst.value:.4g}", f"{worst.threshold:.4g}")
        )
    rows = [tuple(printable(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return title + "\n" + "\n".join(lines)
