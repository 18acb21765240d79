"""adam/preconditioned_sharpness: the estimate the engine logs, against the Rayleigh quotient of the
preconditioned Hessian on a quadratic, and when it is taken."""

import pytest
import torch

from adam_monitor import Monitor
from adam_monitor.diagnostics.sharpness import edge_of_stability

TAG = "adam/preconditioned_sharpness"


def quadratic_run(*, sharpness_every, log_every, steps=40, cls=torch.optim.Adam, lr=1e-2, betas=(0.9, 0.999), n=64):
    """Torch Adam on L = ½ θᵀHθ, full batch; per log point what the monitor wrote, and per step the
    float64 oracle η·u·Hu/u·Pu along the update of that step, over the edge."""
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    hessian = q @ torch.diag(torch.logspace(-2, 1, n, dtype=torch.float64)) @ q.T
    theta = torch.nn.Parameter(torch.randn(n, generator=gen))
    opt = cls([theta], lr=lr, betas=betas, eps=1e-8)
    monitor = Monitor(opt, named_parameters=[("theta", theta)], log_every_n_steps=None, sharpness_every=sharpness_every)
    written, oracle = {}, {}
    b1, b2 = betas
    for t in range(1, steps + 1):
        theta.grad = (hessian @ theta.detach().double()).float()
        opt.step()
        if t % log_every == 0:
            written[t] = monitor.flush(t).get(TAG)
        if cls is torch.optim.Adam:
            st = opt.state[theta]
            m_hat = st["exp_avg"].double() / (1 - b1**t)
            p = (st["exp_avg_sq"].double() / (1 - b2**t)).sqrt() + 1e-8
            u = m_hat / p
            oracle[t] = float(lr * (u @ hessian @ u) / (u @ (p * u))) / edge_of_stability(b1)
    monitor.close()
    return written, oracle


def test_every_step_the_logged_estimate_is_the_quotient_along_the_previous_update():
    written, oracle = quadratic_run(sharpness_every=1, log_every=1)
    assert written[1] is None  # one step: no previous update to measure along
    for t in range(2, 41):
        assert written[t] == pytest.approx(oracle[t - 1], rel=2e-3, abs=1e-6), t


def test_sampled_on_the_two_steps_ending_at_each_multiple_and_written_once():
    every_step, _ = quadratic_run(sharpness_every=1, log_every=1)
    sampled, _ = quadratic_run(sharpness_every=10, log_every=5)
    assert {t for t, v in sampled.items() if v is not None} == {10, 20, 30, 40}
    for t in (10, 20, 30, 40):
        assert sampled[t] == pytest.approx(every_step[t], rel=1e-12)


def test_not_estimated_when_off_or_for_another_direction():
    off, _ = quadratic_run(sharpness_every=None, log_every=10)
    nadam, _ = quadratic_run(sharpness_every=1, log_every=1, cls=torch.optim.NAdam)
    assert set(off.values()) == {None} and set(nadam.values()) == {None}


def test_the_option_is_checked():
    with pytest.raises(ValueError, match="sharpness_every"):
        Monitor(torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))]), sharpness_every=0)
