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


@pytest.mark.parametrize(
    "make", [lambda ps: torch.optim.AdamW(ps, lr=1e-2), lambda ps: torch.optim.Adam(ps, weight_decay=0.1, amsgrad=True)]
)
def test_complex_parameters_are_measured_as_their_real_view(make):
    # torch Adam steps a complex tensor as its real view; the same run on that view is the oracle.
    torch.manual_seed(0)
    z = torch.nn.Parameter(torch.randn(64, 33, dtype=torch.complex64))
    r = torch.nn.Parameter(torch.view_as_real(z.detach()).clone())
    runs = []
    for p in (z, r):
        opt = make([p])
        monitor = Monitor(opt, named_parameters=[("w", p)], log_every_n_steps=None)
        gen = torch.Generator().manual_seed(1)
        for t in range(12):
            g = torch.randn(64, 33, 2, generator=gen) * (8.0 if t >= 8 else 1.0)
            p.grad = torch.view_as_complex(g) if p.is_complex() else g
            opt.step()
        runs.append(monitor.compute())
        monitor.close()
    torch.testing.assert_close(torch.view_as_real(z.detach()), r.detach())  # the same run
    assert runs[0].keys() == runs[1].keys()
    for tag in runs[1]:
        assert runs[0][tag] == pytest.approx(runs[1][tag], rel=1e-6, abs=1e-12), tag
