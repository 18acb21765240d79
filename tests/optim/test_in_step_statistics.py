"""Every adam_monitor.optim variant under the monitor: statistics from inside its own step."""

import math

import pytest
import torch
from support import no_warnings

from adam_monitor import Monitor
from adam_monitor.optim import Adam, AdamAtan2, AdamD, LaProp, StableAdamW

VARIANTS = {
    "Adam": lambda ps: Adam(ps, lr=1e-3, betas=(0.9, 0.95), momentum_bias_correction=True),
    "AdamD": lambda ps: AdamD(ps, lr=1e-3, betas=(0.9, 0.95)),
    "LaProp": lambda ps: LaProp(ps, lr=1e-3, betas=(0.9, 0.95)),
    "AdamAtan2": lambda ps: AdamAtan2(ps, lr=1e-3, betas=(0.9, 0.95)),
    "StableAdamW": lambda ps: StableAdamW(ps, lr=1e-3, betas=(0.9, 0.95)),
}
# Steady-state update RMS on i.i.d. N(0, 1) gradients, β1 = 0.9: √((1-β1)/(1+β1)) = 0.229 for the
# Adam direction and LaProp's (momentum of unit-variance normalized gradients); atan2 maps
# r = m̂/√v̂ to 1.27·atan(r), about 1.27·0.226 = 0.287 at that small r.
EXPECTED_RMS = {"Adam": 0.229, "AdamD": 0.229, "LaProp": 0.229, "AdamAtan2": 0.287, "StableAdamW": 0.229}


@pytest.mark.parametrize("name", VARIANTS)
def test_variants_report_their_own_direction_on_pure_noise(name):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(4096))
    opt = VARIANTS[name]([p])
    monitor = Monitor(opt, named_parameters=[("w", p)], log_every_n_steps=None)
    assert opt.record_statistics  # the monitor asked for in-step statistics: no second pass
    for t in range(1, 601):
        p.grad = torch.randn(4096)
        before = p.detach().clone()
        opt.step()
        if t == 500:
            monitor.flush()  # what follows pools steps 501..600: steady state
    applied_rms = ((before - p.detach()) / 1e-3).pow(2).mean().sqrt().item()
    values = monitor.flush()
    monitor.close()
    assert values["adam/update_rms"] == pytest.approx(EXPECTED_RMS[name], abs=0.015)
    assert values["adam/staleness"] == pytest.approx(0.98, abs=0.02)
    assert math.isfinite(values["adam/gradient_jump"]) and values["adam/eps_dominance"] == 0.0
    # The reported direction is the one applied (no weight decay here): last step's RMS agrees.
    assert applied_rms == pytest.approx(values["adam/update_rms"], rel=0.1)
    assert not opt.record_statistics  # released at close


def test_stable_adamw_clips_what_the_monitor_sees_as_stale():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(2048))
    opt = StableAdamW([p], lr=1e-3, betas=(0.9, 0.999))
    monitor = Monitor(opt, log_every_n_steps=None)
    for t in range(1, 1506):
        p.grad = torch.randn(2048) * (10.0 if t >= 1500 else 1.0)
        opt.step()
        if t == 1499:
            monitor.flush()
    after = monitor.flush()
    monitor.close()
    # Staleness ~9 after the jump; the clipped update stays at most one RMS unit per coordinate.
    assert after["adam/staleness"] > 5
    assert after["adam/update_rms"] < 1.0


def test_coupled_betas_are_no_error_for_directions_bounded_whatever_the_betas():
    p = torch.nn.Parameter(torch.zeros(16))
    for make, errors in (
        (lambda: LaProp([p], betas=(0.99, 0.95)), 0),
        (lambda: AdamAtan2([p], betas=(0.99, 0.95)), 0),
        (lambda: Adam([p], betas=(0.99, 0.95), allow_unstable_betas=True), 1),
    ):
        opt = make()
        monitor = Monitor(opt, log_every_n_steps=None)
        with pytest.warns() if errors else no_warnings():
            monitor.check_configuration()
        assert [a.rule for a in monitor.alerts] == ["beta_coupling"] * errors
        monitor.close()


@pytest.mark.parametrize("name", VARIANTS)
def test_histograms_show_each_variants_own_direction(name, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from adam_monitor.cli.events import event_dirs

    torch.manual_seed(0)
    # float64: the step over lr is read back from a parameter change of lr's size
    w = torch.nn.Parameter(torch.randn(64, 32, dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(32, dtype=torch.float64))
    opt = VARIANTS[name]([w, b])
    writer = SummaryWriter(str(tmp_path))
    monitor = Monitor(opt, named_parameters=[("w", w), ("b", b)], writer=writer, log_every_n_steps=5, histograms=True)
    for _ in range(5):
        before = w.detach().clone()
        w.grad, b.grad = torch.randn_like(w) * 3, torch.randn_like(b)
        opt.step()
    monitor.close()
    # The step over lr is the direction (no weight decay here): what the histogram must show.
    torch.testing.assert_close(opt.direction(w), (before - w.detach()) / 1e-3, rtol=1e-9, atol=1e-9)
    from tensorboard.backend.event_processing.event_accumulator import HISTOGRAMS, EventAccumulator

    (run,) = event_dirs(tmp_path)
    acc = EventAccumulator(str(run), size_guidance={HISTOGRAMS: 0})
    acc.Reload()
    assert sorted(acc.Tags()["histograms"]) == ["adam/update/b", "adam/update/w"]
    (event,) = acc.Histograms("adam/update/w")
    assert event.step == 5 and event.histogram_value.num == w.numel()
