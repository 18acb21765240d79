"""Every configuration torch accepts runs under the monitor, with the right numbers and verdicts."""

import math

import pytest
import torch
from support import no_warnings

from adam_monitor import Monitor


@pytest.mark.parametrize(
    "betas, rules",
    [((0.9, 0.0), ["beta_coupling"]), ((0.5, 0.0), ["beta_coupling"]), ((0.0, 0.0), []), ((0.0, 0.999), [])],
)
def test_beta2_zero_and_beta1_zero_run_and_get_their_verdict(betas, rules):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(512))
    opt = torch.optim.Adam([p], betas=betas)
    with pytest.warns() if rules else no_warnings():
        monitor = Monitor(opt, named_parameters=[("w", p)], log_every_n_steps=None)
        for _ in range(10):
            p.grad = torch.randn(512)
            opt.step()
        metrics = monitor.compute()
        monitor.close()
    assert [a.rule for a in monitor.alerts] == rules
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    if betas == (0.0, 0.0):  # sign descent: every coordinate moves by exactly 1
        assert metrics["adam/update_rms"] == pytest.approx(1.0, rel=1e-6)
