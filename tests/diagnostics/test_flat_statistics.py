"""The per-step fast paths against their references: the flat (concatenated) small-tensor
statistics against the per-tensor foreach passes and the one-tensor specification, and the host
(numpy) alert rules on rows whose alert follows from the mechanism."""

import math
from unittest.mock import patch

import pytest
import torch
from reference import specification, torch_adam_state

from adam_monitor.alerts import AlertRules, Thresholds
from adam_monitor.diagnostics import (
    COUNT,
    EPS_COUNT,
    GRAD_COUNT,
    JUMP_COUNT,
    JUMP_SQ,
    NUM_STATS,
    STALENESS_SQ,
    UPDATE_SQ,
    adam_statistics,
    diagnostics_from_statistics,
)
from adam_monitor.diagnostics import foreach as foreach_module
from adam_monitor.diagnostics.foreach import pieces
from adam_monitor.engine.metrics import log_point
from adam_monitor.engine.reader import StepReader

SHAPES = [(64, 32), (64,), (64, 64), (64,), (1, 64), (1,), (3, 5, 7)]


def stepped_state(dtype, steps=5, amsgrad=False, betas=(0.9, 0.95), eps=1e-8, scale=1.0):
    """torch Adam on standard normal gradients, the last one scaled by ``scale``."""

    def gradient(p, t):
        return torch.randn_like(p) * (scale if t == steps else 1.0)

    lists, kw = torch_adam_state(SHAPES, dtype, steps=steps, amsgrad=amsgrad, betas=betas, eps=eps, gradient=gradient)
    return lists, {k: kw[k] for k in ("beta1", "beta2", "eps", "step")}, kw.get("max_exp_avg_sqs")


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
    spec = specification(lists, kw)
    checked = list(range(NUM_STATS))
    if steps == 2:
        # v_1 rebuilt from v_2 cancels where β2·v_1 is small against v_2, amplifying the rounding of
        # v_2 by v_2/(β2·v_1): in float64 that leaves the jump within 1e-8; in float32, where the
        # fast paths also divide by the rebuilt moment in float32, the jump columns are off by up
        # to a percent by design. The two fast paths, which compute alike, were compared on them above.
        checked = [c for c in checked if c not in (JUMP_SQ, JUMP_COUNT)]
        if dtype == torch.float64:
            jump = [JUMP_SQ, JUMP_COUNT]
            torch.testing.assert_close(flat[:, jump], spec[:, jump], rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(flat[:, checked], spec[:, checked], rtol=rtol, atol=1e-12)
    # counts are exact
    counts = [JUMP_COUNT, EPS_COUNT, GRAD_COUNT, COUNT]
    assert torch.equal(flat[:, counts], foreach[:, counts])


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
    assert flat[:, EPS_COUNT].sum() > 0


def test_pieces_cover_every_tensor_once_in_order():
    sizes = [5, 0, 3, 10, 1]
    cut = pieces(sizes, 4)
    assert all(sum(b - a for _, a, b in piece) <= 4 for piece in cut)
    assert [sum(b - a for _, a, b in piece) for piece in cut[:-1]] == [4] * (len(cut) - 1)  # only the last is short
    slices = [s for piece in cut for s in piece]
    for i, size in enumerate(sizes):
        own = [(a, b) for j, a, b in slices if j == i]
        assert [x for a, b in own for x in range(a, b)] == list(range(size))
    assert pieces([], 4) == [] and pieces([0, 0], 4) == []


@pytest.fixture
def small_pieces(monkeypatch):
    """Pieces of 50 elements for calls above 100: every tensor of SHAPES but the smallest spans
    piece boundaries, and pieces hold slices of several tensors."""
    monkeypatch.setattr(foreach_module, "FLAT_MAX_NUMEL", 100)
    monkeypatch.setattr(foreach_module, "PIECE_NUMEL", 50)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_pieced_path_matches_one_buffer_and_foreach(small_pieces, dtype, steps, amsgrad):
    lists, kw, maxes = stepped_state(torch.float64 if dtype == torch.float64 else torch.float32, steps, amsgrad)
    lists = [[t.to(dtype) for t in ts] for ts in lists]
    maxes = None if maxes is None else [t.to(dtype) for t in maxes]
    # an empty tensor, and a transposed (non-contiguous) one among them
    lists = [ts[:2] + [ts[0].new_zeros(0), ts[2].t()] + ts[3:] for ts in lists]
    if maxes is not None:
        maxes = maxes[:2] + [maxes[0].new_zeros(0), maxes[2].t()] + maxes[3:]
    kw = dict(kw, max_exp_avg_sqs=maxes)
    with (
        patch.object(foreach_module, "_numpy_adam_statistics", wraps=foreach_module._numpy_adam_statistics) as whole,
        patch.object(foreach_module, "_piece", wraps=foreach_module._piece) as piece,
    ):
        pieced = adam_statistics(*lists, **kw)
    assert not whole.called and piece.call_count >= 3 * 40  # the call took the pieces, not one buffer
    one_buffer = adam_statistics(*lists, **kw, flat=True)
    foreach = adam_statistics(*lists, **kw, flat=False)
    rtol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(pieced, one_buffer, rtol=rtol, atol=1e-12)
    torch.testing.assert_close(pieced, foreach, rtol=rtol, atol=1e-12)
    counts = [JUMP_COUNT, EPS_COUNT, GRAD_COUNT, COUNT]
    assert torch.equal(pieced[:, counts], foreach[:, counts])
    assert pieced[:, COUNT].tolist() == [t.numel() for t in lists[0]]


@pytest.mark.parametrize("poison", [math.nan, math.inf])
def test_pieced_path_propagates_nonfinite_to_its_tensor_only(small_pieces, poison):
    lists, kw, _ = stepped_state(torch.float32, steps=3)
    lists = [[t.clone() for t in ts] for ts in lists]
    lists[0][2].view(-1)[70] = poison  # in the second of the tensor's pieces
    pieced = adam_statistics(*lists, **kw)
    foreach = adam_statistics(*lists, **kw, flat=False)
    assert torch.equal(torch.isnan(pieced), torch.isnan(foreach))
    assert torch.equal(torch.isfinite(pieced), torch.isfinite(foreach))
    assert torch.isfinite(pieced[[0, 1, 3, 4, 5, 6]]).all()


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


def _steady_rows(generator, count, *, update=0.23, staleness=1.0, eps_fraction=0.0):
    """One tensor's statistics row of a steady run, within 5% noise of the given levels."""
    jitter = 1 + 0.05 * torch.rand(2, generator=generator, dtype=torch.float64)
    row = torch.zeros(NUM_STATS, dtype=torch.float64)
    row[COUNT] = row[JUMP_COUNT] = row[GRAD_COUNT] = count
    row[UPDATE_SQ] = count * (update * jitter[0]) ** 2
    row[STALENESS_SQ] = row[JUMP_SQ] = count * (staleness * jitter[1]) ** 2
    row[EPS_COUNT] = round(count * eps_fraction)
    return row


def _run_rules(betas, event, steps=300, names=("w", "b"), thresholds=None):
    """Alerts ``(rule, step, parameter)`` of a steady run on which ``event(t, name)`` sets the
    levels of a tensor at step t (``None``: steady)."""
    generator = torch.Generator().manual_seed(0)
    rules = AlertRules(list(names), optimizer="A", betas=betas, thresholds=thresholds)
    found = []
    for t in range(1, steps + 1):
        rows = torch.stack([_steady_rows(generator, 4096.0, **(event(t, name) or {})) for name in names])
        found += [(a.rule, a.step, a.parameter) for a in rules.observe(t, rows)]
    return found


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.9, 0.95)])
def test_host_rules_are_silent_on_a_steady_run(betas):
    assert _run_rules(betas, lambda t, name: None) == []


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.9, 0.95)])
def test_host_rules_flag_a_tenfold_update_at_its_step(betas):
    # an update 10x its steady level, within the bound: the relative spike test, at that step only
    event = lambda t, name: {"update": 2.3} if (t, name) == (150, "w") else None  # noqa: E731
    assert _run_rules(betas, event) == [("update_rms_spike", 150, "w")]


def test_host_rules_forecast_a_gradient_jump_by_beta2():
    # a noise std jump x10 (DESIGN §3): staleness 8.94 at beta2 = 0.999 predicts an overshoot;
    # 3.47 at 0.95, where v-hat catches up within a few steps, predicts none
    def jump(staleness):
        return lambda t, name: {"staleness": staleness} if t in (150, 151) and name == "w" else None

    # judged once the jump has lasted a step
    assert _run_rules((0.9, 0.999), jump(8.94)) == [("stale_second_moment", 151, "w")]
    assert _run_rules((0.9, 0.95), jump(3.47)) == []


def test_host_rules_report_nonfinite_once_per_episode():
    # NaN from step 200 on in one tensor: one error at its first step, naming that tensor
    def event(t, name):
        return {"update": math.nan} if t >= 200 and name == "b" else None

    assert _run_rules((0.9, 0.95), event) == [("nonfinite", 200, "b")]


def test_host_rules_flag_eps_dominance_after_eps_steps():
    # 90% of the coordinates eps-dominated from step 100: the regime is reported after 5 steps of it
    def event(t, name):
        return {"eps_fraction": 0.9} if t >= 100 and name == "w" else None

    thresholds = Thresholds(eps_steps=5)
    assert _run_rules((0.9, 0.95), event, thresholds=thresholds) == [("eps_dominance", 104, "w")]


def _rules_on_torch_adamw(weight, gradient, steps):
    """Alerts of ``AlertRules`` on the rows ``StepReader`` reads from torch's default AdamW stepping
    ``weight`` on ``gradient(t)``; also the last rows."""
    opt = torch.optim.AdamW([weight])
    reader = StepReader(opt)
    rules = AlertRules(["embedding.weight"], optimizer="AdamW", betas=(0.9, 0.999))
    alerts = []
    for t in range(1, steps + 1):
        weight.grad = gradient(t)
        opt.step()
        rows, step = reader.read()
        alerts += rules.observe(step, rows)
    return alerts, rows, opt.state[weight]


def test_zipf_embedding_under_default_adamw_is_not_eps_dominated():
    # Tokens drawn from a Zipf law: most rows of the table never appear, their g is exactly 0 and
    # v stays 0 (√v̂ = 0 ≤ ε). They carry no signal and count nowhere; every row that got a
    # gradient is far above ε.
    generator = torch.Generator().manual_seed(0)
    vocab, dim, batch = 5000, 16, 128
    zipf = torch.arange(1, vocab + 1, dtype=torch.float64) ** -1.2
    embedding = torch.nn.Embedding(vocab, dim)

    def gradient(t):
        tokens = torch.multinomial(zipf, batch, replacement=True, generator=generator)
        embedding.weight.grad = None
        (embedding(tokens) * torch.randn(batch, dim, generator=generator)).sum().backward()
        return embedding.weight.grad

    alerts, rows, state = _rules_on_torch_adamw(embedding.weight, gradient, 40)
    assert [a.rule for a in alerts if a.rule == "eps_dominance"] == []
    # Counted over all coordinates, more than half were ε-dominated at every step (the rows never
    # seen only grow fewer): that count alerted at step eps_steps = 20.
    v_hat = state["exp_avg_sq"] / (1 - 0.999**40)
    assert (v_hat.sqrt() <= 1e-8).double().mean() > 0.5
    assert rows[0, EPS_COUNT] == 0 and 0 < rows[0, GRAD_COUNT] < rows[0, COUNT]


def test_steps_without_any_gradient_report_no_eps_dominance_and_no_alert():
    # g = 0 everywhere for longer than eps_steps: v = 0, √v̂ = 0 ≤ ε on every coordinate, yet no
    # coordinate got a gradient: the diagnostic is NaN (left out of the log point) and no rule fires.
    weight = torch.nn.Parameter(torch.randn(64, 8))
    alerts, rows, _ = _rules_on_torch_adamw(weight, lambda t: torch.zeros_like(weight), 30)
    assert alerts == []
    assert (rows[0, EPS_COUNT], rows[0, GRAD_COUNT], rows[0, COUNT]) == (0, 0, 512)
    assert math.isnan(diagnostics_from_statistics(rows[0])[3])
    metrics, _ = log_point("adam", rows, ["w"], skipped=0, alert_count=0, per_parameter=True)
    assert "adam/eps_dominance" not in metrics and "adam_per_parameter/eps_dominance/w" not in metrics


@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_the_flat_paths_leave_the_gradients_and_moments_as_they_were(count, amsgrad):
    """The numpy kernel works in place in its own copies of g and m, never in the caller's."""
    from adam_monitor.diagnostics.compiled import StateLayout, fast_adam_statistics

    lists, kw, maxes = stepped_state(torch.float32, steps=3, amsgrad=amsgrad)
    lists = [ts[:count] for ts in lists]
    maxes = maxes[:count] if amsgrad else None
    before = [[t.clone() for t in ts] for ts in lists + ([maxes] if amsgrad else [])]
    layout = StateLayout(lists[1], lists[2], maxes)
    flat = adam_statistics(*lists, **kw, max_exp_avg_sqs=maxes, flat=True)
    for _ in range(2):  # the prepared path twice: its views of the moments are kept between calls
        prepared = fast_adam_statistics(*lists, **kw, max_exp_avg_sqs=maxes, layout=layout, compiled=False)
        assert torch.equal(prepared, flat)
    for ts, saved in zip(lists + ([maxes] if amsgrad else []), before):
        assert all(torch.equal(t, s) for t, s in zip(ts, saved))
