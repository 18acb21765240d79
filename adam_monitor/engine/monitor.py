"""The framework-free engine: step hooks, on-device accumulation, sinks.

``Monitor`` hooks ``optimizer.step`` of one or more Adam-family optimizers. Every step's statistics
rows (see :mod:`adam_monitor.diagnostics`) are added to an on-device running sum; at a logged step
the sums become the pooled and per-parameter diagnostics in one host transfer and go to the sinks.
Logged values pool every optimizer step since the previous log exactly (sums of squares over sums
of counts), so no step between two log points is lost from the record.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._runtime import HostCopy
from ..alerts.configuration import configuration_alerts
from ..alerts.log import AlertLog, summary_table
from ..alerts.records import SEVERITY_ORDER, Alert, InstabilityError, InstabilityWarning, Thresholds
from ..alerts.rules import AlertRules
from ..diagnostics.rows import DIAGNOSTICS, NUM_STATS, diagnostics_from_statistics
from .reader import StepReader, UnsupportedOptimizer

__all__ = ["Monitor", "clean_parameter_name"]

ScalarSink = Callable[[dict[str, float], int], None]
ON_ALERT = ("warn", "raise", "stop")
#: Tensors named per diagnostic in the "worst tensors" text at each log point.
WORST_NAMED = 5


def _worst_table(worst: dict[str, list[tuple[float, str]]]) -> str:
    rows = ["| diagnostic | worst tensors (value) |", "|---|---|"]
    for diag, top in worst.items():
        rows.append(f"| {diag} | " + ", ".join(f"`{name}` ({value:.4g})" for value, name in top) + " |")
    return "\n".join(rows)


def validate_options(owner: str, *, log_every_n_steps, on_alert: str, fail_on: str, blocking_alerts=None) -> None:
    """Reject bad options at construction, naming the option (``owner`` is the class the user called)."""
    if log_every_n_steps is not None and (
        isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1
    ):
        raise ValueError(f"{owner}(log_every_n_steps=...) must be a positive int, got {log_every_n_steps!r}")
    if on_alert not in ON_ALERT:
        raise ValueError(f"{owner}(on_alert=...) must be one of {', '.join(map(repr, ON_ALERT))}, got {on_alert!r}")
    if fail_on not in SEVERITY_ORDER:
        raise ValueError(f"{owner}(fail_on=...) must be one of {', '.join(map(repr, SEVERITY_ORDER))}, got {fail_on!r}")
    if blocking_alerts is not None and not isinstance(blocking_alerts, bool):
        raise ValueError(f"{owner}(blocking_alerts=...) must be True, False or None, got {blocking_alerts!r}")


_WRAPPER_COMPONENTS = ("_orig_mod.", "_forward_module.")  # torch.compile, Lightning Fabric


def clean_parameter_name(name: str) -> str:
    """A parameter name as the user wrote the module: no ``torch.compile`` or Fabric wrapper prefix."""
    for component in _WRAPPER_COMPONENTS:
        name = name.replace(component, "")
    return name


def _unwrap(optimizer):
    # Fabric's and Lightning's optimizer wrappers step the optimizer they hold: hook that one.
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def is_rank_zero() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


#: Once a warning-level rule has warned in full on an optimizer, its later alerts there are
#: counted and warned as one short line at most every this many optimizer steps (and at
#: ``close()``). A run at Adam's edge of stability raises a precursor alert every few steps; the
#: full text each time buries the console. Every alert is still recorded (``Monitor.alerts``,
#: alerts.jsonl, TensorBoard) and acted on.
REPEAT_WARNING_STEPS = 100


@dataclass
class _Repeats:
    """Alerts of one (optimizer, rule) not warned in full since the step ``since``."""

    since: int
    count: int = 0
    latest: Alert | None = None


def _warn(message: str, category: type[Warning] = UserWarning) -> None:
    if is_rank_zero():
        # Raised from inside optimizer.step: no line of the user's code to point at, and a line of
        # ours or torch's would only distract. Filters by category and message still work.
        warnings.warn_explicit(message, category, filename="adam-monitor", lineno=0, module="adam_monitor")


def optimizer_prefixes(optimizers: Sequence[torch.optim.Optimizer], root: str = "adam") -> list[str]:
    """Tag prefixes: ``adam`` for a single optimizer, else ``adam/<Class>[-i]`` (LearningRateMonitor's rule)."""
    if len(optimizers) == 1:
        return [root]
    seen: Counter[str] = Counter()
    prefixes = []
    for opt in optimizers:
        cls = type(opt).__name__
        seen[cls] += 1
        prefixes.append(f"{root}/{cls}" + (f"-{seen[cls] - 1}" if seen[cls] > 1 else ""))
    return prefixes


@dataclass
class _Tracked:
    """One monitored optimizer: its reader, hook, tag prefix and the sums since the last log."""

    optimizer: torch.optim.Optimizer
    reader: StepReader
    prefix: str
    label: str
    names: list[str] = field(default_factory=list)
    rules: AlertRules | None = None
    betas: list[tuple[float, float]] | None = None
    sums: Tensor | None = None
    pending_steps: int = 0
    step: int = 0
    hook: object | None = None
    applied: int = 0  # steps whose statistics were recorded
    attempts: int | None = None  # optimizer.step calls announced by the trainer, if it announces them
    worst: dict[str, list[tuple[float, str]]] = field(default_factory=dict)  # at the last log point
    hook_skips: int = 0  # post-hooks that found the step count unchanged (fused kernels under GradScaler)
    # (step, its x-axis value, host copy of its rows) not yet seen by the rules: non-blocking
    # alerts on CUDA.
    unchecked: deque = field(default_factory=deque)

    @property
    def skipped(self) -> int:
        return self.attempts - self.applied if self.attempts is not None else self.hook_skips


class Monitor:
    """Adam diagnostics for plain PyTorch loops and Fabric.

    Example::

        monitor = Monitor(optimizer, named_parameters=model.named_parameters(),
                          writer=SummaryWriter("runs/exp"))
        for batch in data:
            loss = model(batch).loss
            loss.backward()
            optimizer.step()          # the monitor's hook reads this step
            optimizer.zero_grad()
        monitor.close()

    Args:
        optimizer: one optimizer or a sequence of them (torch Adam/AdamW or :mod:`adam_monitor.optim`).
            Others get one warning and are not monitored; training is unaffected.
        named_parameters: ``model.named_parameters()`` (or a dict) to name per-parameter tags;
            unnamed parameters are called ``group<i>.param<j>``.
        writer: a TensorBoard ``SummaryWriter``; scalars, the custom-scalars layout and histograms go there.
        log_every_n_steps: write every this many optimizer steps (``None``: only on :meth:`flush`).
        per_parameter: also write one scalar per parameter tensor and diagnostic.
        histograms: also write a histogram of each tensor's update direction at logged steps.
        log_dir: where ``adam_monitor/alerts.jsonl`` goes (default: the writer's folder; with
            neither, alerts are kept in :attr:`alerts` and warned about only).
        on_alert: ``"warn"``, ``"raise"`` (:class:`InstabilityError` at the alert's step, after it is
            written) or ``"stop"`` (:attr:`should_stop` turns true; :meth:`close` then raises).
            Warnings: each rule's first alert on an optimizer in full, its repeats in one line at
            most every ``REPEAT_WARNING_STEPS`` steps.
        fail_on: the lowest severity ``"raise"``/``"stop"`` act on: ``"error"`` or ``"warning"``.
        blocking_alerts: whether the rules see each step's statistics before ``optimizer.step``
            returns. On a CUDA device that is one host sync per step, which stops the host from
            queueing the next step while the GPU works. ``False``: the statistics are copied to the
            host without waiting and the rules run once they have arrived, usually at the next step
            and at the latest at the next log point, :meth:`flush` or :meth:`close`; an alert still
            names the step it was raised for. ``None`` (default): ``False`` under
            ``on_alert="warn"``, ``True`` under ``"raise"`` and ``"stop"``, which must act on the step
            itself. On the CPU the statistics are on the host already and the rules always run at once.
        thresholds: the step rules' thresholds.
        scalar_sink: ``f(metrics, step)`` to receive scalars instead of the writer (Lightning loggers).
        step_axis: ``f() -> int``, the x-axis value of the current step for alerts' TensorBoard text.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        *,
        named_parameters: Iterable[tuple[str, Tensor]] | dict[str, Tensor] | None = None,
        writer=None,
        log_every_n_steps: int | None = 50,
        per_parameter: bool = True,
        histograms: bool = False,
        log_dir: str | None = None,
        on_alert: str = "warn",
        fail_on: str = "error",
        blocking_alerts: bool | None = None,
        thresholds: Thresholds | None = None,
        scalar_sink: ScalarSink | None = None,
        step_axis: Callable[[], int] | None = None,
    ):
        optimizers = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else list(optimizer)
        optimizers = [_unwrap(o) for o in optimizers]
        if not optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in optimizers):
            raise TypeError(
                "Monitor(optimizer): expected a torch.optim.Optimizer or a sequence of them, "
                f"got {type(optimizer).__name__}"
            )
        validate_options(
            "Monitor",
            log_every_n_steps=log_every_n_steps,
            on_alert=on_alert,
            fail_on=fail_on,
            blocking_alerts=blocking_alerts,
        )
        if named_parameters is None:
            self._named: dict[int, str] = {}
        else:
            items = named_parameters.items() if isinstance(named_parameters, dict) else named_parameters
            self._named = {id(p): clean_parameter_name(n) for n, p in items}
        self.writer = writer
        self.log_every_n_steps = log_every_n_steps
        self.per_parameter = per_parameter
        self.histograms = histograms
        self._scalar_sink = scalar_sink
        self._step_axis = step_axis
        self.on_alert = on_alert
        self.fail_on = fail_on
        self.blocking_alerts = on_alert != "warn" if blocking_alerts is None else blocking_alerts
        self.thresholds = thresholds if thresholds is not None else Thresholds()
        #: Every alert raised so far, in order.
        self.alerts: list[Alert] = []
        #: Alerts that asked the run to stop (``on_alert="stop"``).
        self.stop_alerts: list[Alert] = []
        self._config_seen: set[str] = set()
        self._repeats: dict[tuple[str, str], _Repeats] = {}
        if log_dir is None and writer is not None:
            log_dir = getattr(writer, "log_dir", None) or (
                writer.get_logdir() if hasattr(writer, "get_logdir") else None
            )
        self.log_dir = log_dir
        self._alert_log = AlertLog(log_dir, writer=writer, enabled=is_rank_zero())
        self._layout_written = False
        self._tracked: list[_Tracked] = []
        for opt, prefix in zip(optimizers, optimizer_prefixes(optimizers)):
            try:
                reader = StepReader(opt)
            except UnsupportedOptimizer as err:
                _warn(
                    f"adam-monitor is not monitoring {type(opt).__name__}: {err}. Training goes on; nothing is logged for it."
                )
                continue
            label = prefix.split("/", 1)[1] if "/" in prefix else type(opt).__name__
            tracked = _Tracked(opt, reader, prefix, label)
            tracked.hook = opt.register_step_post_hook(self._make_hook(tracked))
            self._tracked.append(tracked)

    # ------------------------------------------------------------------ stepping
    def _make_hook(self, tracked: _Tracked):
        def hook(optimizer, args, kwargs):
            self._on_step(tracked)

        return hook

    def _on_step(self, tracked: _Tracked) -> None:
        try:
            result = tracked.reader.read(after_step=True)  # called once per step(), from its post-hook
        except UnsupportedOptimizer as err:
            # State that does not look like Adam's only shows once stepping: stop watching it, once.
            self._drop(tracked, str(err))
            return
        if result is None:
            tracked.hook_skips += 1  # skipped step (GradScaler): the optimizer's step count did not move
            return
        tracked.applied += 1
        rows, step = result
        self._check_configuration(tracked, step)
        if tracked.rules is None or len(tracked.rules.names) != rows.shape[0]:
            self._check_unchecked(tracked, wait=True)  # earlier steps go to the rules they were made for
            tracked.rules = self._make_rules(tracked)
        if self.blocking_alerts:
            alerts = tracked.rules.observe(step, rows)
        else:
            tracked.unchecked.append((step, self._axis(step), HostCopy(rows)))
            alerts = []
        if tracked.sums is None or tracked.sums.shape != rows.shape:
            tracked.sums = torch.zeros_like(rows) if tracked.sums is None else self._resize(tracked.sums, rows)
        tracked.sums.add_(rows)
        tracked.pending_steps += 1
        tracked.step = step
        if alerts:
            self._handle(alerts, step)
        self._check_unchecked(tracked, wait=False)
        if self.log_every_n_steps is not None and step % self.log_every_n_steps == 0:
            self._flush_one(tracked, step)

    def _check_unchecked(self, tracked: _Tracked, *, wait: bool) -> None:
        """Run the rules on the steps whose rows have reached the host, in step order (all of
        them with ``wait``)."""
        while tracked.unchecked and (wait or tracked.unchecked[0][2].ready()):
            step, x, copy = tracked.unchecked.popleft()
            self._handle(tracked.rules.observe(step, copy.wait()), step, x)

    def check_alerts(self) -> list[Alert]:
        """Run the rules on every step they have not seen yet (``blocking_alerts=False`` on CUDA
        keeps the last step or two in flight); returns the alerts this found."""
        before = len(self.alerts)
        for tracked in self._tracked:
            self._check_unchecked(tracked, wait=True)
        return self.alerts[before:]

    def _drop(self, tracked: _Tracked, reason: str) -> None:
        self._check_unchecked(tracked, wait=True)
        _warn(
            f"adam-monitor stopped monitoring {type(tracked.optimizer).__name__}: {reason}. Training goes on; nothing more is logged for it."
        )
        if tracked.hook is not None:
            tracked.hook.remove()
        tracked.reader.release()
        self._tracked.remove(tracked)

    def note_step_attempt(self, optimizer) -> None:
        """Announce that ``optimizer.step`` is about to be attempted.

        A GradScaler that finds inf/NaN gradients skips ``step`` without calling it, so no hook
        sees the skip; a trainer that announces every attempt lets the monitor count those as
        ``skipped_steps``.
        """
        optimizer = getattr(optimizer, "optimizer", optimizer)  # Lightning's LightningOptimizer wrapper
        for tracked in self._tracked:
            if tracked.optimizer is optimizer:
                tracked.attempts = (tracked.attempts or 0) + 1

    # ------------------------------------------------------------------ alerts
    def _group_betas(self, tracked: _Tracked) -> list[tuple[float, float]]:
        return [tuple(float(b) for b in g["betas"]) for g in tracked.optimizer.param_groups]

    @staticmethod
    def _adam_direction(group: dict) -> bool:
        # adam_monitor.optim's LaProp and atan2 directions are bounded whatever the betas.
        return group.get("normalize", "adam") == "adam"

    def _make_rules(self, tracked: _Tracked) -> AlertRules:
        groups = tracked.optimizer.param_groups
        per_tensor = [tuple(float(b) for b in g["betas"]) for g in groups for _ in g["params"]]
        thresholds = self.thresholds
        if not all(self._adam_direction(g) for g in groups):
            thresholds = dataclasses.replace(thresholds, bound_factor=math.inf)  # B_t bounds Adam's direction only
        return AlertRules(
            self._parameter_names(tracked), optimizer=tracked.label, betas=per_tensor, thresholds=thresholds
        )

    def check_configuration(self) -> list[Alert]:
        """Run the configuration rules (β1² ≥ β2, β1 ≥ β2) now; they also run at the first step."""
        found = []
        for tracked in self._tracked:
            found += self._check_configuration(tracked, tracked.step + 1)
        return found

    def _check_configuration(self, tracked: _Tracked, step: int) -> list[Alert]:
        betas = self._group_betas(tracked)
        if betas == tracked.betas:
            return []
        if tracked.betas is not None:
            self._check_unchecked(tracked, wait=True)
            tracked.rules = None  # betas changed mid-run: the rules' constants depend on them
        tracked.betas = betas
        fresh = []
        checked = [b if self._adam_direction(g) else None for b, g in zip(betas, tracked.optimizer.param_groups)]
        for alert in configuration_alerts(checked, optimizer=tracked.label, step=step):
            key = f"{alert.optimizer}|{alert.rule}|{alert.message}"
            if key not in self._config_seen:  # a resumed run does not repeat what it said already
                self._config_seen.add(key)
                fresh.append(alert)
        self._handle(fresh, step)
        return fresh

    def _axis(self, step: int) -> int:
        """The x-axis value of the current step (``step_axis``, else the optimizer's step)."""
        return self._step_axis() if self._step_axis is not None else step

    def _handle(self, alerts: list[Alert], step: int, x: int | None = None) -> None:
        """Record, warn about and act on ``alerts`` of ``step`` (``x``: its x-axis value, if not now)."""
        if not alerts:
            return
        self.alerts.extend(alerts)
        x = self._axis(step) if x is None else x
        self._alert_log.record(alerts, x)  # on disk before anything acts on it
        acting = [a for a in alerts if SEVERITY_ORDER[a.severity] >= SEVERITY_ORDER[self.fail_on]]
        for a in alerts:
            if self.on_alert == "warn" or a not in acting:
                self._warn_alert(a)
        if not acting or self.on_alert == "warn":
            return
        if self.on_alert == "raise":
            self._flush_writer()
            raise InstabilityError(acting, where=self.alerts_file)
        self.stop_alerts.extend(acting)

    def _warn_alert(self, alert: Alert) -> None:
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
        _warn(f"adam-monitor [{alert.severity}] {alert.rule} at step {alert.step}: {alert.message}", InstabilityWarning)

    def _warn_repeats(self, repeats: _Repeats) -> None:
        a = repeats.latest
        if a is None or not repeats.count:
            return
        where = self.alerts_file or "Monitor.alerts"
        more = f"{repeats.count} more alert{'s' if repeats.count > 1 else ''}"
        _warn(
            f"adam-monitor [{a.severity}] {a.rule}: {more} on {a.optimizer} after step {repeats.since}, the "
            f"latest at step {a.step} ({a.parameter}); each one is in {where}",
            InstabilityWarning,
        )
        repeats.since, repeats.count, repeats.latest = a.step, 0, None

    @property
    def alerts_file(self) -> str | None:
        """Path of ``alerts.jsonl`` (``None`` without a log folder, or on ranks other than zero)."""
        return str(self._alert_log.path) if self._alert_log.path else None

    @property
    def should_stop(self) -> bool:
        """True once an alert at or above ``fail_on`` fired under ``on_alert="stop"``."""
        return bool(self.stop_alerts)

    def summary(self) -> str:
        """A table of every alert so far."""
        self.check_alerts()
        return summary_table(self.alerts)

    @staticmethod
    def _resize(sums: Tensor, rows: Tensor) -> Tensor:
        # Parameters were added to the optimizer mid-run: keep what the old ones accumulated.
        grown = torch.zeros_like(rows)
        grown[: sums.shape[0]] = sums
        return grown

    # ------------------------------------------------------------------ logging
    def _parameter_names(self, tracked: _Tracked) -> list[str]:
        if len(tracked.names) != len(tracked.reader.params):
            names = []
            for gi, group in enumerate(tracked.optimizer.param_groups):
                for pj, p in enumerate(group["params"]):
                    names.append(self._named.get(id(p), f"group{gi}.param{pj}"))
            tracked.names = names
        return tracked.names

    def name_parameters(self, named_parameters: Iterable[tuple[str, Tensor]]) -> None:
        """Set (or refresh) parameter names, e.g. after a strategy wrapped the model."""
        self._named = {id(p): clean_parameter_name(n) for n, p in named_parameters}
        for tracked in self._tracked:
            tracked.names = []

    def compute(self) -> dict[str, float]:
        """The diagnostics pooled since the last flush, as ``{tag: value}`` (one host transfer each)."""
        metrics: dict[str, float] = {}
        for tracked in self._tracked:
            metrics.update(self._metrics(tracked))
        return metrics

    def _metrics(self, tracked: _Tracked) -> dict[str, float]:
        if tracked.sums is None or tracked.pending_steps == 0:
            return {}
        pooled = diagnostics_from_statistics(tracked.sums.sum(0))
        per_param = diagnostics_from_statistics(tracked.sums)
        packed = torch.cat([pooled, per_param.reshape(-1)]) if self.per_parameter else pooled
        values = packed.tolist()  # the one host transfer of this log point
        # That transfer waited for the device: the steps' rows in flight have landed, so the rules
        # see them now at no further sync, and the alert count below includes them.
        self._check_unchecked(tracked, wait=True)
        metrics = {f"{tracked.prefix}/{d}": v for d, v in zip(DIAGNOSTICS, values[:4]) if v == v}
        metrics[f"{tracked.prefix}/skipped_steps"] = float(tracked.skipped)
        metrics["adam/alerts"] = float(len(self.alerts))
        if self.per_parameter:
            names = self._parameter_names(tracked)
            ranked: dict[str, list[tuple[float, str]]] = {d: [] for d in DIAGNOSTICS}
            for i, name in enumerate(names):
                base = 4 + 4 * i
                for k, d in enumerate(DIAGNOSTICS):
                    v = values[base + k]
                    if v == v:  # NaN: the tensor did not step since the last log
                        metrics[f"{tracked.prefix}/{d}/{name}"] = v
                        ranked[d].append((v, name))
            # With hundreds of tensors no chart shows them all: the worst one is a scalar of its
            # own and the top few are named in a text summary.
            tracked.worst = {d: sorted(r, reverse=True)[:WORST_NAMED] for d, r in ranked.items() if r}
            for d, top in tracked.worst.items():
                metrics[f"{tracked.prefix}/worst/{d}"] = top[0][0]
        return metrics

    def flush(self, step: int | None = None) -> dict[str, float]:
        """Write everything accumulated since the last flush; returns what was written.

        ``step`` is the x-axis value (default: each optimizer's own step count).
        """
        written: dict[str, float] = {}
        for tracked in self._tracked:
            written.update(self._flush_one(tracked, step))
        return written

    def _flush_one(self, tracked: _Tracked, step: int | None) -> dict[str, float]:
        metrics = self._metrics(tracked)
        if not metrics:
            return {}
        x = tracked.step if step is None else step
        self._write_layout()
        if self._scalar_sink is not None:
            self._scalar_sink(metrics, x)
        elif self.writer is not None:
            for tag, value in metrics.items():
                self.writer.add_scalar(tag, value, x)
        if self.per_parameter and self.writer is not None and tracked.worst:
            self.writer.add_text(f"{tracked.prefix}/worst_tensors", _worst_table(tracked.worst), x)
        if self.histograms and self.writer is not None:
            names = dict(zip(map(id, tracked.reader.params), self._parameter_names(tracked)))
            for p, u in tracked.reader.updates():
                self.writer.add_histogram(
                    f"{tracked.prefix}/update/{names.get(id(p), '?')}", u.detach().float().cpu(), x
                )
        tracked.sums.zero_()
        tracked.pending_steps = 0
        return metrics

    def _write_layout(self) -> None:
        if self._layout_written or self.writer is None or not hasattr(self.writer, "add_custom_scalars"):
            return
        from .tensorboard import custom_scalars_layout

        names = {t.prefix: self._parameter_names(t) for t in self._tracked}
        self.writer.add_custom_scalars(custom_scalars_layout(names, per_parameter=self.per_parameter))
        self._layout_written = True

    # ------------------------------------------------------------------ lifecycle
    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [t.optimizer for t in self._tracked]

    def close(self, *, raise_on_stop: bool = True) -> None:
        """Write what is pending, remove the hooks, flush the writer. Idempotent.

        Under ``on_alert="stop"``, raises :class:`InstabilityError` after everything is written if
        an alert asked the run to stop, so a script ends with a non-zero exit status.
        """
        try:
            for tracked in self._tracked:
                if tracked.pending_steps:
                    self._flush_one(tracked, None)
                self._check_unchecked(tracked, wait=True)
            for repeats in self._repeats.values():
                self._warn_repeats(repeats)
        finally:  # an alert raised on the last steps still leaves the optimizers unhooked
            for tracked in self._tracked:
                if tracked.hook is not None:
                    tracked.hook.remove()
                    tracked.hook = None
                tracked.reader.release()
            self._flush_writer()
        if raise_on_stop and self.stop_alerts:
            stop, self.stop_alerts = self.stop_alerts, []
            raise InstabilityError(stop, where=self.alerts_file)

    def _flush_writer(self) -> None:
        if self.writer is not None and hasattr(self.writer, "flush"):
            self.writer.flush()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(raise_on_stop=exc_type is None)

    def state_dict(self) -> dict:
        """Accumulated sums and step counts, so a resumed run logs what an uninterrupted one would."""
        self.check_alerts()  # the rules' state must include every step the sums do
        return {
            "version": 1,
            "optimizers": [
                {
                    "prefix": t.prefix,
                    "sums": None if t.sums is None else t.sums.detach().cpu().clone(),
                    "pending_steps": t.pending_steps,
                    "step": t.step,
                    "rules": None if t.rules is None else t.rules.state_dict(),
                    "applied": t.applied,
                    "attempts": t.attempts,
                    "hook_skips": t.hook_skips,
                }
                for t in self._tracked
            ],
            "alerts": [a.to_dict() for a in self.alerts],
            "configuration_seen": sorted(self._config_seen),
        }

    def load_state_dict(self, state: dict) -> None:
        saved = {entry["prefix"]: entry for entry in state.get("optimizers", [])}
        for tracked in self._tracked:
            entry = saved.get(tracked.prefix)
            if entry is None:
                continue
            sums = entry["sums"]
            if sums is not None:
                device = tracked.reader.params[0].device if tracked.reader.params else "cpu"
                tracked.sums = sums.to(device=device, dtype=torch.float64).reshape(-1, NUM_STATS)
            tracked.pending_steps = int(entry["pending_steps"])
            tracked.step = int(entry["step"])
            tracked.applied = int(entry.get("applied", 0))
            tracked.attempts = entry.get("attempts")
            tracked.hook_skips = int(entry.get("hook_skips", 0))
            if entry.get("rules") is not None:
                tracked.rules = self._make_rules(tracked)
                tracked.rules.load_state_dict(entry["rules"])
        self.alerts = [Alert.from_dict(d) for d in state.get("alerts", [])]
        self._alert_log.count = len(self.alerts)
        self._config_seen = set(state.get("configuration_seen", []))
