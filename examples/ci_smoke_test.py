"""A CI smoke test: a few hundred steps of the real training set-up, failing on instability.

Run with pytest (``pytest examples/ci_smoke_test.py``). ``on_alert="raise"`` turns an instability
alert into ``InstabilityError`` at the step it fires, after writing it to alerts.jsonl.
"""

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from quickstart import Regressor, data

from adam_monitor import AdamMonitor
from adam_monitor.cli import main as adam_monitor_cli


def test_training_is_stable(tmp_path):
    torch.manual_seed(0)
    trainer = L.Trainer(
        max_steps=300,
        callbacks=[AdamMonitor(on_alert="raise", fail_on="warning")],
        logger=TensorBoardLogger(tmp_path, name="smoke"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Regressor(betas=(0.9, 0.95), lr=3e-3), data())
    assert adam_monitor_cli(["check", str(tmp_path)]) == 0
