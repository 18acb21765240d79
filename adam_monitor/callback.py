"""``AdamMonitor``: the Lightning adapter around :class:`adam_monitor.Monitor`. No math lives here."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from ._faults import warn
from ._runtime import is_rank_zero
from .alerts.records import Alert, InstabilityError, InstabilityWarning, Thresholds
from .engine.monitor import Monitor
from .engine.options import FailOn, MonitorOptions, OnAlert
from .engine.tensorboard import write_scalars

__all__ = ["AdamMonitor"]


def _lightning_step(trainer: pl.Trainer) -> int:
    # The x-axis value Lightning itself gives metrics logged in this batch.
    return trainer.fit_loop.epoch_loop._batches_that_stepped


class AdamMonitor(Callback):
    """Log update RMS, second-moment staleness, gradient jump and ε-dominance of every Adam step.

    Example::

        trainer = Trainer(callbacks=[AdamMonitor()], logger=TensorBoardLogger("runs"))

    Args:
        log_every_n_steps: how often to write (default: the trainer's ``log_every_n_steps``). Every
            optimizer step is measured; a written value pools all steps since the previous write.
        per_parameter: also write one scalar per parameter tensor and diagnostic.
        histograms: also write a histogram of each tensor's update direction (TensorBoard only).
        on_alert: ``"warn"`` (a Python warning, the run goes on; a rule's repeats are summed up in
            one line at most every 100 steps), ``"raise"`` (``InstabilityError``
            at the step of the alert, on every rank, after the alert is written) or ``"stop"``
            (the current batch ends and the logs are written, then ``fit`` ends in
            ``InstabilityError`` at that batch's end, before any checkpoint of the state after the
            alert is saved: the last good checkpoint is never replaced, and the error names it).
        fail_on: the lowest severity that ``"raise"``/``"stop"`` act on: ``"error"`` (default) or
            ``"warning"``. Lower-severity alerts are still written and warned about.
        blocking_alerts: whether the rules see each step's statistics before the step returns (one
            host sync per step on a GPU). Default: not under ``on_alert="warn"`` (alerts come a step
            or two late, naming their own step), yes under ``"raise"`` and ``"stop"``. See
            :class:`~adam_monitor.Monitor`.
        thresholds: the step rules' thresholds (:class:`adam_monitor.alerts.Thresholds`).
        sharpness_every: estimate the preconditioned sharpness over Adam's edge of stability
            (``adam/preconditioned_sharpness``, 1 = the edge) on the two steps ending at each
            multiple of this many optimizer steps; ``None`` (default): never (each estimate costs
            several fused AdamW steps: see :class:`~adam_monitor.engine.options.MonitorOptions`).

    Every alert is appended to ``<run folder>/adam_monitor/alerts.jsonl`` (see :func:`run_folder`)
    and written to TensorBoard as text; ``alerts`` lists them.
    """

    def __init__(
        self,
        *,
        log_every_n_steps: int | None = None,
        per_parameter: bool = True,
        histograms: bool = False,
        on_alert: OnAlert = "warn",
        fail_on: FailOn = "error",
        blocking_alerts: bool | None = None,
        thresholds: Thresholds | None = None,
        sharpness_every: int | None = None,
    ):
        # The keywords are spelled out (not **options) so that LightningCLI and IDEs see them.
        super().__init__()
        self.options = MonitorOptions.of(
            "AdamMonitor",
            log_every_n_steps=log_every_n_steps,
            per_parameter=per_parameter,
            histograms=histograms,
            on_alert=on_alert,
            fail_on=fail_on,
            blocking_alerts=blocking_alerts,
            thresholds=thresholds,
            sharpness_every=sharpness_every,
        )
        self.monitor: Monitor | None = None
        self._alerts: list[Alert] = []
        self._loaded_state: dict | None = None
        self._final_state: dict | None = None  # the closed monitor's, for checkpoints saved after fit
        self._alerts_file: str | None = None
        self._trainer: pl.Trainer | None = None
        self._stepped = False  # an optimizer step was attempted in this batch

    @property
    def state_key(self) -> str:
        # Stable across versions and option changes, so checkpoints keep resuming.
        return "AdamMonitor"

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        self._final_state = None
        self._stepped = False
        writer = None
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                writer = logger.experiment
                break
        self.monitor = Monitor(
            trainer.optimizers,
            named_parameters=pl_module.named_parameters(),
            writer=writer,
            log_dir=run_folder(trainer),
            scalar_sink=self._log_scalars,
            step_axis=lambda: _lightning_step(trainer),
            # The callback decides when to write (the trainer's batches, not optimizer steps).
            options=dataclasses.replace(self.options, log_every_n_steps=None),
        )
        if self._loaded_state is not None:
            self.monitor.load_state_dict(self._loaded_state)
            self._loaded_state = None
        self.monitor.check_configuration()

    @property
    def alerts(self) -> list[Alert]:
        """Every alert raised so far in this fit (kept after it ends)."""
        return self.monitor.alerts if self.monitor is not None else self._alerts

    def check_alerts(self) -> list[Alert]:
        """Run the rules on the steps still on their way to the host (see ``Monitor.check_alerts``);
        returns the alerts this found. After ``fit`` every step has been checked: nothing is left."""
        return self.monitor.check_alerts() if self.monitor is not None else []

    def _log_scalars(self, metrics: dict[str, float], step: int) -> None:
        # One batch to the loggers: a `pl_module.log` call per scalar adds up over hundreds of tensors.
        for logger in self._trainer.loggers:
            if not _tensorboard_log_metrics(logger, metrics, step):
                logger.log_metrics(metrics, step=step)

    def _should_log(self, trainer: pl.Trainer) -> bool:
        # Only a batch that ended an accumulation window: under accumulate_grad_batches=k the step
        # axis stays put for k batches, and a write at each would give one x several values.
        stepped, self._stepped = self._stepped, False
        every = self.options.log_every_n_steps or trainer.log_every_n_steps
        if not every or not stepped:
            return trainer.should_stop
        return (_lightning_step(trainer) + 1) % every == 0 or trainer.should_stop

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        # Called for every attempt, also those a GradScaler then skips: the skip count needs it.
        self._stepped = True
        if self.monitor is not None:
            self.monitor.note_step_attempt(optimizer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.monitor is None:
            return
        if self._should_log(trainer) or self.monitor.should_stop:
            self.monitor.flush(step=_lightning_step(trainer))
        if self.monitor.should_stop:
            # Raised here, before ModelCheckpoint's hooks (Lightning runs them last) and the
            # epoch's end: no checkpoint of the state after the alert replaces the last good one.
            # Identical on every rank: the alerts come from identical state.
            raise InstabilityError(
                list(self.monitor.stop_alerts), where=self.monitor.alerts_file, note=_restore_note(trainer)
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None:
            self.monitor.flush(step=_lightning_step(trainer))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning does not call teardown on callbacks when fit fails: close here, so the hooks
        # come off the optimizer and the last steps' diagnostics and alerts are written. The
        # exception that ended fit is the one the user must see: an alert raised while closing
        # (under "raise") is recorded and warned, not raised over it.
        try:
            self._close(summary=True)
        except InstabilityError as err:
            warn(f"adam-monitor, closing after {type(exception).__name__}: {err}", InstabilityWarning)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        stop = self._close(summary=stage == "fit")
        if stop:
            # Last of all: logs and the alert file are written by now.
            raise InstabilityError(stop, where=self._alerts_file, note=_restore_note(trainer))

    def _close(self, *, summary: bool) -> list[Alert]:
        """Close the monitor once, keep its alerts and state; returns the alerts that ask to stop."""
        if self.monitor is None:
            return []
        monitor, self.monitor = self.monitor, None
        try:
            monitor.close(raise_on_stop=False)  # the rules see the last steps here
        finally:
            self._alerts = monitor.alerts
            self._alerts_file = monitor.alerts_file
            self._final_state = monitor.state_dict()
        if is_rank_zero() and summary:
            print(monitor.summary())
        return list(monitor.stop_alerts)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        if self.monitor is not None:
            return self.monitor.state_dict()
        return dict(self._final_state or {})  # trainer.save_checkpoint() after fit

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.monitor is not None:
            self.monitor.load_state_dict(state_dict)
        else:
            self._loaded_state = state_dict or None


def _tensorboard_log_metrics(logger, metrics: dict[str, float], step: int) -> bool:
    """``TensorBoardLogger.log_metrics(metrics, step)``, its scalars in one event (``write_scalars``);
    ``False``, having written nothing, where that would not be the same: another logger, a subclass
    or instance with a ``log_metrics`` of its own, tensors or dicts among the values (Lightning
    converts those itself), a Lightning without the prefix attributes read here."""
    # Lightning's log_metrics calls add_scalar once per tag, the cost write_scalars removes; it
    # also adds the logger's prefix (private `_prefix`, `_add_prefix`) and writes on rank zero only.
    if not isinstance(logger, TensorBoardLogger) or "log_metrics" in vars(logger):
        return False
    if type(logger).log_metrics is not TensorBoardLogger.log_metrics:
        return False
    try:
        from lightning.fabric.utilities.logger import _add_prefix
    except ImportError:
        return False
    prefix, separator = getattr(logger, "_prefix", None), getattr(logger, "LOGGER_JOIN_CHAR", None)
    if not isinstance(prefix, str) or not isinstance(separator, str):
        return False
    if any(isinstance(v, (torch.Tensor, dict)) for v in metrics.values()):
        return False
    if rank_zero_only.rank == 0:
        write_scalars(logger.experiment, _add_prefix(metrics, prefix, separator), step)
    return True


#: Under ``logger=False``, ``<default_root_dir>/RUNS_WITHOUT_LOGGER/version_<n>`` holds each run's alerts.
RUNS_WITHOUT_LOGGER = "adam_monitor_runs"


def run_folder(trainer: pl.Trainer) -> str:
    """A folder of this run alone, where ``adam_monitor/alerts.jsonl`` goes, named as Lightning
    names the run's own files: the first logger's ``log_dir`` for TensorBoard and CSV loggers
    (``lightning_logs/version_3``); for any other logger where Lightning puts its checkpoints,
    ``<save_dir>/<name>/<version>`` (MLflow: ``mlruns/<experiment id>/<run id>``; W&B:
    ``<project>/<run id>``; a logger without a local ``save_dir``, such as MLflow on sqlite,
    under ``default_root_dir``); with no logger the next free
    ``<default_root_dir>/adam_monitor_runs/version_<n>``. Never a folder that other runs share
    (``trainer.log_dir`` is, for all but TensorBoard and CSV): ``adam-monitor check`` would fail
    a clean run for an earlier run's alert. The same on every rank.
    """
    if trainer.loggers:
        logger = trainer.loggers[0]
        if isinstance(logger, (TensorBoardLogger, CSVLogger)):
            folder = logger.log_dir
        else:
            version = logger.version
            version = version if isinstance(version, str) else f"version_{version}"
            folder = os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), version)
    else:
        folder = _new_version(os.path.join(trainer.default_root_dir, RUNS_WITHOUT_LOGGER)) if is_rank_zero() else None
    return trainer.strategy.broadcast(folder)


def _new_version(root: str) -> str:
    """``<root>/version_<n>``, created, ``n`` one past the highest there (as TensorBoardLogger counts)."""
    os.makedirs(root, exist_ok=True)
    taken = [int(d[8:]) for d in os.listdir(root) if d.startswith("version_") and d[8:].isdigit()]
    n = max(taken, default=-1) + 1
    while True:  # another run may take the same number between listdir and mkdir
        folder = os.path.join(root, f"version_{n}")
        try:
            os.mkdir(folder)
            return folder
        except FileExistsError:
            n += 1


def _restore_note(trainer: pl.Trainer) -> str:
    """Which checkpoint to go back to: the newest one saved, all of them from before the alert."""
    saved = {
        path
        for cb in trainer.checkpoint_callbacks
        for path in (getattr(cb, "last_model_path", ""), getattr(cb, "best_model_path", ""))
        if path and os.path.isfile(path)
    }
    if not saved:
        return "No checkpoint had been saved before the alert, and none was saved after it."
    newest = max(saved, key=os.path.getmtime)
    return f"No checkpoint was saved after the alert; the newest, from before it: {newest}"
