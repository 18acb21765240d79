"""``AdamMonitor``: the Lightning adapter around :class:`adam_monitor.Monitor`. No math lives here."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from .monitor import Monitor

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
    """

    def __init__(
        self,
        *,
        log_every_n_steps: int | None = None,
        per_parameter: bool = True,
        histograms: bool = False,
    ):
        super().__init__()
        if log_every_n_steps is not None and (not isinstance(log_every_n_steps, int) or log_every_n_steps < 1):
            raise ValueError(f"AdamMonitor(log_every_n_steps=...) must be a positive int, got {log_every_n_steps!r}")
        self.log_every_n_steps = log_every_n_steps
        self.per_parameter = per_parameter
        self.histograms = histograms
        self.monitor: Monitor | None = None
        self._loaded_state: dict | None = None
        self._trainer: pl.Trainer | None = None

    @property
    def state_key(self) -> str:
        # Stable across versions and option changes, so checkpoints keep resuming.
        return "AdamMonitor"

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        writer = None
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                writer = logger.experiment
                break
        self.monitor = Monitor(
            trainer.optimizers,
            named_parameters=pl_module.named_parameters(),
            writer=writer,
            log_every_n_steps=None,
            per_parameter=self.per_parameter,
            histograms=self.histograms,
            scalar_sink=self._log_scalars,
        )
        if self._loaded_state is not None:
            self.monitor.load_state_dict(self._loaded_state)
            self._loaded_state = None

    def _log_scalars(self, metrics: dict[str, float], step: int) -> None:
        # One batch to the loggers: a `pl_module.log` call per scalar costs ~1 ms each.
        for logger in self._trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _should_log(self, trainer: pl.Trainer) -> bool:
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if not every:
            return False
        return (_lightning_step(trainer) + 1) % every == 0 or trainer.should_stop

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.monitor is not None and self._should_log(trainer):
            self.monitor.flush(step=_lightning_step(trainer))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None:
            self.monitor.flush(step=_lightning_step(trainer))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {} if self.monitor is None else self.monitor.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.monitor is not None:
            self.monitor.load_state_dict(state_dict)
        else:
            self._loaded_state = state_dict
