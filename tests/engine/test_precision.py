"""Mixed precision: steps a GradScaler skipped are not steps, and scaled gradients never count."""

import math

import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from support import AdamBoring, quiet_trainer

from adam_monitor import AdamMonitor
from adam_monitor.cli.events import read_scalars


@pytest.mark.parametrize("fused", [False, True])
def test_fp16_grad_scaler_skips_are_counted_not_measured(tmp_path, fused):
    # 2^40 overflows fp16 gradients: the scaler skips steps, halving its scale each time.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    trainer = quiet_trainer(
        tmp_path,
        callbacks=[AdamMonitor()],
        max_steps=40,
        log_every_n_steps=40,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    model = AdamBoring(lr=1e-3, fused=fused)
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
