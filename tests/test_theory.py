"""The closed forms of ``adam_monitor.theory`` against torch.optim.Adam runs, plain float64 sums
and the published figures (DESIGN §3). Oracles never call the function under test."""

from __future__ import annotations

import math
from decimal import Decimal, localcontext

import pytest
import torch

from adam_monitor import theory
from adam_monitor.theory import (
    asymptotic_bound,
    blowup_ratio,
    bound_table,
    edge_of_stability,
    jump_peak,
    jump_response,
    noise_level,
    staleness_ceiling,
    timescale,
    worst_case_bound,
)

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The tensors here are tiny: intra-op threads only add contention on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def adam_directions(grads, beta1, beta2, eps=0.0, optimizer=None):
    """Yield u_t = (p_{t-1} - p_t) / lr of torch.optim.Adam (lr = 1) for each gradient in ``grads``.

    The parameter is zeroed before every step: without weight decay Adam's state does not depend
    on it, and -p after the step is then the update itself, free of cancellation.
    ``optimizer=(opt, param)`` continues an existing run instead of starting one.
    """
    opt, param = optimizer if optimizer is not None else (None, None)
    for g in grads:
        if opt is None:
            param = torch.zeros_like(g, dtype=F64, requires_grad=True)
            opt = torch.optim.Adam([param], lr=1.0, betas=(beta1, beta2), eps=eps)
        with torch.no_grad():
            param.zero_()
        param.grad = g.to(F64).clone()
        opt.step()
        yield -param.detach().clone()


def reference_bound(beta1, beta2, t):
    """B_t by the explicit sum Σ_{k<t} γ^k, term by term (the plain definition)."""
    gamma = beta1**2 / beta2
    total = math.fsum(gamma**k for k in range(t))
    return (1 - beta1) / math.sqrt(1 - beta2) * math.sqrt(1 - beta2**t) / (1 - beta1**t) * math.sqrt(total)


# ---------------------------------------------------------------------------------------------
# worst-case bound B_t


@pytest.mark.parametrize(
    ("beta1", "beta2", "t"),
    [(b1, b2, t) for b1, b2 in [(0.9, 0.999), (0.9, 0.95), (0.95, 0.9), (0.9, 0.7)] for t in (1, 2, 10, 100)]
    + [(0.9, 0.999, 3000)],
)
def test_bound_is_attained_by_torch_adam(beta1, beta2, t):
    # Cauchy–Schwarz is tight for g_i ∝ (β1/β2)^{t-i}: the t-th update of torch Adam equals B_t.
    ratio = beta1 / beta2
    grads = (torch.tensor([ratio ** (t - i), -3.0 * ratio ** (t - i)], dtype=F64) for i in range(1, t + 1))
    *_, last = adam_directions(grads, beta1, beta2)
    bound = worst_case_bound(beta1, beta2, t)
    assert last[0].item() == pytest.approx(bound, rel=1e-9)
    assert last[1].item() == pytest.approx(-bound, rel=1e-9)  # scale and sign do not matter
    if t == 3000:
        assert round(bound, 2) == 7.09  # the Adam paper's bound (1-β1)/√(1-β2) ≈ 3.16 fails


@pytest.mark.parametrize(("beta1", "beta2"), [(0.9, 0.999), (0.9, 0.95), (0.95, 0.9), (0.9, 0.7), (0.5, 0.99)])
def test_random_gradients_never_exceed_bound(beta1, beta2):
    gen = torch.Generator().manual_seed(1234)
    n, steps = 256, 150
    # Gaussian, heavy-tailed, and near-worst-case (the extremal ramp with multiplicative noise).
    ramp = (beta2 / beta1) ** torch.arange(steps, dtype=F64)

    def gradients():
        for i in range(steps):
            gauss = torch.randn(n, dtype=F64, generator=gen)
            heavy = gauss * torch.exp(3.0 * torch.randn(n, dtype=F64, generator=gen))
            near = ramp[i] * (1.0 + 0.05 * torch.randn(n, dtype=F64, generator=gen))
            yield torch.cat([gauss, heavy, near])

    for t, u in enumerate(adam_directions(gradients(), beta1, beta2), start=1):
        bound = reference_bound(beta1, beta2, t)
        assert u.abs().max().item() <= bound * (1 + 1e-12), t


@pytest.mark.parametrize(
    ("beta1", "beta2"), [(0.9, 0.999), (0.9, 0.95), (0.95, 0.9), (0.9, 0.7), (0.5, 0.25), (0.0, 0.9), (0.99, 0.9999)]
)
@pytest.mark.parametrize("t", [1, 2, 3, 17, 250, 2000])
def test_bound_matches_explicit_sum(beta1, beta2, t):
    assert worst_case_bound(beta1, beta2, t) == pytest.approx(reference_bound(beta1, beta2, t), rel=1e-12)


@pytest.mark.parametrize(("beta1", "beta2", "expected"), [(0.9, 0.999, 7.27), (0.9, 0.95, 1.165), (0.9, 0.99, 2.345)])
def test_asymptotic_bound_examples(beta1, beta2, expected):
    digits = len(str(expected).split(".")[1])
    assert round(asymptotic_bound(beta1, beta2), digits) == expected
    assert worst_case_bound(beta1, beta2, 10**6) == pytest.approx(asymptotic_bound(beta1, beta2), rel=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 0.95, 0.999])
def test_asymptotic_bound_is_one_and_smallest_at_equal_betas(beta):
    assert asymptotic_bound(beta, beta) == pytest.approx(1.0, rel=1e-12)
    # Every other β1 < √β2 gives a larger limit (B_∞² - 1 ∝ (β1 - β2)², our derivation).
    for beta1 in [0.0, 0.3, 0.8, 0.9, 0.99, 0.9994]:
        if beta1 != beta and beta1**2 < beta:
            assert asymptotic_bound(beta1, beta) > 1.0


def test_bound_grows_like_sqrt_t_at_gamma_one():
    # γ = 1 exactly (0.5² = 0.25, 0.9·0.9 == 0.81 in float64): B_t = (1-β1)/√(1-β2)·√t once the
    # bias corrections are 1.
    for beta1, beta2 in [(0.5, 0.25), (0.9, 0.81)]:
        assert beta1 * beta1 == beta2
        assert asymptotic_bound(beta1, beta2) == math.inf
        for t in (10**4, 10**6):
            expected = (1 - beta1) / math.sqrt(1 - beta2) * math.sqrt(t)
            assert worst_case_bound(beta1, beta2, t) == pytest.approx(expected, rel=1e-12)
        assert worst_case_bound(beta1, beta2, 40) == pytest.approx(reference_bound(beta1, beta2, 40), rel=1e-12)


@pytest.mark.parametrize(("beta1", "beta2"), [(0.9, 0.7), (0.95, 0.9), (0.99, 0.9)])
def test_bound_grows_exponentially_beyond_gamma_one(beta1, beta2):
    gamma = beta1**2 / beta2
    assert gamma > 1 and asymptotic_bound(beta1, beta2) == math.inf
    # γ^-t ≤ e^-40 and β1^t ≤ e^-40: the sum is γ^t/(γ-1) and the bias corrections are 1.
    t = math.ceil(40 / min(math.log(gamma), -math.log(beta1)))
    ratio = worst_case_bound(beta1, beta2, t + 1) / worst_case_bound(beta1, beta2, t)
    assert ratio == pytest.approx(math.sqrt(gamma), rel=1e-9)
    # Far past the float range: no exception, an infinite (or astronomically large) bound.
    big = worst_case_bound(beta1, beta2, 10**6)
    assert big == math.inf or big > 1e300


def test_bound_in_log_space_beyond_overflow_of_the_sum():
    # (0.95, 0.9): γ^t overflows at t ≈ 2.6e5, the bound itself only at twice that.
    beta1, beta2, t = 0.95, 0.9, 300_000
    gamma = beta1**2 / beta2
    log_expected = math.log((1 - beta1) / math.sqrt(1 - beta2)) + 0.5 * (t * math.log(gamma) - math.log(gamma - 1))
    bound = worst_case_bound(beta1, beta2, t)
    assert math.isfinite(bound)
    assert math.log(bound) == pytest.approx(log_expected, rel=1e-12)


def exact_bound(beta1, beta2, t):
    """B_t in 80-digit decimal arithmetic from the exact values of the float betas (the closed-form
    geometric sum: exact, unlike a float64 loop), rounded once to float64 (inf past its range)."""
    with localcontext() as ctx:
        ctx.prec = 80
        b1, b2 = Decimal(beta1), Decimal(beta2)
        gamma = b1 * b1 / b2
        total = Decimal(t) if gamma == 1 else (gamma**t - 1) / (gamma - 1)
        bound = (1 - b1) / (1 - b2).sqrt() * (1 - b2**t).sqrt() / (1 - b1**t) * total.sqrt()
        return float(bound) if bound < Decimal(1.7976931348623157e308) else math.inf


@pytest.mark.parametrize(
    ("beta1", "beta2", "t"),
    [
        (0.9, 0.999, 3000),
        (0.9, 0.7, 2400),  # γ^t just below the float64 range
        (0.9, 0.7, 3000),  # γ^t past it, B_t far inside
        (0.95, 0.9, 255_000),
        (0.95, 0.9, 300_000),  # B_t ≈ 1.5e181 ≈ exp(417)
        (0.99, 0.9, 7000),
        (math.sqrt(0.9 * (1 + 1e-10)), 0.9, 7 * 10**12),  # γ - 1 ≈ 1e-10: (γ^t - 1)/(γ - 1) overflows, γ^t not
        (0.95, 0.9, 600_000),  # B_t itself past the float64 range
        (0.999, 0.99, 10**6),
    ],
)
def test_bound_matches_exact_decimal_arithmetic(beta1, beta2, t):
    expected = exact_bound(beta1, beta2, t)
    bound = worst_case_bound(beta1, beta2, t)
    if math.isinf(expected):
        assert bound == math.inf
    else:
        assert bound == pytest.approx(expected, rel=1e-12)


def test_bound_at_large_t_does_not_overflow():
    for beta1, beta2 in [(0.9, 0.999), (0.99, 0.9999), (0.9, 0.81), (0.9, 0.7), (0.999, 0.9)]:
        assert worst_case_bound(beta1, beta2, 10**6) >= 1.0
    assert worst_case_bound(0.9, 0.0, 5) == math.inf  # β2 = 0: v holds only g_t


# ---------------------------------------------------------------------------------------------
# noise level


def simulated_update_rms(beta1, beta2, mean, std, n=1024, steps=1000, burn_in=200, seed=0):
    gen = torch.Generator().manual_seed(seed)
    grads = (mean + std * torch.randn(n, dtype=F64, generator=gen) for _ in range(steps))
    total = 0.0
    for t, u in enumerate(adam_directions(grads, beta1, beta2, eps=1e-300), start=1):
        if t > burn_in:
            total += u.square().sum().item()
    return math.sqrt(total / (n * (steps - burn_in)))


def test_noise_level_value():
    assert round(noise_level(0.9), 4) == 0.2294
    assert noise_level(0.9) == pytest.approx(math.sqrt(0.1 / 1.9), rel=1e-15)
    assert noise_level(0.9, mean=1.0, std=0.0) == 1.0  # a steady signal


def test_noise_level_matches_torch_adam_on_pure_noise():
    measured = simulated_update_rms(0.9, 0.95, mean=0.0, std=1.0)
    assert measured == pytest.approx(0.226, abs=0.003)  # the figure in DESIGN §3
    assert abs(measured - noise_level(0.9)) < 0.01


def test_noise_level_matches_torch_adam_with_mean():
    # A long β2 window: v ≈ μ² + σ² almost exactly, so the formula is tight.
    measured = simulated_update_rms(0.9, 0.999, mean=0.5, std=2.0, seed=1)
    expected = math.sqrt((0.25 + 4.0 * 0.1 / 1.9) / 4.25)
    assert noise_level(0.9, mean=0.5, std=2.0) == pytest.approx(expected, rel=1e-15)
    assert abs(measured - expected) < 0.005


# ---------------------------------------------------------------------------------------------
# deterministic jump


def test_jump_peak_examples():
    k, peak = jump_peak(0.9, 0.999, 100)
    assert (k, round(peak, 2)) == (12, 6.57)
    assert round(jump_peak(0.9, 0.95, 100)[1], 2) == 1.10


@pytest.mark.parametrize(("beta1", "beta2", "warmup"), [(0.9, 0.999, 8000), (0.9, 0.95, 1000)])
def test_jump_response_matches_torch_adam(beta1, beta2, warmup):
    # A constant gradient G per coordinate to steady state (β2^warmup ≤ 3.3e-4 is what the
    # formula neglects), then aG. Coordinates: a ∈ {100, 10, 0.5, 0} with G of either sign.
    a = torch.tensor([100.0, 10.0, 0.5, 0.0], dtype=F64)
    g0 = torch.tensor([1.0, -2.0, 0.3, 1.0], dtype=F64)
    p = torch.zeros(4, dtype=F64, requires_grad=True)
    opt = torch.optim.Adam([p], lr=1.0, betas=(beta1, beta2), eps=0.0, foreach=False)
    p.grad = g0.clone()
    for _ in range(warmup):
        opt.step()
    steps = 60
    directions = list(adam_directions([a * g0] * steps, None, None, optimizer=(opt, p)))
    for k, u in enumerate(directions, start=1):
        u = u * torch.sign(g0)
        for i, ai in enumerate(a.tolist()):
            assert jump_response(beta1, beta2, ai, k) == pytest.approx(u[i].item(), rel=1e-3), (ai, k)


def test_jump_response_edges():
    assert jump_response(0.9, 0.999, 100.0, 0) == 1.0  # before the jump
    assert jump_response(0.9, 0.999, 100.0, 10**6) == pytest.approx(1.0, rel=1e-12)  # settled
    # a = 0 is the zero-gradient blow-up (β1/√β2)^k.
    assert jump_response(0.9, 0.7, 0.0, 30) == pytest.approx((0.9 / math.sqrt(0.7)) ** 30, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# β1² > β2 blow-up


@pytest.mark.parametrize(("beta1", "beta2"), [(0.9, 0.7), (0.95, 0.8), (0.9, 0.95)])
def test_blowup_ratio_matches_torch_adam(beta1, beta2):
    # β1^1000 and β2^1000 ≤ 5e-23: the bias corrections are 1 to the last bit.
    t0, zeros = 1000, 100
    g = torch.tensor([1.0, -0.25], dtype=F64)
    grads = [g] * t0 + [torch.zeros_like(g)] * zeros
    directions = list(adam_directions(grads, beta1, beta2))
    base = directions[t0 - 1].abs()
    for k in (1, 2, 10, 50, zeros):
        measured = directions[t0 - 1 + k].abs() / base
        ratio = blowup_ratio(beta1, beta2, k)
        assert measured[0].item() == pytest.approx(ratio, rel=1e-9)
        assert measured[1].item() == pytest.approx(ratio, rel=1e-9)
    assert (blowup_ratio(beta1, beta2, zeros) > 1) == (beta1**2 > beta2)


def test_blowup_ratio_edges():
    assert blowup_ratio(0.9, 0.7, 0) == 1.0
    assert blowup_ratio(0.9, 0.7, 10**6) == math.inf
    assert blowup_ratio(0.9, 0.999, 10**6) == 0.0
    assert blowup_ratio(0.0, 0.5, 3) == 0.0


# ---------------------------------------------------------------------------------------------
# edge of stability, staleness ceiling, timescales


def diverges(beta1, s, steps=20_000):
    """Momentum on a quadratic at a frozen preconditioner: x ← x - m, m ← β1·m + (1-β1)·s·x."""
    x, m = 1.0, 0.0
    for _ in range(steps):
        m = beta1 * m + (1 - beta1) * s * x
        x -= m
        if abs(x) > 1e100:
            return True
    return abs(x) > 1.0


@pytest.mark.parametrize(("beta1", "expected"), [(0.0, 2.0), (0.5, 6.0), (0.9, 38.0), (0.99, 398.0)])
def test_edge_of_stability_by_bisection(beta1, expected):
    lo, hi = 0.0, 1000.0
    assert not diverges(beta1, lo) and diverges(beta1, hi)
    while hi - lo > 1e-4:
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if diverges(beta1, mid) else (mid, hi)
    assert edge_of_stability(beta1) == pytest.approx(expected, rel=1e-14)
    assert abs(0.5 * (lo + hi) - edge_of_stability(beta1)) < 1e-3


def test_staleness_ceiling_and_torch_adam():
    assert round(staleness_ceiling(0.95), 2) == 4.47
    assert round(staleness_ceiling(0.999), 1) == 31.6
    assert staleness_ceiling(0.95, 1) == 1.0
    # Reached by a unit gradient after a run of negligible ones: v_t = (1-β2)·g_t² alone.
    beta2, t = 0.95, 50
    grads = [torch.tensor([1e-150], dtype=F64)] * (t - 1) + [torch.tensor([1.0], dtype=F64)]
    params = [torch.zeros(1, dtype=F64, requires_grad=True)]
    opt = torch.optim.Adam(params, lr=1.0, betas=(0.0, beta2), eps=0.0)
    for g in grads:
        params[0].grad = g
        opt.step()
    v_hat = opt.state[params[0]]["exp_avg_sq"].item() / (1 - beta2**t)
    assert 1.0 / math.sqrt(v_hat) == pytest.approx(staleness_ceiling(beta2, t), rel=1e-12)
    assert staleness_ceiling(beta2, 10**6) == pytest.approx(1 / math.sqrt(1 - beta2), rel=1e-15)


def test_timescale():
    assert timescale(0.9) == pytest.approx(10.0, rel=1e-14)
    assert timescale(0.999) == pytest.approx(1000.0, rel=1e-12)
    assert timescale(0.0) == 1.0


# ---------------------------------------------------------------------------------------------
# CLI table


def test_bound_table_default_betas():
    text = bound_table(0.9, 0.999)
    assert "7.27" in text and "0.2294" in text
    assert "10 steps" in text and "1000 steps" in text
    rows = {
        line.split()[0]: line.split()[1]
        for line in text.splitlines()
        if line.startswith("  ") and len(line.split()) == 2
    }
    for step in (10, 100, 1000, 10000):
        assert float(rows[str(step)]) == pytest.approx(reference_bound(0.9, 0.999, step), rel=1e-3)
    flat = " ".join(text.split())  # the verdict is wrapped for a terminal
    assert "UNBOUNDED" not in text and "WARNING" not in text and "fine" not in flat
    assert "Verdict: bounded, but the second moment can go stale" in flat and "stale_second_moment" in flat
    assert "B_inf = 1" in text
    assert "Verdict: fine." in bound_table(0.9, 0.95)


def test_bound_table_verdicts():
    unbounded = " ".join(bound_table(0.9, 0.7, steps=(5, 50)).split())
    assert "UNBOUNDED" in unbounded
    assert "raise beta2 above beta1^2 or lower beta1" in unbounded
    assert "inf" in bound_table(0.9, 0.7)  # B_10000 past the float range
    assert "UNBOUNDED" in bound_table(0.9, 0.81)  # γ = 1 exactly
    info = " ".join(bound_table(0.9, 0.85).split())  # β1 ≥ β2 but β1² < β2: bounded, the rules say info
    assert "Verdict: bounded (info): momentum outlives the second moment" in info and "beta_order" in info
    assert "WARNING" not in info and "fine" not in info
    equal = " ".join(bound_table(0.95, 0.95).split())
    assert "Verdict: bounded." in equal and "B_inf = 1, the smallest bound" in equal and "WARNING" not in equal


# ---------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, math.nan, math.inf, "0.9", None, True])
def test_betas_are_validated(bad):
    calls = [
        ("beta1", lambda: worst_case_bound(bad, 0.999, 10)),
        ("beta2", lambda: worst_case_bound(0.9, bad, 10)),
        ("beta1", lambda: asymptotic_bound(bad, 0.999)),
        ("beta2", lambda: asymptotic_bound(0.9, bad)),
        ("beta1", lambda: noise_level(bad)),
        ("beta1", lambda: jump_response(bad, 0.999, 10.0, 1)),
        ("beta2", lambda: jump_peak(0.9, bad, 10.0)),
        ("beta2", lambda: staleness_ceiling(bad)),
        ("beta", lambda: timescale(bad)),
        ("beta1", lambda: edge_of_stability(bad)),
        ("beta2", lambda: blowup_ratio(0.9, bad, 3)),
        ("beta1", lambda: bound_table(bad, 0.999)),
        ("beta2", lambda: bound_table(0.9, bad)),
    ]
    for name, call in calls:
        with pytest.raises(ValueError, match=rf"\b{name}\b"):
            call()


def test_other_arguments_are_validated():
    for t in (0, -3, 1.5, None):
        with pytest.raises(ValueError, match=r"\bt\b"):
            worst_case_bound(0.9, 0.999, t)
    with pytest.raises(ValueError, match=r"\bt\b"):
        staleness_ceiling(0.999, 0)
    with pytest.raises(ValueError, match=r"\bk\b"):
        jump_response(0.9, 0.999, 10.0, -1)
    with pytest.raises(ValueError, match=r"\bk\b"):
        blowup_ratio(0.9, 0.999, -1)
    with pytest.raises(ValueError, match=r"\ba\b"):
        jump_response(0.9, 0.999, math.nan, 1)
    with pytest.raises(ValueError, match=r"\bmax_k\b"):
        jump_peak(0.9, 0.999, 10.0, max_k=0)
    with pytest.raises(ValueError, match=r"\bstd\b"):
        noise_level(0.9, std=-1.0)
    with pytest.raises(ValueError):
        noise_level(0.9, mean=0.0, std=0.0)
    with pytest.raises(ValueError, match=r"\bsteps\b"):
        bound_table(0.9, 0.999, steps=(10, 0))


def test_module_stays_framework_free():
    with open(theory.__file__, encoding="utf-8") as f:
        imports = [line for line in f if line.startswith(("import ", "from "))]
    assert not [line for line in imports if "lightning" in line or "torch" in line]
