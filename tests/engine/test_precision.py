"""Mixed precision: steps a GradScaler skipped are not steps, and scaled gradients never count."""

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision

from adam_monitor import AdamMonitor
from adam_monitor.cli.events import read_scalars


class AdamWBoring(BoringModel):
    def __init__(self, fused):
        super().__init__()
        self.fused = fused

    def training_step(self, batch, batch_idx):
        return self.step(batch)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3, betas=(0.9, 0.95), fused=self.fused)


@pytest.mark.parametrize("fused", [False, True])
def test_fp16_grad_scaler_skips_are_counted_not_measured(tmp_path, fused):
    # 2^40 overflows fp16 gradients: the scaler skips steps, halving its scale each time.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    trainer = L.Trainer(
        max_steps=40,
        log_every_n_steps=40,
        callbacks=[AdamMonitor()],
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        logger=TensorBoardLogger(tmp_path, name="run", version=0),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    model = AdamWBoring(fused)
    trainer.fit(model)
    skips = round(math.log2(2.0**40 / scaler.get_scale()))
    assert 5 < skips < 40
    applied = int(trainer.optimizers[0].state[model.layer.weight]["step"])
    assert applied == 40 - skips
    scalars = read_scalars(trainer.logger.log_dir)
    assert scalars["adam/skipped_steps"][-1][1] == skips
    # Unscaled gradients: a scaled one (×2^15 and more) would multiply both by the scale.
    # (gradient_jump is heavy-tailed over the first steps, staleness is bounded by √(1/(1-β2)).)
    assert all(v < 4.5 for _, v in scalars["adam/staleness"])
    assert all(v < 1e3 for _, v in scalars["adam/gradient_jump"])
