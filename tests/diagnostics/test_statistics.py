"""The statistics against a float64 per-coordinate loop written straight from the definitions."""

import math

import pytest
import torch
from reference import embedding_gradient, reference_row, specification, torch_adam_state

from adam_monitor.diagnostics import (
    COUNT,
    EPS_COUNT,
    GRAD_COUNT,
    JUMP_COUNT,
    NUM_STATS,
    UPDATE_SQ,
    adam_direction,
    adam_statistics,
    diagnostics_from_statistics,
    pool,
    previous_second_moment,
    tensor_statistics,
)


def run_adam(shapes, steps, *, beta1=0.9, beta2=0.99, eps=1e-8, amsgrad=False, scale=None, dtype=torch.float64):
    """Drive torch Adam on random gradients, keeping exact float64 copies of v_{t-1}."""
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]
    opt = torch.optim.Adam(params, lr=1e-2, betas=(beta1, beta2), eps=eps, amsgrad=amsgrad)
    v_prev = None
    for t in range(1, steps + 1):
        for p in params:
            p.grad = torch.randn_like(p) * (scale(t) if scale else 1.0)
        v_prev = [
            opt.state[p]["exp_avg_sq"].double().clone() if opt.state[p] else torch.zeros_like(p, dtype=torch.float64)
            for p in params
        ]
        opt.step()
    return params, opt, v_prev


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_adam_statistics_match_per_coordinate_loop(amsgrad, steps):
    scale = lambda t: 0.3 if t % 2 else 3.0  # noqa: E731 - varying scale exercises amsgrad's max
    params, opt, v_prev = run_adam([(4, 3), (5,)], steps, amsgrad=amsgrad, scale=scale)
    states = [opt.state[p] for p in params]
    rows = adam_statistics(
        [p.grad for p in params],
        [s["exp_avg"] for s in states],
        [s["exp_avg_sq"] for s in states],
        beta1=0.9,
        beta2=0.99,
        eps=1e-8,
        step=steps,
        max_exp_avg_sqs=[s["max_exp_avg_sq"] for s in states] if amsgrad else None,
    )
    for row, p, s, vp in zip(rows, params, states, v_prev):
        ref = reference_row(
            p.grad.flatten().tolist(),
            s["exp_avg"].flatten().tolist(),
            s["exp_avg_sq"].flatten().tolist(),
            vp.flatten().tolist(),
            beta1=0.9,
            beta2=0.99,
            eps=1e-8,
            t=steps,
            v_den=s["max_exp_avg_sq"].flatten().tolist() if amsgrad else None,
        )
        torch.testing.assert_close(row, torch.tensor(ref, dtype=torch.float64), rtol=1e-10, atol=0)


def test_tensor_statistics_is_the_same_specification():
    params, opt, v_prev = run_adam([(6, 2)], 5)
    p, s = params[0], opt.state[params[0]]
    c1, c2, c2p = 1 - 0.9**5, 1 - 0.99**5, 1 - 0.99**4
    u = adam_direction(s["exp_avg"], s["exp_avg_sq"], bias_correction1=c1, bias_correction2=c2, eps=1e-8)
    row = tensor_statistics(p.grad, u, s["exp_avg_sq"] / c2, v_prev[0] / c2p, 1e-8)
    ref = reference_row(
        p.grad.flatten().tolist(),
        s["exp_avg"].flatten().tolist(),
        s["exp_avg_sq"].flatten().tolist(),
        v_prev[0].flatten().tolist(),
        beta1=0.9,
        beta2=0.99,
        eps=1e-8,
        t=5,
    )
    torch.testing.assert_close(row, torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=0)


def test_previous_second_moment_is_exact_and_zero_stays_zero():
    v_prev = torch.tensor([0.0, 1e-3, 2.0, 0.0], dtype=torch.float32)
    g = torch.tensor([5.0, 0.1, -1.0, 0.0], dtype=torch.float32)
    v = 0.999 * v_prev + 0.001 * g * g
    rebuilt = previous_second_moment(v, g, 0.999)
    assert rebuilt[0] == 0 and rebuilt[3] == 0  # never saw a gradient: no previous moment at all
    torch.testing.assert_close(rebuilt[1:3], v_prev[1:3], rtol=1e-5, atol=0)


def test_first_step_has_no_gradient_jump_and_fresh_coordinates_are_excluded():
    params, opt, _ = run_adam([(8,)], 1)
    s = opt.state[params[0]]
    rows = adam_statistics([params[0].grad], [s["exp_avg"]], [s["exp_avg_sq"]], beta1=0.9, beta2=0.99, eps=1e-8, step=1)
    assert rows[0, JUMP_COUNT] == 0
    assert math.isnan(diagnostics_from_statistics(rows[0])[2])
    # At t = 1, v̂ = g² exactly, so staleness is exactly 1.
    assert diagnostics_from_statistics(rows[0])[1].item() == pytest.approx(1.0, rel=1e-12)


def test_eps_dominance_counts_coordinates_below_eps():
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = torch.optim.Adam([p], betas=(0.9, 0.99), eps=1e-8)
    p.grad = torch.tensor([1e-12, 1e-12, 1.0, 0.0], dtype=torch.float64)
    opt.step()
    s = opt.state[p]
    row = adam_statistics([p.grad], [s["exp_avg"]], [s["exp_avg_sq"]], beta1=0.9, beta2=0.99, eps=1e-8, step=1)[0]
    assert torch.isfinite(row).all()
    # √v̂ = |g|: 1e-12 ≤ 1e-8 twice; the coordinate without a gradient (√v̂ = 0) counts nowhere.
    assert row[EPS_COUNT] == 2 and row[GRAD_COUNT] == 3 and row[COUNT] == 4


def test_zero_eps_is_finite_where_torch_is_and_nan_where_torch_is():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = torch.optim.Adam([p], betas=(0.9, 0.99), eps=0.0)
    p.grad = torch.tensor([1e-12, 2.0, -1.0], dtype=torch.float64)
    opt.step()
    s = opt.state[p]
    row = adam_statistics([p.grad], [s["exp_avg"]], [s["exp_avg_sq"]], beta1=0.9, beta2=0.99, eps=0.0, step=1)[0]
    assert torch.isfinite(row).all() and row[EPS_COUNT] == 0
    # A coordinate that never saw a gradient divides 0 by 0 in torch's own step: the parameter
    # becomes NaN, and the statistics say so instead of hiding it.
    p.grad = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    q = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = torch.optim.Adam([q], betas=(0.9, 0.99), eps=0.0)
    q.grad = p.grad
    opt.step()
    s = opt.state[q]
    row = adam_statistics([q.grad], [s["exp_avg"]], [s["exp_avg_sq"]], beta1=0.9, beta2=0.99, eps=0.0, step=1)[0]
    assert q.isnan().any() and row[UPDATE_SQ].isnan()


def test_pooling_is_exact_not_a_mean_of_means():
    a = torch.tensor([4.0, 0, 0, 1, 0, 1, 1], dtype=torch.float64)  # update_sq 4 over 1 coordinate
    b = torch.tensor([0.0, 0, 0, 1, 0, 3, 3], dtype=torch.float64)  # 0 over 3 coordinates
    pooled = diagnostics_from_statistics(pool(torch.stack([a, b])))
    assert pooled[0].item() == pytest.approx(1.0)  # sqrt(4/4), not mean(2, 0) = 1 by luck: check rms
    assert pooled[3].item() == 0.0
    assert pool(torch.stack([a, b])).shape == (NUM_STATS,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_tensors_agree_with_float64(dtype):
    torch.manual_seed(1)
    p64 = torch.nn.Parameter(torch.randn(257, dtype=torch.float64))
    p = torch.nn.Parameter(p64.detach().to(dtype))
    opts = [torch.optim.Adam([q], betas=(0.9, 0.95), eps=1e-8) for q in (p64, p)]
    for _ in range(6):
        g = torch.randn(257, dtype=torch.float64)
        p64.grad, p.grad = g, g.to(dtype)
        for o in opts:
            o.step()
    rows = []
    for q, o in zip((p64, p), opts):
        s = o.state[q]
        rows.append(
            adam_statistics([q.grad], [s["exp_avg"]], [s["exp_avg_sq"]], beta1=0.9, beta2=0.95, eps=1e-8, step=6)[0]
        )
    tol = 1e-5 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(
        diagnostics_from_statistics(rows[1]), diagnostics_from_statistics(rows[0]), rtol=tol, atol=0
    )


def test_large_float32_tensors_on_the_foreach_path_sum_like_float64():
    # The per-tensor passes (flat=False: the eager path for large CPU models) over 2^23 float32
    # coordinates, against the flat path: the same float32 terms summed in float64. Serial float32
    # accumulation would be off by about 1e-3, cascade sums by 1e-7.
    torch.manual_seed(3)
    n = 1 << 23
    p = torch.nn.Parameter(torch.randn(n) * 0.02)
    opt = torch.optim.AdamW([p], lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    for step in range(1, 4):
        p.grad = torch.randn(n) * (1.0 if step < 3 else 4.0)  # a jump at step 3
        opt.step()
        s = opt.state[p]
        lists = [[p.grad], [s["exp_avg"]], [s["exp_avg_sq"]]]
        kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, step=step)
        fast = adam_statistics(*lists, **kw, flat=False)[0]
        exact = adam_statistics(*lists, **kw, flat=True)[0]
        torch.testing.assert_close(fast, exact, rtol=2e-6, atol=0)


# Embedding tables (rows are tokens; ``embedding_gradient``): 2 rows of order-1 gradients, 1 of
# tiny ones, 1 seen at the first step only, 4 never. After the first step 4 of the 12 coordinates
# with a gradient are ε-dominated; counted over all 32 coordinates, the 16 that never saw a
# gradient (√v̂ = 0) would make it 20/32.
EMBEDDING, SPLIT = (8, 4), (2, 1, 1)


def embedding_rows(steps, shapes=(EMBEDDING,), splits=(SPLIT,), dtype=torch.float64, flat=None):
    """``(rows of the specification, rows of adam_statistics)`` of torch's default AdamW betas
    and ε on embedding tables after ``steps`` steps."""
    gradients = [embedding_gradient(*split) for split in splits]
    index = {}

    def gradient(p, t):
        return gradients[index.setdefault(id(p), len(index))](p, t)

    lists, kw = torch_adam_state(list(shapes), dtype, steps=steps, gradient=gradient)
    return specification(lists, kw), adam_statistics(*lists, **kw, flat=flat), lists, kw


@pytest.mark.parametrize("flat", [True, False])
def test_eps_dominance_is_a_fraction_of_the_coordinates_with_a_gradient(flat):
    spec, fast, (grads, exp_avgs, exp_avg_sqs), kw = embedding_rows(3, flat=flat)
    v = exp_avg_sqs[0]
    loop = reference_row(
        grads[0].flatten().tolist(),
        exp_avgs[0].flatten().tolist(),
        v.flatten().tolist(),
        previous_second_moment(v, grads[0], kw["beta2"]).flatten().tolist(),
        beta1=kw["beta1"],
        beta2=kw["beta2"],
        eps=kw["eps"],
        t=3,
    )
    torch.testing.assert_close(spec[0], torch.tensor(loop, dtype=torch.float64), rtol=1e-12, atol=0)
    for row in (spec[0], fast[0]):
        assert (row[EPS_COUNT], row[GRAD_COUNT], row[COUNT]) == (4, 12, 32)
        assert diagnostics_from_statistics(row)[3].item() == 1 / 3
    # At the first step the row seen once has a gradient too: 4 of 16.
    spec, fast, *_ = embedding_rows(1, flat=flat)
    assert diagnostics_from_statistics(spec[0])[3].item() == diagnostics_from_statistics(fast[0])[3].item() == 0.25


def test_pooled_eps_dominance_is_the_joint_fraction():
    # 4 of 12 and 12 of 16 coordinates with a gradient: 16/28 pooled, not the mean 13/24 of 1/3 and 3/4.
    spec, fast, *_ = embedding_rows(2, shapes=(EMBEDDING, (16, 4)), splits=(SPLIT, (1, 3, 0)))
    for rows in (spec, fast):
        per_tensor = diagnostics_from_statistics(rows)[:, 3].tolist()
        assert per_tensor == [1 / 3, 3 / 4]
        assert diagnostics_from_statistics(pool(rows))[3].item() == 16 / 28


def test_eps_dominance_is_nan_without_any_gradient():
    # A step that gives no coordinate a gradient (a table whose tokens are all absent) has no
    # fraction to report: NaN, as the gradient jump of the first step, and not the 1 that √v̂ = 0 ≤ ε
    # everywhere would give.
    spec, fast, *_ = embedding_rows(2, splits=((0, 0, 0),))
    for row in (spec[0], fast[0]):
        assert (row[EPS_COUNT], row[GRAD_COUNT], row[COUNT]) == (0, 0, 32)
        assert math.isnan(diagnostics_from_statistics(row)[3])
