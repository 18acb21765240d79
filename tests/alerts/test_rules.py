import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from adam_monitor.alerts import SEVERITY_ORDER, Alert, AlertRules, Thresholds, configuration_alerts, messages
from adam_monitor.alerts.rules import (
    EpsFinding,
    bound_margin,
    eps_dominance,
    gradient_growth,
    jump_model,
    jump_updates,
    nonfinite,
    predicted_peak,
    stale_second_moment,
    subject_bounds,
    subjects,
    update_rms_spike,
)
from adam_monitor.diagnostics import NUM_STATS, diagnostics_from_statistics
from adam_monitor.diagnostics.rows import COUNT, EPS_COUNT, GRAD_COUNT, JUMP_COUNT, JUMP_SQ, STALENESS_SQ, UPDATE_SQ
from adam_monitor.engine.reader import StepReader
from adam_monitor.theory import jump_peak, worst_case_bound


def adam_rows(betas, steps, scale=lambda t: 1.0, n=4096, nan_at=None, eps=1e-8, seed=0):
    """(step, rows) of torch Adam on i.i.d. N(0, scale(t)²) gradients for a weight of n and a bias of 64 coordinates."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.zeros(n))
    b = torch.nn.Parameter(torch.zeros(64))
    opt = torch.optim.Adam([w, b], lr=1e-3, betas=betas, eps=eps)
    reader = StepReader(opt)
    for t in range(1, steps + 1):
        s = scale(t)
        w.grad = torch.randn(n, generator=gen, dtype=torch.float32) * s
        b.grad = torch.randn(64, generator=gen, dtype=torch.float32) * s
        if nan_at == t:
            w.grad[7] = math.nan
        opt.step()
        rows, step = reader.read()
        yield step, rows


def drive(betas, steps, scale=lambda t: 1.0, n=4096, nan_at=None, eps=1e-8, rules=None, seed=0):
    """The alerts of ``rules`` (default: AlertRules for "w" and "b") on ``adam_rows``, and the rules."""
    rules = rules or AlertRules(["w", "b"], optimizer="Adam", betas=betas)
    alerts = [
        a for step, rows in adam_rows(betas, steps, scale, n, nan_at, eps, seed) for a in rules.observe(step, rows)
    ]
    return alerts, rules


def stat_rows(count, update_rms=0.0, staleness=1.0, eps_frac=0.0, jump=1.0):
    """Statistics rows of tensors with ``count`` coordinates each and these diagnostics (float64)."""
    count = torch.as_tensor(count, dtype=torch.float64).reshape(-1)
    rows = torch.zeros(len(count), NUM_STATS, dtype=torch.float64)

    def per(x):
        return torch.as_tensor(x, dtype=torch.float64).expand(len(count))

    rows[:, UPDATE_SQ] = per(update_rms) ** 2 * count
    rows[:, STALENESS_SQ] = per(staleness) ** 2 * count
    rows[:, JUMP_SQ] = per(jump) ** 2 * count
    rows[:, JUMP_COUNT] = count
    rows[:, EPS_COUNT] = torch.round(per(eps_frac) * count)
    rows[:, GRAD_COUNT] = rows[:, COUNT] = count
    return rows


def one_pool(rows, min_numel=256):
    """The subjects of ``rows`` when all tensors share one pair of betas."""
    host = rows.numpy()
    return subjects(host, np.zeros(len(host), dtype=np.int64), 1, min_numel)


def summary(alerts):
    return [(a.rule, a.step, a.parameter) for a in alerts]


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.9, 0.95)])
def test_stationary_noise_raises_nothing(betas):
    alerts, _ = drive(betas, 2000)
    assert alerts == []


def test_noise_jump_at_beta2_0999_alerts_once_the_jump_has_lasted_a_step():
    alerts, _ = drive((0.9, 0.999), 1100, scale=lambda t: 10.0 if t >= 1000 else 1.0)
    stale = [a for a in alerts if a.rule == "stale_second_moment"]
    # The jump formula assumes the new scale lasts: the step after the jump confirms it, and the
    # overshoot it predicts is still ahead (it peaks after about 1/(1-beta1) steps).
    assert [(a.step, a.parameter) for a in stale] == [(1001, "w")]
    assert stale[0].severity == "warning" and stale[0].value > stale[0].threshold
    assert "beta2" in stale[0].message


def test_one_outlier_batch_at_beta2_0999_is_not_a_stale_second_moment():
    # One batch x10 then back: the momentum takes (1-beta1) of it and v-hat keeps it for
    # 1/(1-beta2) steps, so the next updates shrink; the overshoot the jump formula predicts for a
    # scale that lasts does not come.
    alerts, _ = drive((0.9, 0.999), 1100, scale=lambda t: 10.0 if t == 1000 else 1.0)
    assert [a for a in alerts if a.rule == "stale_second_moment"] == []


def test_an_outlier_so_large_that_its_own_step_overshoots_alerts_at_once():
    # x100 at beta2 = 0.999: the step just taken is already ~3x its steady size, lasting or not.
    alerts, _ = drive((0.9, 0.999), 1010, scale=lambda t: 100.0 if t == 1000 else 1.0)
    assert [(a.rule, a.step) for a in alerts if a.rule == "stale_second_moment"] == [("stale_second_moment", 1000)]


def test_noise_jump_at_beta2_095_is_harmless():
    # Same x10 jump: the update only rises to about 0.4 and no stale alert fires.
    alerts, _ = drive((0.9, 0.95), 1100, scale=lambda t: 10.0 if t >= 1000 else 1.0)
    assert [a for a in alerts if a.rule == "stale_second_moment"] == []


def test_one_nan_gives_exactly_one_nonfinite_alert():
    alerts, _ = drive((0.9, 0.999), 60, nan_at=30)
    assert summary(alerts) == [("nonfinite", 30, "w")]  # NaN stays in the state: still one alert
    assert alerts[0].severity == "error" and math.isnan(alerts[0].value)


def test_beta_coupling_and_order():
    alerts = configuration_alerts([(0.9, 0.999), (0.99, 0.9), (0.9, 0.85)], optimizer="Adam", step=1)
    assert [(a.rule, a.severity) for a in alerts] == [("beta_coupling", "error"), ("beta_order", "info")]
    coupling = alerts[0]
    assert "param group 1" in coupling.message and coupling.parameter is None
    assert f"{worst_case_bound(0.99, 0.9, 100):.3g}" in coupling.message
    assert "param group 2" in alerts[1].message
    assert configuration_alerts([(0.9, 0.95)], optimizer="Adam", step=1) == []


def test_eps_dominance_fires_for_underflowing_gradients_only():
    # The gradient falls from 1e-6 to 1e-11, far below eps = 1e-8: √v̂ follows at β2^(k/2).
    tiny, _ = drive((0.9, 0.95), 300, scale=lambda t: 1e-6 if t < 50 else 1e-11)
    assert (tiny[0].rule, tiny[0].parameter) == ("eps_dominance", "w") and tiny[0].step > 50 + Thresholds().eps_steps
    assert {a.rule for a in tiny} == {"eps_dominance"} and len({a.parameter for a in tiny}) == len(tiny)
    healthy, _ = drive((0.9, 0.95), 300, scale=lambda t: 1e-3)
    assert healthy == []


def _growth(t):
    # unit noise, a quiet stretch (v̂ decays freely), then an oscillation growing x1.5 per step
    if t < 300:
        return 1.0
    return 1e-3 if t < 600 else 1e-3 * 1.5 ** (t - 599)


def test_gradient_growth_fires_on_geometric_growth_while_v_hat_sets_the_step():
    # Without the floor: after 4 steps of growth (600..603). With it (default 0.05): once the
    # gradient has also reached 5% of √v̂ (√v̂ ≈ 0.22 here: 1e-3·1.5^k ≥ 0.011 from k = 6, step 605).
    unfloored = AlertRules(["w", "b"], optimizer="Adam", betas=(0.9, 0.99), thresholds=Thresholds(growth_floor=0.0))
    early, _ = drive((0.9, 0.99), 615, scale=_growth, rules=unfloored)
    assert [(a.step, a.parameter) for a in early if a.rule == "gradient_growth"] == [(603, "w")]
    alerts, _ = drive((0.9, 0.99), 615, scale=_growth)
    growth = [a for a in alerts if a.rule == "gradient_growth"]
    assert [(a.step, a.parameter) for a in growth] == [(605, "w")]
    assert 0.05 <= float(growth[0].message.split("staleness now ")[1].split(")")[0]) < 0.05 * 1.5
    assert growth[0].value == pytest.approx(1.5, rel=0.05) and growth[0].threshold == Thresholds().growth_ratio
    assert "eps" in growth[0].message and "edge of stability" in growth[0].message


def _bursts(starts_and_lengths):
    # unit noise, a quiet stretch (√v̂ decays to ~0.2), and bursts growing x1.5 per step for the
    # given number of steps, from 0.01: above the growth floor from their first step
    def scale(t):
        if t < 300:
            return 1.0
        for start, length in starts_and_lengths:
            if start <= t < start + length:
                return 1e-2 * 1.5 ** (t - start + 1)
        return 1e-3

    return scale


def test_after_an_alert_shorter_growth_bursts_alert_for_a_window():
    th = Thresholds()
    assert (th.growth_steps_after_alert, th.after_alert_window) == (2, 50)
    # A 4-step burst alerts at 603 and opens the window to 653: a 2-step burst inside it alerts,
    # one after it does not.
    alerts, _ = drive((0.9, 0.99), 720, scale=_bursts([(600, 4), (620, 2), (700, 2)]))
    growth = [a for a in alerts if a.rule == "gradient_growth"]
    assert [a.step for a in growth] == [603, 621]
    assert "for 4+ steps" in growth[0].message and "for 2+ steps" in growth[1].message
    # Without an earlier alert the same 2-step bursts are not enough.
    cold, _ = drive((0.9, 0.99), 720, scale=_bursts([(620, 2), (700, 2)]))
    assert [a for a in cold if a.rule == "gradient_growth"] == []
    # The window is a threshold like the others: 0 turns it off.
    off_rules = AlertRules(["w", "b"], optimizer="Adam", betas=(0.9, 0.99), thresholds=Thresholds(after_alert_window=0))
    off, _ = drive((0.9, 0.99), 720, scale=_bursts([(600, 4), (620, 2)]), rules=off_rules)
    assert [a.step for a in off if a.rule == "gradient_growth"] == [603]


def test_only_full_strength_alerts_open_or_extend_the_window():
    # The 2-step burst at 620 alerts inside the window of 603 (to 653) but does not extend it: the
    # one at 660 falls outside and stays quiet. Were short-burst alerts to extend the window, the
    # noise bursts of a healthy minibatch run would keep it open once one had reached growth_steps.
    alerts, _ = drive((0.9, 0.99), 700, scale=_bursts([(600, 4), (620, 2), (660, 2)]))
    assert [a.step for a in alerts if a.rule == "gradient_growth"] == [603, 621]
    # A 4-step burst inside the window alerts at its second step (641) and, once it has grown for
    # the full 4 steps (643), extends the window to 693: the 2-step burst at 680 then alerts.
    alerts, _ = drive((0.9, 0.99), 720, scale=_bursts([(600, 4), (640, 4), (680, 2)]))
    assert [a.step for a in alerts if a.rule == "gradient_growth"] == [603, 641, 681]


def test_fast_growth_alerts_after_two_steps():
    # After a quiet stretch (gradient 1e-3, √v̂ ≈ 0.2) the gradient jumps x10 at step 600 and grows
    # x3 at 601 and 602: too short for the 4-step test, enough for the fast one (x2.5 on 2 steps).
    def scale(t):
        if t < 300:
            return 1.0
        return 1e-2 * 3.0 ** (t - 600) if 600 <= t <= 602 else 1e-3

    alerts, _ = drive((0.9, 0.99), 640, scale=scale)
    growth = [a for a in alerts if a.rule == "gradient_growth"]
    assert [(a.step, a.parameter) for a in growth] == [(601, "w")]
    assert growth[0].threshold == Thresholds().fast_growth_ratio and growth[0].value >= 2.5
    assert "for 2+ steps" in growth[0].message
    off = AlertRules(["w", "b"], optimizer="Adam", betas=(0.9, 0.99), thresholds=Thresholds(fast_growth_ratio=math.inf))
    slow_only, _ = drive((0.9, 0.99), 640, scale=scale, rules=off)
    assert "gradient_growth" not in {a.rule for a in slow_only}
    # The same jump followed by x2 per step: below the fast ratio, and too short for the 4-step test.
    alerts, _ = drive(
        (0.9, 0.99), 640, scale=lambda t: 1.0 if t < 300 else 1e-2 * 2.0 ** (t - 600) if 600 <= t <= 602 else 1e-3
    )
    assert "gradient_growth" not in {a.rule for a in alerts}

    # A fast alert opens no after-alert window: a 2-step x1.5 burst 20 steps later stays quiet.
    def then_a_short_burst(t):
        return 1e-2 * 1.5 ** (t - 619) if 620 <= t < 622 else scale(t)

    alerts, _ = drive((0.9, 0.99), 640, scale=then_a_short_burst)
    assert [a.step for a in alerts if a.rule == "gradient_growth"] == [601]
    with pytest.raises(ValueError, match="fast_growth_steps"):
        Thresholds(fast_growth_steps=0)


def test_gradient_growth_below_the_floor_is_not_an_alert():
    # The same growth from a gradient 1e-5 of √v̂: 4+ steps of x1.5 that stay under 5% of √v̂.
    def scale(t):
        return 1.0 if t < 300 else 1e-6 * 1.5 ** max(0, t - 599)

    alerts, _ = drive((0.9, 0.99), 612, scale=scale)
    assert "gradient_growth" not in {a.rule for a in alerts}
    with pytest.raises(ValueError, match="growth_floor"):
        Thresholds(growth_floor=-0.1)


def test_gradient_growth_ignores_a_single_jump_and_eps_dominated_tensors():
    jump, _ = drive((0.9, 0.99), 400, scale=lambda t: 10.0 if t >= 300 else 1.0)
    assert [a for a in jump if a.rule == "gradient_growth"] == []
    # ε = 1 dominates every coordinate: Adam is SGD with lr/eps, the growth is not Adam's own.
    dominated, _ = drive((0.9, 0.99), 615, scale=_growth, eps=1.0)
    assert "gradient_growth" not in {a.rule for a in dominated}
    assert "eps_dominance" in {a.rule for a in dominated}


def test_eps_dominance_reads_gradients_below_eps_from_the_start_as_their_scale():
    tiny, _ = drive((0.9, 0.95), 120, scale=lambda t: 1e-11)
    (alert,) = [a for a in tiny if a.rule == "eps_dominance"][:1]
    assert alert.severity == "info" and "SGD with lr/eps" in alert.message
    assert "from the first step" in alert.message and "lower eps" in alert.message


def test_eps_dominance_reads_gradients_that_fell_below_eps_as_convergence():
    # beta2 = 0.5 forgets the early gradients within ~60 steps of the drop
    shrinking, _ = drive((0.3, 0.5), 300, scale=lambda t: 1.0 if t <= 100 else 1e-11)
    (alert,) = [a for a in shrinking if a.rule == "eps_dominance"][:1]
    assert alert.step > 100 and "as the run converged" in alert.message


def test_update_rms_above_the_bound():
    rules = AlertRules(["w"], optimizer="X", betas=(0.9, 0.999))
    alerts = rules.observe(1, stat_rows([1000], update_rms=2.0))  # update RMS 2 at step 1, where B_1 = 1
    assert summary(alerts) == [("update_rms_spike", 1, "w")] and "bound" in alerts[0].message
    assert alerts[0].threshold == pytest.approx(worst_case_bound(0.9, 0.999, 1) * (1 + 1e-4), rel=1e-12)


@pytest.mark.parametrize("betas", [(0.95, 0.8), (0.9, 0.81), (0.9, 0.0), (0.5, 0.0)])
def test_no_bound_test_where_beta1_squared_reaches_beta2(betas):
    # B_t grows without limit there and beta_coupling reports the betas: the spike rule's bound
    # level is infinite, however large the update.
    rules = AlertRules(["w"], optimizer="X", betas=betas)
    assert rules.observe(1, stat_rows([1000], update_rms=1e6)) == []
    (alert,) = configuration_alerts([betas], optimizer="X", step=1)
    assert (alert.rule, alert.severity) == ("beta_coupling", "error")
    assert "sqrt(beta2) = inf" in alert.message if betas[1] == 0 else "inf" not in alert.message


@pytest.mark.parametrize("betas", [(0.0, 0.0), (0.0, 0.5), (0.0, 0.999)])
def test_no_momentum_is_bounded_for_every_beta2(betas):
    # |u_t| = |g_t|/√v̂_t ≤ 1/√(1-β2): no configuration alert, and the bound test applies (B_t = 1 at β2 = 0).
    assert configuration_alerts([betas], optimizer="X", step=1) == []
    rules = AlertRules(["w"], optimizer="X", betas=[betas])
    assert [a.rule for a in rules.observe(1, stat_rows([1000], update_rms=1.5))] == ["update_rms_spike"]


def test_subject_bounds_are_theory_per_pair_spread_over_subjects():
    pairs = [(0.9, 0.95), (0.9, 0.999), (0.95, 0.8)]
    pair_of = np.array([1, 0, 2, 1, 0, 1, 2])  # four tensors, then the three pools
    for t in (1, 2, 10, 1000):
        got = subject_bounds(t, pairs, pair_of)
        want = [worst_case_bound(0.9, 0.95, t), worst_case_bound(0.9, 0.999, t), math.inf]
        assert got.tolist() == [want[i] for i in pair_of]


def test_predicted_peak_matches_the_jump_formula_at_steady_state():
    a, t, b2 = 10.0, 100_000, 0.999
    stale_sq = np.array([a * a / (b2 + (1 - b2) * a * a)])  # staleness² of a jump by a at steady state
    peak, jump = predicted_peak(t, stale_sq, jump_model([(0.9, b2)]))
    assert jump[0] == pytest.approx(a, rel=1e-9)
    assert peak[0] == pytest.approx(jump_peak(0.9, b2, a)[1], rel=2e-2)  # geometric grid of k
    peak, jump = predicted_peak(1, stale_sq, jump_model([(0.9, b2)]))
    assert peak[0] == 0 and math.isnan(jump[0])  # step 1: no v̂_{t-1} to be stale


def test_jump_updates_of_subjects_with_different_betas_are_each_their_own():
    # The terms that depend on the betas alone are computed once per distinct pair: each subject
    # must still get its own pair's, in whatever order the pairs come.
    betas = [(0.9, 0.999), (0.9, 0.95), (0.95, 0.0), (0.0, 0.99), (0.9, 0.999), (0.5, 0.2)]
    stale_sq = np.array([0.0, 0.3, 1.0, 2.5, 40.0, 0.9])
    for t in (2, 3, 10, 500, 10**6):
        u, a = jump_updates(t, stale_sq, jump_model(betas))
        for i, pair in enumerate(betas):
            alone_u, alone_a = jump_updates(t, stale_sq[i : i + 1], jump_model([pair]))
            np.testing.assert_allclose(u[i], alone_u[0], rtol=1e-14, atol=0)
            np.testing.assert_allclose(a[i], alone_a[0], rtol=1e-14, atol=0)  # NaN where β2 = 0
        assert np.all(u[2] == 0) and math.isnan(a[2])


def test_rule_state_survives_a_beta_schedule():
    # A β1 that moves every step (OneCycleLR's cycle_momentum) by less than changes any verdict:
    # the growth run, the baselines and the open episodes carry over, so the alerts are those of
    # fixed betas (rebuilding the rules at each change would reset the growth run: no alert).
    steady = AlertRules(["w", "b"], optimizer="Adam", betas=(0.9, 0.99))
    moving = AlertRules(["w", "b"], optimizer="Adam", betas=(0.9, 0.99))
    got, want = [], []
    for step, rows in adam_rows((0.9, 0.99), 615, scale=_growth):
        moving.set_betas([(0.9 + 1e-9 * (step % 2), 0.99)] * 2)
        got += moving.observe(step, rows)
        want += steady.observe(step, rows)
    assert [a.rule for a in want] == ["gradient_growth"]
    assert summary(got) == summary(want)


def test_a_pool_whose_members_part_starts_afresh():
    # Two small tensors pooled under one pair of betas; one of them moves to other betas: the pool
    # they shared is gone, each now pools alone (below min_numel: not judged), and the state of the
    # tensors themselves is kept.
    rules = AlertRules(["a", "b", "w"], optimizer="Adam", betas=(0.9, 0.999))
    for t in range(1, 60):
        rules.observe(t, stat_rows([200, 200, 4096], update_rms=0.3))
    before = rules.state_dict()
    rules.set_betas([(0.9, 0.999), (0.8, 0.999), (0.9, 0.999)])
    after = rules.state_dict()
    assert after["spike_ema"][:3].tolist() == before["spike_ema"][:3].tolist()
    assert len(after["spike_ema"]) == 5 and after["spike_seen"][3:].tolist() == [0.0, 0.0]
    rules.set_betas([(0.9, 0.999), (0.8, 0.999), (0.9, 0.999)])  # the same betas: nothing changes
    assert rules.state_dict()["spike_seen"].tolist() == after["spike_seen"].tolist()
    with pytest.raises(ValueError, match="pairs for 3 tensor names"):
        rules.set_betas([(0.9, 0.999)] * 2)


@pytest.mark.parametrize("numel,alerts", [(40, [("stale_second_moment", 501, "bias3")]), (10, [])])
def test_small_tensors_are_judged_pooled(numel, alerts):
    # Eight small tensors of the same betas: one of them far off (staleness 19.7, near the ceiling
    # 19.8 at step 500 for beta2 = 0.999) lifts the pooled staleness to 7.2. Pooled 8 x 40 = 320
    # coordinates reach min_numel (256) and alert, naming the worst member; 8 x 10 = 80 do not,
    # though that tensor alone would.
    names = [f"bias{i}" for i in range(8)]
    rules = AlertRules(names, optimizer="Adam", betas=(0.9, 0.999))
    rows = stat_rows([numel] * 8)
    for t in range(2, 500):
        assert rules.observe(t, rows) == []
    staleness = torch.ones(8, dtype=torch.float64)
    staleness[3] = 19.7
    # pooled, the jump is judged once it has lasted a step
    assert rules.observe(500, stat_rows([numel] * 8, staleness=staleness)) == []
    got = rules.observe(501, stat_rows([numel] * 8, staleness=staleness))
    assert summary(got) == alerts
    if got:
        assert "the tensors under 256 elements with betas (0.9, 0.999), pooled (worst: bias3)" in got[0].message
    alone = AlertRules(["bias3"], optimizer="Adam", betas=(0.9, 0.999), thresholds=Thresholds(min_numel=numel))
    # alone, near the ceiling, the step just taken already overshoots: judged at once
    assert [a.rule for a in alone.observe(500, stat_rows([numel], staleness=19.7))] == ["stale_second_moment"]


def test_state_dict_round_trip_continues_identically(tmp_path: Path):
    # eps dominates from step 1 (an episode from step 5 that spans the checkpoint at 100), then the
    # gradient jumps at 121: the continuation depends on the saved episode and baselines.
    rows = list(adam_rows((0.9, 0.999), 200, scale=lambda t: 1e-11 if t <= 120 else 1.0))

    def build():
        return AlertRules(["w", "b"], optimizer="A", betas=(0.9, 0.999), thresholds=Thresholds(eps_steps=5))

    def feed(rules, part):
        return [a for t, r in part for a in rules.observe(t, r)]

    first = build()
    before = feed(first, rows[:100])
    assert summary(before) == [("eps_dominance", 5, "w")] and "1 more subject" in before[0].message
    torch.save(first.state_dict(), tmp_path / "rules.pt")
    restored = build()
    restored.load_state_dict(torch.load(tmp_path / "rules.pt", weights_only=True))
    for k, v in first.state_dict().items():
        other = restored.state_dict()[k]
        assert torch.equal(v, other) if isinstance(v, torch.Tensor) else v == other, k
    after = feed(first, rows[100:])
    assert summary(after) == [("update_rms_spike", 121, "w"), ("stale_second_moment", 122, "w")]
    assert feed(restored, rows[100:]) == after  # every field: rule, step, message, values
    for k, v in first.state_dict().items():
        other = restored.state_dict()[k]
        assert torch.equal(v, other) if isinstance(v, torch.Tensor) else v == other, k
    # Without the state the continuation differs (a second eps episode at 105): the check above can fail.
    assert feed(build(), rows[100:]) != after


# ------------------------------------------------------------------ the rules one by one, on hand-made steps


def test_nonfinite_rule_alerts_once_per_episode():
    state = {"nonfinite_active": np.zeros((), dtype=bool)}
    clean = stat_rows([300, 300]).numpy()
    bad = clean.copy()
    bad[1, STALENESS_SQ] = math.inf
    assert nonfinite(clean, state) is None
    finding = nonfinite(bad, state)
    assert finding is not None and finding.tensor == 1 and finding.value == math.inf
    assert nonfinite(bad, state) is None  # the same episode
    assert nonfinite(clean, state) is None and nonfinite(bad, state) is not None  # cleared, then a new one


def test_stale_rule_fires_where_the_jump_formula_predicts_an_overshoot():
    # Staleness of a x10 gradient jump at steady state: the update overshoots to ~5 at beta2 = 0.999,
    # to ~1.1 at 0.95 (below stale_peak = 2): a stale v̂ there cannot inflate updates.
    a, th = 10.0, Thresholds()
    for b2, fires in ((0.999, True), (0.95, False)):
        stale_sq = a * a / (b2 + (1 - b2) * a * a)
        q = one_pool(stat_rows([4096], staleness=math.sqrt(stale_sq)))
        state = {"stale_active": np.zeros(2, dtype=bool), "stale_before": np.zeros(2, dtype=bool)}
        model = jump_model([(0.9, b2)] * 2)
        assert stale_second_moment(9_999, q, model, state, th) is None  # one step: an outlier batch or a jump
        finding = stale_second_moment(10_000, q, model, state, th)
        assert (finding is not None) == fires
        if fires:
            assert (finding.subject, finding.member, finding.count) == (0, 0, 1)
            assert finding.jump == pytest.approx(a, rel=1e-4) and finding.peak > th.stale_peak  # nearly steady
            assert state["stale_active"].tolist() == [True, False]


def spike_state(baseline, seen):
    d = Thresholds().spike_decay
    ema = baseline * (1 - d**seen)  # the bias-corrected EMA then reads ``baseline``
    return {
        "spike_active": np.zeros(2, dtype=bool),
        "spike_ema": np.array([ema, 0.0]),
        "spike_seen": np.array([float(seen), 0.0]),
    }


def test_spike_rule_fires_above_its_running_mean_or_the_bound():
    th, no_bound = Thresholds(), np.full(2, math.inf)
    # baseline 0.5 over 100 steps: the level is max(3 x 0.5, floor 1) = 1.5
    quiet = update_rms_spike(one_pool(stat_rows([4096], update_rms=1.4)), no_bound, spike_state(0.5, 100), th)
    assert quiet is None
    finding = update_rms_spike(one_pool(stat_rows([4096], update_rms=1.6)), no_bound, spike_state(0.5, 100), th)
    assert finding is not None and finding.threshold == pytest.approx(1.5) and finding.baseline == pytest.approx(0.5)
    # too few steps seen for the running mean: only the bound test applies
    young = spike_state(0.5, 10)
    assert update_rms_spike(one_pool(stat_rows([4096], update_rms=1.6)), no_bound, young, th) is None
    finding = update_rms_spike(one_pool(stat_rows([4096], update_rms=1.6)), np.ones(2), spike_state(0.5, 10), th)
    assert finding is not None and finding.bound == pytest.approx(1 + 1e-4) and finding.value > finding.bound


def growth_state(run, prev):
    return {
        "growth_prev": np.array([prev, 0.0]),
        "fast_growth_run": np.zeros(2),
        "growth_run": np.array([float(run), 0.0]),
        "growth_base": np.array([prev / 1.3 ** (2 * run), 0.0]),
        "growth_active": np.zeros(2, dtype=bool),
    }


def test_growth_rule_fires_on_the_fourth_step_of_growth_unless_eps_sets_the_step():
    th = Thresholds()
    grown = one_pool(stat_rows([4096], staleness=0.13))  # 0.1 -> 0.13: x1.3 per step, above growth_ratio 1.2
    finding, full = gradient_growth(grown, False, growth_state(3, 0.01), th)
    assert full and finding is not None and (finding.steps, finding.threshold) == (4, 1.2)
    assert finding.ratio == pytest.approx(1.3)
    finding, full = gradient_growth(grown, False, growth_state(2, 0.01), th)  # third step: not yet
    assert finding is None and not full
    finding, full = gradient_growth(grown, True, growth_state(1, 0.01), th)  # in the window: 2 steps suffice
    assert finding is not None and finding.steps == 2 and not full
    dominated = one_pool(stat_rows([4096], staleness=0.13, eps_frac=0.9))
    assert gradient_growth(dominated, False, growth_state(3, 0.01), th)[0] is None


def test_eps_rule_fires_after_eps_steps_in_a_row():
    th = Thresholds()
    state = {"eps_run": np.array([th.eps_steps - 2.0]), "eps_active": np.zeros(1, dtype=bool)}
    dominated = one_pool(stat_rows([4096], eps_frac=0.9))
    step = th.eps_steps - 1
    assert eps_dominance(step, dominated, state, th) is None
    finding = eps_dominance(step + 1, dominated, state, th)
    assert finding is not None and finding.fraction == pytest.approx(0.9, abs=1e-3) and finding.count == 1
    assert finding.from_start  # dominated on every step so far
    assert eps_dominance(step + 2, dominated, state, th) is None  # the same episode
    assert eps_dominance(step + 3, one_pool(stat_rows([4096], eps_frac=0.3)), state, th) is None
    assert state["eps_active"].tolist() == [True] and state["eps_run"].tolist() == [0.0]  # 0.3 > eps_clear: still on
    eps_dominance(step + 4, one_pool(stat_rows([4096], eps_frac=0.1)), state, th)
    assert state["eps_active"].tolist() == [False]
    for t in range(step + 5, step + 5 + th.eps_steps):  # a second episode, later in the run
        finding = eps_dominance(t, dominated, state, th)
    assert finding is not None and not finding.from_start


def test_eps_advice_fits_the_regime():
    names, th = ["fc.bias"], Thresholds()
    early = messages.eps_message(EpsFinding(0, 0.95, 1, from_start=True), names, th)
    late = messages.eps_message(EpsFinding(0, 0.95, 1, from_start=False), names, th)
    assert "from the first step" in early and "normalization layer" in early and "underflow" in early
    assert "converged" in late and "edge of stability" in late and "underflow" not in late


def test_coordinates_without_a_gradient_are_not_eps_dominated():
    # An embedding whose rows mostly get no gradient (tokens absent from the batch): their v̂ decays
    # below ε², but they carry no signal, and lowering ε would change nothing for them.
    torch.manual_seed(0)
    emb = torch.nn.Embedding(1000, 16)
    opt = torch.optim.AdamW(emb.parameters(), lr=1e-3)
    rules = AlertRules(["emb.weight"], optimizer="AdamW", betas=(0.9, 0.999))
    reader = StepReader(opt)
    found, fractions = [], []
    for _ in range(300):
        emb(torch.randint(10, (32,))).square().mean().backward()  # only rows 0-9 are ever used
        opt.step()
        rows, step = reader.read()
        found += rules.observe(step, rows)
        fractions.append(float(diagnostics_from_statistics(rows[0])[3]))
        opt.zero_grad()
    assert found == []
    assert max(fractions) == 0.0


def test_alert_dict_round_trip_is_json_safe():
    a = Alert("nonfinite", "error", 3, "m", "Adam", "w", math.nan, math.inf)
    d = json.loads(json.dumps(a.to_dict(), allow_nan=False))
    assert d["value"] == "nan" and d["threshold"] == "inf"
    b = Alert.from_dict(d)
    assert math.isnan(b.value) and b.threshold == math.inf and b.rule == a.rule and b.step == 3
    assert SEVERITY_ORDER["error"] > SEVERITY_ORDER["warning"]


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="one pair per tensor"):
        AlertRules(["a", "b"], optimizer="X", betas=[(0.9, 0.999)])
    with pytest.raises(ValueError, match=r"Thresholds.stale_peak"):
        Thresholds(stale_peak=0.5)
    rules = AlertRules(["a"], optimizer="X", betas=(0.9, 0.999))
    with pytest.raises(ValueError, match="rebuild AlertRules"):
        rules.observe(1, torch.zeros(2, NUM_STATS, dtype=torch.float64))


@pytest.mark.slow
def test_quick_calibration(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import spike_scenarios as bench

    torch.set_num_threads(1)
    table = bench.quick(cache=tmp_path)
    text = bench.format_table(table)
    # From the cache: nothing retrained, and the replay scores the same.
    records, alerts, again, trained = bench.evaluate((0,), jobs=2, cache=tmp_path)
    assert not trained and bench.format_table(again) == text
    # Every family shows its mechanism on the loss alone: each spike run spikes, no control or
    # healthy run does.
    assert bench.mechanism_holds(records), bench.mechanism_check(records)
    # β1² > β2 is flagged at step 1 (and so predicts every spike of those runs).
    assert bench.coupling_flagged_at_step_1(records, alerts) is True, text
    assert table["beta_coupling"]["monitor"].recall == 1.0, text
    # The replay is what live rules raise on the same rows, and deterministic.
    assert bench.replay_matches_live("beta_coupling", "spike", 0, cache=tmp_path)
    # On the families the defaults were calibrated on (CALIBRATION.md): the onset of the tiny-ε
    # spiking regime is predicted, and their controls stay within the false-alert limit.
    assert table["tiny_eps"]["monitor"].episode_recall == 1.0, text
    for name in ("stale_v", "high_lr", "beta_coupling", "tiny_eps"):
        assert table[name]["monitor"].control_false <= bench.MAX_CONTROL_FALSE, text


def test_bf16_rounding_of_the_moments_is_no_bound_violation():
    # At step 1 |u| = 1 exactly in real arithmetic; m and v stored in bfloat16 put the update RMS
    # of some tensors just above B_1 = 1 (by ~1e-4, over float32's margin). Not a spike.
    over = 0
    for seed in range(6):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 10))
        model = model.to(torch.bfloat16)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        names = [n for n, _ in model.named_parameters()]
        dtypes = [p.dtype for p in model.parameters()]
        rules = AlertRules(names, optimizer="AdamW", betas=(0.9, 0.999), state_dtypes=dtypes)
        reader = StepReader(opt)
        for _ in range(3):
            x, y = torch.randn(32, 64, dtype=torch.bfloat16), torch.randint(10, (32,))
            torch.nn.functional.cross_entropy(model(x).float(), y).backward()
            opt.step()
            rows, step = reader.read()  # before zero_grad: the rows need the gradients the step used
            opt.zero_grad()
            assert rules.observe(step, rows) == []
            if step == 1:
                rms = (rows[:, UPDATE_SQ] / rows[:, COUNT]).sqrt()
                over += int((rms > 1 + 1e-4).any())
    assert over > 0  # the case arises: float32's margin alone would have alerted
    assert bound_margin(torch.bfloat16) == pytest.approx(0.03125)
    assert bound_margin(torch.float32) == bound_margin(torch.float64) == 1e-4


def test_one_event_is_one_episode_with_one_diagnosis():
    # A x30 jump of the gradient at beta2 = 0.999: the update RMS jumps at once (step 200); the
    # next step shows the scale lasting against a long-memory v-hat, and the stale second moment
    # becomes the episode's cause with its own fix. Later precursors are its evidence.
    alerts, rules = drive((0.9, 0.999), 260, scale=lambda t: 1.0 if t < 200 else 30.0)
    first, cause = alerts[:2]
    assert (first.rule, first.step, cause.rule, cause.step) == ("update_rms_spike", 200, "stale_second_moment", 201)
    assert "lower beta2" in cause.message and "evidence of the episode" not in cause.message
    state = rules.state_dict()
    assert int(state["episode_cause"]) == 0 and int(state["episode_step"]) == 200  # stale, from step 200
    for evidence in alerts[2:]:
        assert "evidence of the episode that started at step 200 with stale_second_moment on w" in evidence.message
        assert messages.EPISODE_FIXES["stale_second_moment"] in evidence.message


def test_a_stale_alert_after_the_first_step_of_an_update_spike_episode_does_not_take_it_over():
    # An update spike on its own (one x30 batch, then back): a stale alert later in its window is
    # evidence of it, not its new cause.
    th = Thresholds()
    rules = AlertRules(["w"], optimizer="Adam", betas=(0.9, 0.999))
    rows = stat_rows([4096], update_rms=0.2)
    for t in range(2, 400):
        assert rules.observe(t, rows) == []
    assert [a.rule for a in rules.observe(400, stat_rows([4096], update_rms=3.0))] == ["update_rms_spike"]
    for t in range(401, 405):
        rules.observe(t, rows)
    stale_sq = 100.0 / (0.999 + 0.001 * 100.0)  # a lasting x10 jump at steady state
    later = [
        a for t in (405, 406) for a in rules.observe(t, stat_rows([4096], update_rms=0.2, staleness=stale_sq**0.5))
    ]
    assert [a.rule for a in later] == ["stale_second_moment"]
    assert "evidence of the episode that started at step 400 with update_rms_spike" in later[0].message
    assert 406 <= 400 + th.after_alert_window


def test_an_alert_after_the_episode_window_starts_a_new_episode():
    th = Thresholds()
    # a second x100 jump long after the first episode ended: its alerts diagnose themselves again
    second = 200 + th.after_alert_window + 350
    alerts, rules = drive((0.9, 0.99), second + 20, scale=lambda t: 1.0 if t < 200 else 1e2 if t < 600 else 1e4)
    starts = [a for a in alerts if "evidence of the episode" not in a.message]
    assert {a.step for a in starts} >= {201, 601}, [(a.rule, a.step) for a in alerts]
    state = rules.state_dict()
    assert int(state["episode_step"]) == 601 and int(state["episode_cause"]) == 0
