"""The per-step fast paths against their references: the flat (concatenated) small-tensor
statistics against the per-tensor foreach passes and the one-tensor specification, and the host
(numpy) alert rules against decisions recorded from real steps."""

import math

import pytest
import torch

from adam_monitor.alerts import AlertRules, Thresholds
from adam_monitor.diagnostics import (
    NUM_STATS,
    adam_statistics,
    previous_second_moment,
    tensor_statistics,
)
from adam_monitor.engine.reader import StepReader

SHAPES = [(64, 32), (64,), (64, 64), (64,), (1, 64), (1,), (3, 5, 7)]


def stepped_state(dtype, steps=5, amsgrad=False, betas=(0.9, 0.95), eps=1e-8, scale=1.0):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in SHAPES]
    opt = torch.optim.Adam(params, betas=betas, eps=eps, amsgrad=amsgrad)
    for t in range(steps):
        for p in params:
            p.grad = torch.randn_like(p) * (scale if t == steps - 1 else 1.0)
        opt.step()
    st = [opt.state[p] for p in params]
    lists = [[p.grad for p in params], [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st]]
    kw = dict(beta1=betas[0], beta2=betas[1], eps=eps, step=steps)
    maxes = [s["max_exp_avg_sq"] for s in st] if amsgrad else None
    return lists, kw, maxes


def specification(lists, kw, maxes=None):
    rows = []
    b1, b2, eps, t = kw["beta1"], kw["beta2"], kw["eps"], kw["step"]
    c1, c2 = 1 - b1**t, 1 - b2**t
    for i, (g, m, v) in enumerate(zip(*lists)):
        g, m, v = g.double(), m.double(), v.double()
        den = v if maxes is None else maxes[i].double()
        u = (m / c1) / ((den / c2).sqrt() + eps)
        prev = previous_second_moment(v, g, b2) / (1 - b2 ** (t - 1)) if t > 1 else None
        rows.append(tensor_statistics(g, u, v / c2, prev, eps, None if maxes is None else den / c2))
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("steps", [1, 2, 7])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_flat_path_matches_foreach_and_specification(dtype, steps, amsgrad):
    lists, kw, maxes = stepped_state(dtype, steps=steps, amsgrad=amsgrad)
    kw = dict(kw, max_exp_avg_sqs=maxes)
    foreach = adam_statistics(*lists, **kw, flat=False)
    flat = adam_statistics(*lists, **kw, flat=True)
    rtol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(flat, foreach, rtol=rtol, atol=1e-12)
    if steps == 2:  # v_1 rebuilt from v_2 cancels: the step-2 jump is ill-conditioned in float32 for both paths
        return
    torch.testing.assert_close(
        flat,
        specification(lists, {k: kw[k] for k in ("beta1", "beta2", "eps", "step")}, maxes),
        rtol=1e-12 if dtype == torch.float64 else 2e-5,
        atol=1e-12,
    )
    # counts are exact
    assert torch.equal(flat[:, 3:], foreach[:, 3:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flat_path_low_precision(dtype):
    lists, kw, _ = stepped_state(torch.float32, steps=3)
    lists = [[t.to(dtype) for t in ts] for ts in lists]
    torch.testing.assert_close(
        adam_statistics(*lists, **kw, flat=True), adam_statistics(*lists, **kw, flat=False), rtol=2e-5, atol=1e-12
    )


@pytest.mark.parametrize("poison", [math.nan, math.inf])
@pytest.mark.parametrize("where", [0, 1, 2])
def test_flat_path_propagates_nonfinite_like_foreach(poison, where):
    lists, kw, _ = stepped_state(torch.float32, steps=3)
    lists = [[t.clone() for t in ts] for ts in lists]
    lists[where][2].view(-1)[5] = poison
    flat = adam_statistics(*lists, **kw, flat=True)
    foreach = adam_statistics(*lists, **kw, flat=False)
    assert torch.equal(torch.isfinite(flat), torch.isfinite(foreach))
    assert torch.equal(torch.isnan(flat), torch.isnan(foreach))


def test_flat_path_eps_dominated_and_non_contiguous():
    lists, kw, _ = stepped_state(torch.float32, steps=6, eps=1.0, scale=1e-6)
    lists = [[t.t() if t.dim() == 2 else t for t in ts] for ts in lists]
    flat = adam_statistics(*lists, **dict(kw, eps=1.0), flat=True)
    foreach = adam_statistics(*lists, **dict(kw, eps=1.0), flat=False)
    torch.testing.assert_close(flat, foreach, rtol=2e-5, atol=1e-12)
    assert flat[:, 4].sum() > 0


def test_reader_rows_unchanged_by_the_fast_paths():
    lists, kw, _ = stepped_state(torch.float32, steps=4)
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = torch.optim.AdamW(params, betas=(0.9, 0.95), weight_decay=0.1)
    reader = StepReader(opt)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        rows, step = reader.read()
        st = [opt.state[p] for p in params]
        ref = adam_statistics(
            [p.grad for p in params],
            [s["exp_avg"] for s in st],
            [s["exp_avg_sq"] for s in st],
            beta1=0.9,
            beta2=0.95,
            eps=1e-8,
            step=step,
            flat=False,
        )
        torch.testing.assert_close(rows, ref, rtol=2e-5, atol=1e-12)


def _drive_rows(n, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor([4096.0, 64.0, 10.0, 300.0][:n], dtype=torch.float64)
    seq = []
    for t in range(1, steps + 1):
        level = 10.0 if t in (120, 121, 200) else 1.0
        rows = torch.zeros(n, NUM_STATS, dtype=torch.float64)
        rows[:, 5] = counts
        rows[:, 0] = counts * (0.05 + 0.01 * torch.rand(n, generator=g, dtype=torch.float64)) * level**2
        stale = (1.0 + 0.1 * torch.rand(n, generator=g, dtype=torch.float64)) * (
            1.3 ** max(0, t - 300) if t < 310 else 1
        )
        rows[:, 1] = counts * torch.clamp(stale * level, max=15.0)
        rows[:, 2] = rows[:, 1]
        rows[:, 3] = counts
        rows[:, 4] = counts * (0.9 if 350 < t < 390 else 0.0)
        if t == 420:
            rows[1, 0] = math.nan
        seq.append((t, rows))
    return seq


# Recorded from the earlier implementation of the rules (torch ops on the rows' device) that the
# host-side one replaced; both gave exactly these alerts. A change here changes alert behaviour.
EXPECTED_ALERTS = {
    "one pair": [
        ("update_rms_spike", 120, "mid"),
        ("stale_second_moment", 200, "mid"),
        ("update_rms_spike", 200, "mid"),
        ("stale_second_moment", 307, "w"),
        ("eps_dominance", 355, "w"),
        ("nonfinite", 420, "b"),
    ],
    "mixed pairs": [
        ("stale_second_moment", 120, "mid"),
        ("update_rms_spike", 120, "mid"),
        ("stale_second_moment", 200, "mid"),
        ("update_rms_spike", 200, "mid"),
        ("stale_second_moment", 307, "w"),
        ("stale_second_moment", 308, "mid"),
        ("eps_dominance", 355, "w"),
        ("nonfinite", 420, "b"),
    ],
}


@pytest.mark.parametrize(
    "case,betas",
    [("one pair", (0.9, 0.999)), ("mixed pairs", [(0.9, 0.999), (0.9, 0.95), (0.9, 0.999), (0.5, 0.95)])],
)
def test_host_rules_give_the_recorded_alerts(case, betas):
    names = ["w", "b", "tiny", "mid"]
    rules = AlertRules(names, optimizer="A", betas=betas, thresholds=Thresholds(eps_steps=5))
    got = [(a.rule, a.step, a.parameter) for t, rows in _drive_rows(4, 450) for a in rules.observe(t, rows)]
    assert got == EXPECTED_ALERTS[case]
