import math

import pytest
import torch

from adam_monitor.diagnostics.sharpness import curvature_sums, edge_of_stability, preconditioned_sharpness


def quadratic_run(betas, lr, steps, eps=1e-8, n=64, seed=0):
    """Torch Adam on L = ½ θᵀHθ (full batch, float32): per step the curvature sums read from the state,
    and the float64 oracle η·u·Hu/u·Pu along the update it took (u = m̂/(√v̂+ε) kept from that step)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    hessian = q @ torch.diag(torch.logspace(-2, 1, n, dtype=torch.float64)) @ q.T
    theta = torch.nn.Parameter(torch.randn(n, generator=gen))
    opt = torch.optim.Adam([theta], lr=lr, betas=betas, eps=eps)
    b1, b2 = betas
    sums, oracle = [], []
    for t in range(1, steps + 1):
        theta.grad = (hessian @ theta.detach().double()).float()
        opt.step()
        st = opt.state[theta]
        sums.append(
            curvature_sums([theta.grad], [st["exp_avg"]], [st["exp_avg_sq"]], beta1=b1, beta2=b2, eps=eps, step=t)
        )
        m_hat = st["exp_avg"].double() / (1 - b1**t)
        p = (st["exp_avg_sq"].double() / (1 - b2**t)).sqrt() + eps
        u = m_hat / p
        oracle.append(lr * (u @ hessian @ u) / (u @ (p * u)))
    return sums, oracle, hessian


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.9, 0.95), (0.5, 0.9)])
def test_the_estimate_is_the_rayleigh_quotient_of_the_preconditioned_hessian_on_a_quadratic(betas):
    sums, oracle, _ = quadratic_run(betas, lr=1e-2, steps=60)
    for t in range(2, 60):
        estimate = float(preconditioned_sharpness(sums[t - 2][0], sums[t - 1][0]))
        # the update of step t-1, measured through the gradient change it caused at step t
        assert estimate == pytest.approx(float(oracle[t - 2]), rel=2e-3, abs=1e-4), t


def test_the_estimate_never_exceeds_the_sharpest_direction():
    sums, _, hessian = quadratic_run((0.9, 0.999), lr=1e-2, steps=80, seed=1)
    theta_sums = torch.stack([s[0] for s in sums])
    estimates = preconditioned_sharpness(theta_sums[:-1], theta_sums[1:])
    assert torch.isfinite(estimates).all()
    assert estimates.max() <= 1e-2 * torch.linalg.eigvalsh(hessian).max() / 1e-8  # loose: P ≥ ε


def test_a_converging_run_climbs_to_the_edge_of_stability_and_stays_there():
    # Full batch, eps 1e-12: as the gradient vanishes, sqrt(v_hat) decays, the effective lr grows, and
    # the preconditioned sharpness climbs from ~0 to the edge (2+2β1)/(1-β1) = 38, where Adam's
    # momentum iteration oscillates and holds it (the adaptive edge of stability, Cohen et al. 2022).
    sums, _, _ = quadratic_run((0.9, 0.99), lr=0.1, steps=1500, eps=1e-12)
    pooled = torch.stack([s[0] for s in sums])
    estimates = preconditioned_sharpness(pooled[:-1], pooled[1:])
    edge = edge_of_stability(0.9)
    assert float(estimates[100:300].max()) < 0.1 * edge
    late = estimates[-500:]
    assert 0.8 * edge < float(late.max()) < 1.3 * edge
    assert float(late.median()) > 0.5 * edge


def test_step_one_and_no_momentum():
    g, m, v = torch.ones(4), torch.full((4,), 0.1), torch.full((4,), 0.001)
    first = curvature_sums([g], [m], [v], beta1=0.9, beta2=0.999, eps=1e-8, step=1)
    assert first[0, 1] == 0 and first[0, 0] > 0 and first[0, 2] > 0
    no_momentum = curvature_sums([g], [g], [g * g], beta1=0.0, beta2=0.999, eps=1e-8, step=3)
    assert math.isnan(no_momentum[0, 1])
    assert edge_of_stability(0.9) == pytest.approx(38.0)
