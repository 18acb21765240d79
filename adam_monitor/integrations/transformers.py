"""``AdamMonitorCallback``: the Hugging Face ``Trainer`` adapter around :class:`adam_monitor.Monitor`.

No math lives here: the callback hands the Trainer's optimizer and model to the engine, puts its
records on the Trainer's ``state.global_step`` axis, and turns a stop request into
``control.should_training_stop``.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import socket

import torch
from transformers import TrainerCallback

from .._faults import warn
from ..alerts.records import Alert, InstabilityError, InstabilityWarning, Thresholds
from ..engine.monitor import Monitor
from ..engine.names import unwrap_optimizer
from ..engine.options import FailOn, MonitorOptions, OnAlert

__all__ = ["AdamMonitorCallback"]


def _tensorboard_folder(args) -> str:
    """The folder the Trainer's ``TensorBoardCallback`` writes to, read the way it reads it."""
    folder = getattr(args, "logging_dir", None)  # transformers < 5
    if folder:
        return folder
    folder = os.environ.get("TENSORBOARD_LOGGING_DIR")  # transformers >= 5
    if folder:
        return os.path.expanduser(folder)
    # Else transformers >= 5 names the folder output_dir/runs/<time>_<host> when its callback,
    # which runs before any callback the user adds, opens its writer: find that writer's file.
    return _newest_event_folder(os.path.join(args.output_dir, "runs")) or args.output_dir


def _newest_event_folder(root: str) -> str | None:
    """The folder under ``root`` of the newest event file this process wrote there (torch's
    ``SummaryWriter`` names its files ``events.out.tfevents.<time>.<host>.<pid>.<n>``)."""
    mine = re.compile(rf"\.{re.escape(socket.gethostname())}\.{os.getpid()}\.\d+$")
    found = glob.glob(os.path.join(glob.escape(root), "**", "events.out.tfevents.*"), recursive=True)
    files = [f for f in found if mine.search(f)]
    return os.path.dirname(max(files, key=os.path.getmtime)) if files else None


class AdamMonitorCallback(TrainerCallback):
    """Log update RMS, second-moment staleness, gradient jump and ε-dominance of every optimizer
    step of a Hugging Face ``Trainer``, and act on instability alerts.

    Example::

        callback = AdamMonitorCallback()
        trainer = Trainer(model, args, train_dataset=data, callbacks=[callback])
        trainer.train()
        print(callback.monitor.summary())

    Works with the optimizer the Trainer builds (``optim="adamw_torch"``, ``"adamw_torch_fused"``,
    ...) and with one passed as ``optimizers=(optimizer, scheduler)``; the engine warns once about
    an optimizer it cannot read (not Adam-family) and training goes on unmonitored. Each record's
    x-axis value is the Trainer's ``state.global_step``: one record per optimizer step, also under
    gradient accumulation, continuing where a resumed run left off.

    Where files go (on the world's main process only):

    * With ``"tensorboard"`` in ``args.report_to``: scalars in an event file of the callback's own
      beside the Trainer's, in the Trainer's TensorBoard folder (``args.logging_dir`` before
      transformers 5; ``$TENSORBOARD_LOGGING_DIR``, else ``<output_dir>/runs/<time>_<host>``
      from 5 on), and alerts in ``<that folder>/adam_monitor/alerts.jsonl``.
    * Without it: no scalars are written (the last log point's values are in :attr:`metrics`,
      those since it in ``monitor.compute()``), alerts go to
      ``<args.output_dir>/adam_monitor/alerts.jsonl``.
    * ``log_dir`` replaces the folder in both cases.

    Args:
        log_every_n_steps: write every this many optimizer steps (default: when the Trainer logs,
            i.e. ``logging_steps``, ``logging_first_step``, ``logging_strategy``). Every step is
            measured; a written value pools all steps since the previous write.
        per_parameter: also write one scalar per parameter tensor and diagnostic.
        histograms: also write a histogram of each tensor's update direction (TensorBoard only).
        on_alert: ``"warn"`` (a Python warning; training goes on), ``"raise"``
            (``InstabilityError`` from ``optimizer.step`` at the alert's step, after the alert is
            written; it ends ``trainer.train()``), or ``"stop"`` (the step of the alert completes
            and its diagnostics are written, no checkpoint of the state after it is saved, then
            training ends as an early stop: ``train()`` returns, the alerts are warned about and
            listed in :attr:`stop_alerts`). A configuration alert (β1² ≥ β2) acts at
            ``on_train_begin``: ``"raise"`` before the first step, ``"stop"`` after it.
        fail_on: the lowest severity ``"raise"``/``"stop"`` act on: ``"error"`` or ``"warning"``.
        blocking_alerts: see :class:`~adam_monitor.engine.options.MonitorOptions`.
        thresholds: the step rules' thresholds (:class:`adam_monitor.Thresholds`).
        sharpness_every: estimate the preconditioned sharpness over Adam's edge of stability
            (``adam/preconditioned_sharpness``, 1 = the edge) on the two steps ending at each
            multiple of this many optimizer steps; ``None`` (default): never (each estimate costs
            several fused AdamW steps: see :class:`~adam_monitor.engine.options.MonitorOptions`).
        log_dir: the folder for the event file and ``adam_monitor/alerts.jsonl`` (default above).

    The engine, :attr:`monitor`, exists from ``on_train_begin`` on and stays readable (closed)
    after ``train()``.
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
        log_dir: str | os.PathLike | None = None,
    ):
        self.options = MonitorOptions.of(
            "AdamMonitorCallback",
            log_every_n_steps=log_every_n_steps,
            per_parameter=per_parameter,
            histograms=histograms,
            on_alert=on_alert,
            fail_on=fail_on,
            blocking_alerts=blocking_alerts,
            thresholds=thresholds,
            sharpness_every=sharpness_every,
        )
        if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"AdamMonitorCallback(log_dir=...) must be a path, got {type(log_dir).__name__}")
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        #: The engine (from ``on_train_begin`` on).
        self.monitor: Monitor | None = None
        #: What the last log point wrote, ``{tag: value}``.
        self.metrics: dict[str, float] = {}
        self._writer = None
        self._state = None  # the TrainerState of the train() being monitored
        self._closed = True  # no open monitor (none yet, or closed)
        self._waiting = False  # in train(), its optimizer not yet seen
        self._stopped = False

    @property
    def alerts(self) -> list[Alert]:
        """Every alert of the current (or last) ``train()``."""
        return self.monitor.alerts if self.monitor is not None else []

    @property
    def stop_alerts(self) -> list[Alert]:
        """The alerts that stopped training (``on_alert="stop"``)."""
        return self.monitor.stop_alerts if self.monitor is not None else []

    # ------------------------------------------------------------------ attaching
    def on_train_begin(self, args, state, control, **kwargs):
        self._close()  # one left open by a train() that ended in an exception
        self._waiting = True
        if kwargs.get("optimizer") is not None:
            self._attach(args, state, kwargs)

    def on_step_begin(self, args, state, control, **kwargs):
        # The optimizer is there at on_train_begin in the transformers versions this supports;
        # the first step is the latest point to hook it before it steps.
        if self._waiting and kwargs.get("optimizer") is not None:
            self._attach(args, state, kwargs)

    def _attach(self, args, state, kwargs) -> None:
        self._waiting = False
        optimizer = unwrap_optimizer(kwargs["optimizer"])
        if not isinstance(optimizer, torch.optim.Optimizer):  # DeepSpeed's, for one
            warn(
                f"adam-monitor is not monitoring {type(optimizer).__name__}: not a torch.optim.Optimizer. "
                "Training goes on; nothing is logged for it."
            )
            return
        model = kwargs.get("model")
        folder, writer = self._sinks(args, state)
        self.monitor = Monitor(
            optimizer,
            named_parameters=model.named_parameters() if model is not None else None,
            writer=writer,
            log_dir=folder,
            # The hook runs inside optimizer.step, before the Trainer counts the step.
            step_axis=lambda: state.global_step + 1,
            # The callback writes on the Trainer's step axis, not the optimizer's own count.
            options=dataclasses.replace(self.options, log_every_n_steps=None),
        )
        self._state, self._closed, self._stopped, self.metrics = state, False, False, {}
        # Under "raise" an alert here ends train() before its first step; under "stop" after it
        # (on_step_end), the earliest point the Trainer checks should_training_stop.
        self.monitor.check_configuration()

    def _sinks(self, args, state):
        """``(folder, writer)``: where alerts and scalars go; nothing but on the main process."""
        if not state.is_world_process_zero:
            return None, None
        tensorboard = "tensorboard" in (args.report_to or [])
        folder = self.log_dir
        if folder is None:
            folder = _tensorboard_folder(args) if tensorboard else args.output_dir
        if not tensorboard:
            return folder, None
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(folder, filename_suffix=".adam_monitor")
        return folder, self._writer

    # ------------------------------------------------------------------ steps
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # Every attempt, also those a GradScaler then skips: the skip count needs it.
        if not self._closed and kwargs.get("optimizer") is not None:
            self.monitor.note_step_attempt(unwrap_optimizer(kwargs["optimizer"]))

    def on_step_end(self, args, state, control, **kwargs):
        if self._closed:
            return
        every = self.options.log_every_n_steps
        due = control.should_log if every is None else state.global_step % every == 0
        if due or self.monitor.should_stop:
            self.metrics = self.monitor.flush(step=state.global_step) or self.metrics
        self._stop_if_asked(state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self._closed:
            return
        if self.options.log_every_n_steps is None and control.should_log:  # logging_strategy="epoch"
            self.metrics = self.monitor.flush(step=state.global_step) or self.metrics
        self._stop_if_asked(state, control)

    def _stop_if_asked(self, state, control) -> None:
        if not self.monitor.should_stop:
            return
        control.should_training_stop = True
        control.should_save = False  # the last checkpoint stays the last one from before the alert
        if not self._stopped:
            self._stopped = True
            error = InstabilityError(self.monitor.stop_alerts, where=self.monitor.alerts_file)
            warn(f"{error}\nTraining stops at step {state.global_step}.", InstabilityWarning)

    # ------------------------------------------------------------------ end
    def on_train_end(self, args, state, control, **kwargs):
        self._close()

    def _close(self) -> None:
        """Write what is pending at ``global_step``, unhook the optimizer, close the writer. Once."""
        if self._closed:
            return
        self._closed = True
        try:
            self.metrics = self.monitor.flush(step=self._state.global_step) or self.metrics
            self.monitor.close(raise_on_stop=False)  # "stop" has already ended training
        finally:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
