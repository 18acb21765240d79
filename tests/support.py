"""What many tests share: a BoringModel with a configurable Adam, one quiet Trainer, a block in
which any warning fails the test, a monitored plain loop, and an update spike after a run."""

from __future__ import annotations

import contextlib
import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import TensorBoardLogger


def monitored_run(opt, model, steps):
    """``steps`` steps of ``model`` (8 inputs) on a squared output under a Monitor: (its values,
    the adam-monitor warnings)."""
    from adam_monitor import Monitor

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = Monitor(opt, named_parameters=model.named_parameters(), log_every_n_steps=None)
        for _ in range(steps):
            model(torch.randn(16, 8)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        values = monitor.compute()
        monitor.close()
    return values, [str(w.message) for w in caught if "adam-monitor" in str(w.message)]


def small_model() -> torch.nn.Module:
    """A seeded MLP of 8 inputs, the ones ``monitored_run`` feeds."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def assert_named_and_not_read(opt, model, says: str, steps: int = 20) -> None:
    """A Monitor of ``opt`` logs nothing (rather than numbers that are wrong) and warns once, saying ``says``."""
    values, messages = monitored_run(opt, model, steps)
    assert values == {}, "nothing logged rather than numbers that are wrong"
    assert len(messages) == 1 and says in messages[0], messages


def with_update_spike_at_the_end(rules, runs):
    """``rules`` observe ``runs`` of (step, rows, lrs); on the last, the first tensor's update RMS is
    5x its own (an update_rms_spike). Returns (the alerts before, the last step's)."""
    before = [a for step, rows, lrs in runs[:-1] for a in rules.observe(step, rows, lrs)]
    step, rows, lrs = runs[-1]
    rows = rows.clone()
    rows[0, 0] *= 25.0
    return before, rules.observe(step, rows, lrs)


@contextlib.contextmanager
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


class AdamBoring(BoringModel):
    """BoringModel trained by ``optimizer(params, lr=lr, betas=betas, **options)`` on fixed data, 6
    batches an epoch (a run resumed at step 6 starts a fresh epoch on the same data); logs ``loss``."""

    def __init__(self, betas=(0.9, 0.95), *, optimizer=torch.optim.AdamW, lr=1e-2, **options):
        super().__init__()
        self.betas, self.optimizer, self.lr, self.options = betas, optimizer, lr, options

    def training_step(self, batch, batch_idx):
        loss = self.step(batch)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return self.optimizer(self.parameters(), lr=self.lr, betas=self.betas, **self.options)

    def train_dataloader(self):
        data = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(data, batch_size=1)


def quiet_trainer(tmp_path, *, callbacks, max_steps, name="run", **kwargs) -> L.Trainer:
    """A CPU Trainer with no progress bar, summary or validation, logging to TensorBoard under
    ``tmp_path/name/version_0``; checkpointing only with a ``ModelCheckpoint`` among ``callbacks``."""
    kwargs.setdefault("enable_checkpointing", any(isinstance(c, ModelCheckpoint) for c in callbacks))
    return L.Trainer(
        default_root_dir=tmp_path,
        max_steps=max_steps,
        callbacks=callbacks,
        logger=TensorBoardLogger(tmp_path, name=name, version=0),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **kwargs,
    )
