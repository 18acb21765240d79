"""The framework-free engine: one optimizer step's way from its hook to the sinks.

``Monitor`` hooks ``optimizer.step`` of one or more Adam-family optimizers. Each step goes straight
through: read (:class:`~.reader.StepReader`, statistics rows from the optimizer's state) →
accumulate (an on-device running sum) → rules (:class:`~adam_monitor.alerts.rules.AlertRules`,
once the rows are on the host) → policy (:class:`~.policy.AlertPolicy`) → at a log point the
sink (:class:`~.tensorboard.TensorBoardSink`), the sums becoming the pooled and per-parameter
diagnostics in one host transfer. Logged values pool every step since the previous log exactly
(sums of squares over sums of counts), so no step between two log points is lost from the record.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .._runtime import HostCopy, is_rank_zero
from ..alerts.configuration import scheduled_configuration_alerts
from ..alerts.log import AlertLog, summary_table
from ..alerts.records import Alert, InstabilityError, Thresholds
from ..alerts.rules import AlertRules, carry_over
from ..diagnostics.rows import NUM_STATS, rows_with_grad_count
from .metrics import log_point
from .moments import state_dtype
from .names import names_by_id, optimizer_prefixes, parameter_names, unnamed_parameters, unwrap_optimizer
from .options import MonitorOptions
from .policy import AlertPolicy, warn
from .reader import StepReader, UnsupportedOptimizer, nested_step, updates
from .sharpness import SharpnessSampler
from .tensorboard import TensorBoardSink

__all__ = ["Monitor"]


def _bounded_by_adam(group: dict) -> bool:
    """Whether the group's direction is Adam's m̂/(√v̂+ε), which B_t and the beta rules bound;
    adam_monitor.optim's LaProp and atan2 directions are bounded whatever the betas."""
    return group.get("normalize", "adam") == "adam"


def _rules_for(
    tracked: _Tracked, named: dict[int, str], thresholds: Thresholds, previous: AlertRules | None = None
) -> AlertRules:
    """Rules for the optimizer's current tensors (named from ``named``); those of ``previous`` (rules
    for an earlier set of them: a param group added, say) keep their running state."""
    groups = tracked.optimizer.param_groups
    per_tensor = [tracked.reader.betas(g) for g in groups for _ in g["params"]]
    if tracked.reader.rule in ("nadam", "radam", "registered") or not all(_bounded_by_adam(g) for g in groups):
        thresholds = dataclasses.replace(thresholds, bound_factor=math.inf)  # B_t bounds Adam's direction only
    state = tracked.optimizer.state
    dtypes = [state_dtype(state.get(p, {}), p.dtype) for g in groups for p in g["params"]]
    names = tracked.parameter_names(named)
    rules = AlertRules(names, optimizer=tracked.label, betas=per_tensor, thresholds=thresholds, state_dtypes=dtypes)
    if previous is not None:
        carry_over(previous, rules)
    return rules


def _tensor_lrs(reader: StepReader, n: int) -> np.ndarray | None:
    """Each parameter's lr, in the rules' order (every group's parameters in turn), read in the
    step's post-hook: the lr the step used, before a scheduler moves it. NaN for an lr kept in a
    device tensor, which reading would cost a host sync each step; ``None`` where the groups do not
    hold ``n`` parameters."""
    lrs, sizes = [], []
    for group in reader.optimizer.param_groups:
        lr = reader.lr(group)
        if isinstance(lr, Tensor):
            lr = lr.item() if lr.device.type == "cpu" and lr.numel() == 1 else math.nan
        lrs.append(float(lr) if isinstance(lr, (int, float)) else math.nan)
        sizes.append(len(group["params"]))
    return np.repeat(np.array(lrs, dtype=np.float64), sizes) if sum(sizes) == n else None


def _optimizers(optimizer) -> tuple[list[torch.optim.Optimizer], list[dict]]:
    """The optimizers to hook (wrappers unwrapped), and the ``run.json`` entries of the objects
    that step like an optimizer but are none of torch's (a schedule-free wrapper around one):
    those get one warning and are not monitored. Anything else is a ``TypeError`` saying what was
    passed."""
    if isinstance(optimizer, torch.optim.Optimizer):
        given = [optimizer]
    elif isinstance(optimizer, Iterable) and not isinstance(optimizer, (str, bytes, dict)):
        given = list(optimizer)
    else:
        given = [optimizer]
    unwrapped = [unwrap_optimizer(o) for o in given]
    foreign = [o for o in unwrapped if not isinstance(o, torch.optim.Optimizer) and callable(getattr(o, "step", None))]
    optimizers = [o for o in unwrapped if isinstance(o, torch.optim.Optimizer)]
    wrong = [o for o in unwrapped if not isinstance(o, torch.optim.Optimizer) and o not in foreign]
    if not unwrapped or wrong:
        got = type(wrong[0]).__name__ if wrong else "an empty sequence"
        raise TypeError(
            f"Monitor(optimizer): expected a torch.optim.Optimizer or a list of them, got {got}. "
            "Create the optimizer first, then Monitor(optimizer, ...)."
        )
    unmonitored = []
    for o in foreign:
        reason = f"{type(o).__name__} is not a torch.optim.Optimizer, so the monitor cannot hook its steps"
        warn(
            f"adam-monitor is not monitoring {type(o).__name__}: {reason}. Training goes on; nothing is logged for it."
        )
        unmonitored.append({"class": type(o).__name__, "reason": reason})
    return optimizers, unmonitored


def _check_sinks(*, writer, log_dir, scalar_sink, step_axis) -> None:
    """Refuse sinks that would fail at the first log point, inside ``optimizer.step``."""
    if writer is not None and not callable(getattr(writer, "add_scalar", None)):
        raise TypeError(
            f"Monitor(writer=...) must be a TensorBoard SummaryWriter (anything with add_scalar), got "
            f"{type(writer).__name__} {writer!r:.60}; for a folder pass writer=SummaryWriter(path) or log_dir=path"
        )
    if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
        raise TypeError(f"Monitor(log_dir=...) must be a path (str or os.PathLike), got {type(log_dir).__name__}")
    for name, value in (("scalar_sink", scalar_sink), ("step_axis", step_axis)):
        if value is not None and not callable(value):
            raise TypeError(f"Monitor({name}=...) must be a function, got {type(value).__name__}")


def _resolve_options(options: MonitorOptions | None, values: dict) -> MonitorOptions:
    if options is None:
        return MonitorOptions.of("Monitor", **values)
    if values:
        raise TypeError(f"Monitor(): pass options= or its fields ({', '.join(values)}), not both")
    if not isinstance(options, MonitorOptions):
        raise TypeError(f"Monitor(options=...) must be a MonitorOptions, got {type(options).__name__}")
    return options


def _writer_folder(writer) -> str | None:
    if writer is None:
        return None
    return getattr(writer, "log_dir", None) or (writer.get_logdir() if hasattr(writer, "get_logdir") else None)


def _guarded(on_step: Callable[[_Tracked], None], on_fault: Callable[[_Tracked, str], None], tracked: _Tracked) -> None:
    """``on_step(tracked)``; a fault of the monitor's own (not an alert that must end the run)
    stops the monitoring of that optimizer with one warning, and training goes on."""
    try:
        on_step(tracked)
    except InstabilityError:
        raise
    except Exception as err:  # noqa: BLE001 - no fault of the monitor's may end the training run
        reason = f"it failed while reading a step ({type(err).__name__}: {err}); please report this"
        try:
            on_fault(tracked, reason)
        except Exception:  # noqa: BLE001 - the fault may be in what dropping it touches too
            tracked.unhook()
            warn(f"adam-monitor stopped monitoring {type(tracked.optimizer).__name__}: {reason}")


def _track(
    optimizers: list[torch.optim.Optimizer],
    on_step: Callable[[_Tracked], None],
    unmonitored: list[dict],
    sharpness_every: int | None,
    on_fault: Callable[[_Tracked, str], None],
) -> list[_Tracked]:
    """A hooked :class:`_Tracked` per readable optimizer; the others get one warning and an entry
    in ``unmonitored``."""
    tracked_all = []
    for opt, prefix in zip(optimizers, optimizer_prefixes(optimizers)):
        try:
            reader = StepReader(opt)
        except UnsupportedOptimizer as err:
            warn(
                f"adam-monitor is not monitoring {type(opt).__name__}: {err}. Training goes on; nothing is logged for it."
            )
            unmonitored.append({"class": type(opt).__name__, "reason": str(err)})
            continue
        label = prefix.split("/", 1)[1] if "/" in prefix else type(opt).__name__
        tracked = _Tracked(opt, reader, prefix, label, sharpness=SharpnessSampler(sharpness_every))
        tracked.start_betas = [reader.betas(g) for g in opt.param_groups]  # what a schedule moves from
        tracked.hook = opt.register_step_post_hook(lambda *_, tracked=tracked: _guarded(on_step, on_fault, tracked))
        tracked_all.append(tracked)
    return tracked_all


def _saved_rules(tracked: _Tracked, entry: dict, named: dict[int, str], options: MonitorOptions) -> AlertRules | None:
    """Rules built for ``tracked`` holding the saved rules' state of ``entry`` (``None`` if it has none)."""
    if entry.get("rules") is None:
        return None
    rules = _rules_for(tracked, named, options.thresholds)
    rules.load_state_dict(entry["rules"])
    return rules


def _configuration_episodes(
    label: str, found: list[tuple[int, Alert]], holding: set[str]
) -> tuple[list[Alert], set[str]]:
    """The configuration alerts of optimizer ``label`` that start an episode, and the new set of
    conditions that hold. ``holding`` has one key per (optimizer, rule, param group) whose condition
    held at the last check: a β schedule that keeps the betas offending (OneCycleLR's
    ``cycle_momentum`` moves β1 every step) is one episode, and a resumed run does not repeat it;
    a condition that clears and comes back is a new episode."""
    now = {f"{label}|{alert.rule}|group {gi}": alert for gi, alert in found}
    fresh = [alert for key, alert in now.items() if key not in holding]
    return fresh, {k for k in holding if not k.startswith(label + "|")} | now.keys()


def _episode_key(key: str) -> str:
    """A ``configuration_seen`` key of a state saved before episodes (``optimizer|rule|message``,
    the message starting "param group N:") as an episode key."""
    found = re.fullmatch(r"(.*)\|(\w+)\|param group (\d+):.*", key, flags=re.DOTALL)
    return f"{found[1]}|{found[2]}|group {found[3]}" if found else key


def _run_status(tracked_all: list[_Tracked], unmonitored: list[dict], *, closed: bool) -> dict:
    """The run record (``run.json``): what is monitored, how many steps each optimizer took."""
    return {
        "closed": closed,
        "monitored": [
            {
                "optimizer": t.label,
                "class": type(t.optimizer).__name__,
                "parameters": len(t.reader.params),
                "steps": t.step,
                "steps_applied": t.applied,
                "steps_unverified": t.unverified,
                "steps_skipped": t.skipped,
            }
            for t in tracked_all
        ],
        "not_monitored": unmonitored,
    }


def _warn_unnamed(optimizers: Sequence[torch.optim.Optimizer], named: dict[int, str]) -> None:
    for opt in optimizers:
        missing = unnamed_parameters(opt, named)
        if missing:
            total = sum(len(g["params"]) for g in opt.param_groups)
            warn(
                f"adam-monitor: named_parameters has no name for {len(missing)} of the {total} parameters of "
                f"{type(opt).__name__} (first: {missing[0]}); they are logged as group<i>.param<j>. Pass "
                "named_parameters of the model this optimizer trains."
            )


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
    coupled_pending: list[bool] = field(default_factory=list)  # per group: coupled betas to judge again
    start_betas: list[tuple[float, float]] | None = None  # as the optimizer was given to the monitor
    sums: Tensor | None = None
    pending_steps: int = 0
    step: int = 0
    hook: object | None = None
    applied: int = 0  # steps whose statistics were recorded
    unverified: int = 0  # steps taken before the update was verified to be Adam's: not recorded
    attempts: int | None = None  # optimizer.step calls announced by the trainer, if it announces them
    hook_skips: int = 0  # post-hooks that found the step count unchanged (fused kernels under GradScaler)
    # (step, its x-axis value, host copy of its rows) not yet seen by the rules: on CUDA the copy
    # lands a step or so later unless the rules block.
    unchecked: deque = field(default_factory=deque)
    sharpness: SharpnessSampler = field(default_factory=lambda: SharpnessSampler(None))

    @property
    def skipped(self) -> int:
        return self.attempts - self.applied - self.unverified if self.attempts is not None else self.hook_skips

    def accumulate(self, rows: Tensor, step: int) -> None:
        if self.sums is None:
            self.sums = torch.zeros_like(rows)
        elif self.sums.shape != rows.shape:
            # Parameters were added to the optimizer mid-run: keep what the old ones accumulated.
            grown = torch.zeros_like(rows)
            grown[: self.sums.shape[0]] = self.sums
            self.sums = grown
        self.sums.add_(rows)
        self.pending_steps += 1
        self.step = step

    def log_point(
        self, named: dict[int, str], *, alert_count: int, per_parameter: bool
    ) -> tuple[dict[str, float], dict[str, list[tuple[float, str]]]]:
        """The tags of the steps pooled since the last log point, and the worst tensors (empty: none)."""
        if self.sums is None or self.pending_steps == 0:
            return {}, {}
        return log_point(
            self.prefix,
            self.sums,
            self.parameter_names(named),
            skipped=self.skipped,
            alert_count=alert_count,
            per_parameter=per_parameter,
            sharpness=self.sharpness.latest(),
        )

    def give_rules_betas(self, betas: list[tuple[float, float]]) -> None:
        """The rules judge the next steps with the groups' new ``betas`` (rules for another set of
        tensors, a param group added, are rebuilt at the next step instead)."""
        per_tensor = [b for b, g in zip(betas, self.optimizer.param_groups) for _ in g["params"]]
        if self.rules is not None and len(per_tensor) == len(self.rules.names):
            self.rules.set_betas(per_tensor)

    def parameter_names(self, named: dict[int, str]) -> list[str]:
        if len(self.names) != len(self.reader.params):  # parameters were added: name them anew
            self.names = parameter_names(self.optimizer, named)
        return self.names

    def unhook(self) -> None:
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        self.reader.release()

    def state_dict(self) -> dict:
        return {
            "prefix": self.prefix,
            "sums": None if self.sums is None else self.sums.detach().cpu().clone(),
            "pending_steps": self.pending_steps,
            "step": self.step,
            "rules": None if self.rules is None else self.rules.state_dict(),
            "applied": self.applied,
            "unverified": self.unverified,
            "attempts": self.attempts,
            "hook_skips": self.hook_skips,
        }

    def loaded(self, entry: dict, rules: AlertRules | None) -> dict:
        """The fields :meth:`state_dict`'s ``entry`` restores (``rules``: already built and loaded),
        all checked: a state that does not fit raises ``ValueError`` before anything changes."""
        sums = entry["sums"]
        if sums is not None:
            rows = len(self.reader.params)
            if isinstance(sums, Tensor) and sums.numel() == rows * (NUM_STATS - 1):
                sums = rows_with_grad_count(sums.reshape(rows, NUM_STATS - 1))  # saved before grad_count existed
            if not isinstance(sums, Tensor) or sums.numel() != rows * NUM_STATS:
                got = tuple(sums.shape) if isinstance(sums, Tensor) else type(sums).__name__
                raise ValueError(
                    f"Monitor.load_state_dict: the state of {self.prefix!r} holds sums of shape {got}, this "
                    f"optimizer has {rows} parameters ({rows} x {NUM_STATS}); resume with the parameters of the saved run"
                )
            device = self.reader.params[0].device if self.reader.params else "cpu"
            # a copy: the caller's state (a loaded checkpoint) must not become the running sums
            sums = sums.to(device=device, dtype=torch.float64, copy=True).reshape(-1, NUM_STATS)
        attempts = entry.get("attempts")
        values = dict(
            sums=self.sums if sums is None else sums,
            pending_steps=int(entry["pending_steps"]),
            step=int(entry["step"]),
            applied=int(entry.get("applied", 0)),
            unverified=int(entry.get("unverified", 0)),
            attempts=None if attempts is None else int(attempts),
            hook_skips=int(entry.get("hook_skips", 0)),
        )
        if rules is not None:
            values["rules"] = rules
        return values


def _histograms(tracked: _Tracked, named: dict[int, str]) -> Iterable[tuple[str, Tensor]]:
    names = dict(zip(map(id, tracked.reader.params), tracked.parameter_names(named)))
    return ((names.get(id(p), "?"), u) for p, u in updates(tracked.reader))


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
        log_dir: where ``adam_monitor/alerts.jsonl`` goes (default: the writer's folder; with
            neither, alerts are kept in :attr:`alerts` and warned about only).
        scalar_sink: ``f(metrics, step)`` to receive scalars instead of the writer (Lightning loggers).
        step_axis: ``f() -> int``, the x-axis value of the current step for alerts' TensorBoard text.
        options: a :class:`~adam_monitor.engine.options.MonitorOptions`, or its fields as keywords:
            ``log_every_n_steps`` (default 50), ``per_parameter``, ``histograms``, ``on_alert``
            (``"warn"``, ``"raise"``, ``"stop"``), ``fail_on``, ``blocking_alerts``, ``thresholds``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        *,
        named_parameters: Iterable[tuple[str, Tensor]] | dict[str, Tensor] | None = None,
        writer=None,
        log_dir: str | None = None,
        scalar_sink: Callable[[dict[str, float], int], None] | None = None,
        step_axis: Callable[[], int] | None = None,
        options: MonitorOptions | None = None,
        **option_values,
    ):
        optimizers, self._unmonitored = _optimizers(optimizer)
        self.options = _resolve_options(options, option_values)
        _check_sinks(writer=writer, log_dir=log_dir, scalar_sink=scalar_sink, step_axis=step_axis)
        self._named = names_by_id(named_parameters)
        if self._named:
            _warn_unnamed(optimizers, self._named)
        self.writer = writer
        self._step_axis = step_axis
        self.log_dir = log_dir if log_dir is not None else _writer_folder(writer)
        self._sink = TensorBoardSink(writer, scalar_sink=scalar_sink, per_parameter=self.options.per_parameter)
        self._policy = AlertPolicy(
            AlertLog(self.log_dir, writer=writer, enabled=is_rank_zero()),
            on_alert=self.options.on_alert,
            fail_on=self.options.fail_on,
            before_raise=self._sink.flush,
        )
        self._config_seen: set[str] = set()
        self._tracked = _track(optimizers, self._on_step, self._unmonitored, self.options.sharpness_every, self._drop)
        self._write_status()

    # ------------------------------------------------------------------ the step
    def _on_step(self, tracked: _Tracked) -> None:
        """read → accumulate → rules → policy → (at a log point) sink, for the step just taken."""
        if tracked.reader.overridden and nested_step(tracked.optimizer):
            return  # the outer step's hook reads it, once the whole step is done
        try:
            result = tracked.reader.read(after_step=True)  # called once per step(), from its post-hook
        except UnsupportedOptimizer as err:
            # State that does not look like Adam's only shows once stepping: stop watching it, once.
            self._drop(tracked, str(err))
            return
        if result is None:
            tracked.hook_skips += 1  # skipped step (GradScaler): the optimizer's step count did not move
            return
        rows, step = result
        self._check_configuration(tracked, step)
        if tracked.reader.unverified:
            tracked.unverified += 1  # what this step did may not be Adam's: its rows may be wrong
            return
        tracked.applied += 1
        if tracked.rules is None or len(tracked.rules.names) != rows.shape[0]:
            self._drain(tracked, wait=True)  # earlier steps go to the rules they were made for
            tracked.rules = _rules_for(tracked, self._named, self.options.thresholds, tracked.rules)
        tracked.unchecked.append((step, self._axis(step), HostCopy(rows), _tensor_lrs(tracked.reader, len(rows))))
        tracked.accumulate(rows, step)
        tracked.sharpness.observe(tracked.reader, step)
        if tracked.applied == 1:
            self._write_status()  # a run killed before its first log point has still stepped
        every = self.options.log_every_n_steps
        log_now = every is not None and step % every == 0
        # A log point's transfer waits for the device anyway: the rules then see every step in flight.
        self._drain(tracked, wait=self.options.blocking or log_now)
        if log_now:
            self._flush_one(tracked, step)

    def _drain(self, tracked: _Tracked, *, wait: bool) -> None:
        """Run the rules on the steps whose rows have reached the host, in step order (all of
        them with ``wait``), and hand their alerts to the policy."""
        while tracked.unchecked and (wait or tracked.unchecked[0][2].ready()):
            step, x, copy, lrs = tracked.unchecked.popleft()
            self._policy.handle(tracked.rules.observe(step, copy.wait(), lrs), x)

    def check_alerts(self) -> list[Alert]:
        """Run the rules on every step they have not seen yet (``blocking_alerts=False`` on CUDA
        keeps the last step or two in flight); returns the alerts this found."""
        before = len(self.alerts)
        for tracked in self._tracked:
            self._drain(tracked, wait=True)
        return self.alerts[before:]

    def _drop(self, tracked: _Tracked, reason: str) -> None:
        self._drain(tracked, wait=True)
        warn(
            f"adam-monitor stopped monitoring {type(tracked.optimizer).__name__}: {reason}. "
            "Training goes on; nothing more is logged for it."
        )
        tracked.unhook()
        self._tracked.remove(tracked)
        self._unmonitored.append({"class": type(tracked.optimizer).__name__, "reason": reason})
        self._write_status()

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

    # ------------------------------------------------------------------ rules and configuration
    def check_configuration(self) -> list[Alert]:
        """Run the configuration rules (β1² ≥ β2, β1 ≥ β2) now; they also run at the first step."""
        found = []
        for tracked in self._tracked:
            found += self._check_configuration(tracked, tracked.step + 1, at_step=False)
        return found

    def _check_configuration(self, tracked: _Tracked, step: int, at_step: bool = True) -> list[Alert]:
        """The configuration rules for the betas now, against those of the last check
        (:func:`~adam_monitor.alerts.configuration.scheduled_configuration_alerts`)."""
        groups = tracked.optimizer.param_groups
        betas = [tracked.reader.betas(g) for g in groups]
        previous = tracked.betas
        if betas == previous and not any(tracked.coupled_pending):
            return []
        if previous is not None and betas != previous:
            self._drain(tracked, wait=True)  # the steps taken so far are judged with their own betas
            tracked.give_rules_betas(betas)
        tracked.betas = betas
        checked = [b if _bounded_by_adam(g) else None for b, g in zip(betas, groups)]
        before = previous if previous is not None else tracked.start_betas or []
        found, tracked.coupled_pending = scheduled_configuration_alerts(
            checked, before, optimizer=tracked.label, step=step, at_step=at_step
        )
        fresh, self._config_seen = _configuration_episodes(tracked.label, found, self._config_seen)
        self._policy.handle(fresh, self._axis(step))
        return fresh

    def _axis(self, step: int) -> int:
        """The x-axis value of the current step (``step_axis``, else the optimizer's step)."""
        return self._step_axis() if self._step_axis is not None else step

    @property
    def alerts(self) -> list[Alert]:
        """Every alert raised so far, in order."""
        return self._policy.alerts

    @property
    def stop_alerts(self) -> list[Alert]:
        """Alerts that asked the run to stop (``on_alert="stop"``)."""
        return self._policy.stop_alerts

    @property
    def alerts_file(self) -> str | None:
        """Path of ``alerts.jsonl`` (``None`` without a log folder, or on ranks other than zero)."""
        return self._policy.alerts_file

    @property
    def should_stop(self) -> bool:
        """True once an alert at or above ``fail_on`` fired under ``on_alert="stop"``."""
        return bool(self._policy.stop_alerts)

    def summary(self) -> str:
        """A table of every alert so far."""
        self.check_alerts()
        return summary_table(self.alerts, where=self.alerts_file)

    # ------------------------------------------------------------------ log points
    def compute(self) -> dict[str, float]:
        """The diagnostics pooled since the last flush, as ``{tag: value}`` (one host transfer each)."""
        self.check_alerts()
        metrics: dict[str, float] = {}
        for tracked in self._tracked:
            metrics.update(self._metrics(tracked)[0])
        return metrics

    def _metrics(self, tracked: _Tracked) -> tuple[dict[str, float], dict[str, list[tuple[float, str]]]]:
        return tracked.log_point(self._named, alert_count=len(self.alerts), per_parameter=self.options.per_parameter)

    def flush(self, step: int | None = None) -> dict[str, float]:
        """Write everything accumulated since the last flush; returns what was written.

        ``step`` is the x-axis value (default: each optimizer's own step count).
        """
        written: dict[str, float] = {}
        for tracked in self._tracked:
            self._drain(tracked, wait=True)  # the alert count written below includes every step
            written.update(self._flush_one(tracked, step))
        return written

    def _flush_one(self, tracked: _Tracked, step: int | None) -> dict[str, float]:
        metrics, worst = self._metrics(tracked)
        if not metrics:
            return {}
        x = tracked.step if step is None else step
        self._sink.write_layout({t.prefix: t.parameter_names(self._named) for t in self._tracked})
        histograms = _histograms(tracked, self._named) if self.options.histograms else ()
        if self._sink.write(tracked.prefix, metrics, x, worst=worst, histograms=histograms):
            tracked.sums.zero_()  # else the next log point pools these steps too
            tracked.pending_steps = 0
            tracked.sharpness.clear()
        self._write_status()  # and alerts a failed write left pending
        return metrics

    # ------------------------------------------------------------------ lifecycle
    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [t.optimizer for t in self._tracked]

    def _write_status(self, *, closed: bool = False) -> None:
        self._policy.log.write_status(_run_status(self._tracked, self._unmonitored, closed=closed))

    def close(self, *, raise_on_stop: bool = True) -> None:
        """Write what is pending, remove the hooks, flush the writer. Idempotent.

        Under ``on_alert="stop"``, raises :class:`InstabilityError` after everything is written if
        an alert asked the run to stop, so a script ends with a non-zero exit status.
        """
        try:
            for tracked in self._tracked:
                self._drain(tracked, wait=True)
                if tracked.pending_steps:
                    self._flush_one(tracked, None)
            self._write_status(closed=True)
            self._policy.close()
        finally:  # an alert raised on the last steps still leaves the optimizers unhooked
            for tracked in self._tracked:
                tracked.unhook()
            self._sink.flush()
        if raise_on_stop and self._policy.stop_alerts:
            note = self._policy.unwritten_note()
            raise InstabilityError(self._policy.take_stop_alerts(), where=self.alerts_file, note=note)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(raise_on_stop=exc_type is None)

    def state_dict(self) -> dict:
        """Accumulated sums and step counts, so a resumed run logs what an uninterrupted one would."""
        self.check_alerts()  # the rules' state must include every step the sums do
        return {
            "version": 1,
            "optimizers": [t.state_dict() for t in self._tracked],
            "alerts": [a.to_dict() for a in self.alerts],
            "configuration_seen": sorted(self._config_seen),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`. A state that does not fit raises ``ValueError`` and changes nothing."""
        try:
            saved = {entry["prefix"]: entry for entry in state.get("optimizers", [])}
            alerts = [Alert.from_dict(d) for d in state.get("alerts", [])]
            seen = {_episode_key(k) for k in state.get("configuration_seen", [])}
            rules = {
                t.prefix: _saved_rules(t, saved[t.prefix], self._named, self.options)
                for t in self._tracked
                if t.prefix in saved
            }
            staged = [(t, t.loaded(saved[t.prefix], rules[t.prefix])) for t in self._tracked if t.prefix in rules]
        except (AttributeError, KeyError, TypeError) as err:
            raise ValueError(
                f"Monitor.load_state_dict: not a Monitor.state_dict() ({type(err).__name__}: {err})"
            ) from None
        for tracked, values in staged:
            vars(tracked).update(values)
        self._policy.load(alerts)
        self._config_seen = seen
