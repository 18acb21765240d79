"""``fresh_state``: a tensor whose Adam state starts late, at an lr its peers' updates never reach."""

import math
import operator

import numpy as np
import pytest
import torch
from support import no_warnings, with_update_spike_at_the_end

from adam_monitor import Monitor
from adam_monitor.alerts import AlertRules, Thresholds
from adam_monitor.engine.reader import StepReader


def noise_run(start_at, late_lr=1e-2, steps=80, ramp=1, seed=0):
    """Torch Adam on N(0, 1) gradients: "w" (4096) and "b" (64) from step 1, "late" (1024) from step
    ``start_at``, its group's lr ramped from ``late_lr``/``ramp`` to ``late_lr`` over ``ramp`` steps.
    Yields (step, rows, per-tensor lrs)."""
    gen = torch.Generator().manual_seed(seed)
    w, b, late = (torch.nn.Parameter(torch.zeros(n)) for n in (4096, 64, 1024))
    opt = torch.optim.Adam([{"params": [w, b]}, {"params": [late]}], lr=1e-2)
    reader = StepReader(opt)
    for t in range(1, steps + 1):
        for p in (w, b):
            p.grad = torch.randn(p.numel(), generator=gen)
        if t >= start_at:
            late.grad = torch.randn(late.numel(), generator=gen)
            opt.param_groups[1]["lr"] = late_lr * min(1.0, (t - start_at + 1) / ramp)
        opt.step()
        rows, step = reader.read()
        yield step, rows, [g["lr"] for g in opt.param_groups for _ in g["params"]]


def fresh_alerts(*args, rules=None, **kwargs):
    rules = rules or AlertRules(["w", "b", "late"], optimizer="Adam", betas=(0.9, 0.999))
    alerts = [a for step, rows, lrs in noise_run(*args, **kwargs) for a in rules.observe(step, rows, lrs)]
    return [a for a in alerts if a.rule == "fresh_state"], rules


def test_a_tensor_starting_late_at_its_peers_lr_is_warned_at_its_first_step():
    alerts, _ = fresh_alerts(start_at=60)
    assert [(a.step, a.parameter, a.severity) for a in alerts] == [(60, "late", "info")]
    # Its first step is sign descent (update RMS 1) against peers averaging noise in m-hat: at β1 = 0.9
    # their update RMS is √((1-β1)/(1+β1)) ≈ 0.23, so it moves ≈ 4.4x as far.
    assert 3.5 < alerts[0].value < 5.5
    assert alerts[0].threshold == Thresholds().fresh_ratio
    text = alerts[0].message
    assert "late" in text and "step 60" in text and "ramps up from about 0" in text


def test_a_ramped_lr_a_tenth_of_its_peers_or_a_start_with_the_others_raise_nothing():
    assert fresh_alerts(start_at=60, ramp=50)[0] == []  # lr/50 at its first step
    assert fresh_alerts(start_at=60, late_lr=1e-3)[0] == []  # fine-tuning's lower backbone lr: 0.43x
    assert fresh_alerts(start_at=1)[0] == []  # every tensor starts at once: the run's own start
    assert fresh_alerts(start_at=10)[0] == []  # the others have not trained 1/(1-spike_decay) = 20 steps yet


def test_without_lrs_every_tensor_counts_as_stepping_with_one_lr():
    rules = AlertRules(["w", "b", "late"], optimizer="Adam", betas=(0.9, 0.999))
    alerts = [a for step, rows, _ in noise_run(start_at=60) for a in rules.observe(step, rows)]
    assert [(a.rule, a.step) for a in alerts] == [("fresh_state", 60)]


def test_an_unknown_lr_is_not_judged_and_a_wrong_number_of_lrs_names_lrs():
    rules = AlertRules(["w", "b", "late"], optimizer="Adam", betas=(0.9, 0.999))
    for step, rows, lrs in noise_run(start_at=60):
        assert rules.observe(step, rows, [lrs[0], lrs[1], math.nan]) == []
    with pytest.raises(ValueError, match="lrs must hold one lr per named tensor"):
        rules.observe(81, rows, [1e-2, 1e-2])


def test_off_at_an_infinite_ratio_and_the_ratio_is_checked():
    assert (
        fresh_alerts(
            start_at=60,
            rules=AlertRules(
                ["w", "b", "late"], optimizer="A", betas=(0.9, 0.999), thresholds=Thresholds(fresh_ratio=math.inf)
            ),
        )[0]
        == []
    )
    with pytest.raises(ValueError, match="fresh_ratio"):
        Thresholds(fresh_ratio=0)


def test_a_resumed_rules_state_knows_which_tensors_have_trained():
    runs = list(noise_run(start_at=60))
    first = AlertRules(["w", "b", "late"], optimizer="Adam", betas=(0.9, 0.999))
    for step, rows, lrs in runs[:40]:
        first.observe(step, rows, lrs)
    resumed = AlertRules(["w", "b", "late"], optimizer="Adam", betas=(0.9, 0.999))
    resumed.load_state_dict(first.state_dict())
    got = [a for step, rows, lrs in runs[40:] for a in resumed.observe(step, rows, lrs)]
    assert [(a.rule, a.step) for a in got] == [("fresh_state", 60)]
    # A state saved before the rule existed starts it afresh: nobody counts as trained, no alert.
    old = {k: v for k, v in first.state_dict().items() if k != "fresh_seen"}
    again = AlertRules(["w", "b", "late"], optimizer="Adam", betas=(0.9, 0.999))
    again.load_state_dict(old)
    assert [a for step, rows, lrs in runs[40:] for a in again.observe(step, rows, lrs)] == []


def test_what_the_peers_then_show_is_evidence_with_the_fresh_states_fix():
    rules = AlertRules(["w", "b", "late"], optimizer="Adam", betas=(0.9, 0.999))
    runs = list(noise_run(start_at=60, steps=61))
    first, alerts = with_update_spike_at_the_end(rules, runs)  # then w's update RMS jumps 5x
    assert [(a.rule, a.step) for a in first] == [("fresh_state", 60)]
    assert [a.rule for a in alerts] == ["update_rms_spike"]
    text = alerts[0].message
    assert "evidence of the episode that started at step 60 with fresh_state on late" in text
    assert "warm up the tensor that started" in text


class _Regression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh()
        )
        self.head = torch.nn.Linear(64, 1)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("ramp, expected", [(1, ["body.2.weight"]), (50, [])])
def test_a_monitored_loop_that_unfreezes_a_body_at_full_lr_is_warned(ramp, expected):
    torch.manual_seed(0)
    model, teacher = _Regression(), torch.nn.Linear(16, 1)
    model.body.requires_grad_(False)
    lr = 3e-2
    opt = torch.optim.Adam([{"params": model.body.parameters()}, {"params": model.head.parameters()}], lr=lr)
    gen = torch.Generator().manual_seed(1)
    with no_warnings():  # info: recorded, never warned
        monitor = Monitor(opt, named_parameters=model.named_parameters(), log_every_n_steps=None)
        for t in range(1, 71):
            if t == 41:
                model.body.requires_grad_(True)
            opt.param_groups[0]["lr"] = lr * min(1.0, max(0, t - 40) / ramp)
            x = torch.randn(32, 16, generator=gen)
            torch.nn.functional.mse_loss(model(x), teacher(x).detach()).backward()
            opt.step()
            opt.zero_grad()
        monitor.close()
    fresh = [a for a in monitor.alerts if a.rule == "fresh_state"]
    assert [a.parameter for a in fresh] == expected
    assert all(a.step == 41 for a in fresh)
    if fresh:
        assert "took its first optimizer step at step 41" in fresh[0].message
        assert "3 more tensors started at this step" in fresh[0].message
        assert np.isfinite(fresh[0].value) and fresh[0].value > Thresholds().fresh_ratio


def test_the_engine_reads_each_tensors_lr_without_syncing_on_a_device_lr():
    from types import SimpleNamespace

    from adam_monitor.engine.monitor import _tensor_lrs

    groups = [
        {"params": [0, 1], "lr": torch.tensor(0.5)},
        {"params": [2], "lr": 1e-3},
        {"params": [3], "lr": torch.tensor(1.0, device="meta")},  # reading it would wait for the device
    ]
    reader = SimpleNamespace(optimizer=SimpleNamespace(param_groups=groups), lr=operator.itemgetter("lr"))
    lrs = _tensor_lrs(reader, 4)
    assert lrs[:3].tolist() == [0.5, 0.5, 1e-3] and math.isnan(lrs[3])
    assert _tensor_lrs(reader, 5) is None


def test_rules_rebuilt_for_more_tensors_keep_each_tensors_state_by_name():
    from adam_monitor.alerts.rules import carry_over

    old = AlertRules(["w", "b", "late"], optimizer="Adam", betas=(0.9, 0.999))
    for step, rows, lrs in noise_run(start_at=1, steps=30):
        old.observe(step, rows, lrs)
    new = AlertRules(["extra", "late", "w", "b"], optimizer="Adam", betas=(0.9, 0.999))
    carry_over(old, new)
    before, after = old.state_dict(), new.state_dict()
    for key in ("spike_ema", "spike_seen", "growth_prev", "fresh_seen", "eps_run"):
        assert after[key][[1, 2, 3]].tolist() == before[key][[2, 0, 1]].tolist(), key
        assert after[key][0] == 0, key  # a new tensor starts afresh
    assert after["spike_seen"][4:].tolist() == [0.0]  # the pool of small tensors has new members: afresh
    assert after["last_step"] == 30


def test_a_param_group_added_mid_run_at_full_lr_is_a_fresh_state_and_the_others_keep_their_baselines():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(4096))
    opt = torch.optim.Adam([w], lr=1e-2)
    head = torch.nn.Parameter(torch.zeros(1024))
    monitor = Monitor(opt, named_parameters=[("w", w), ("head", head)], log_every_n_steps=None)
    gen = torch.Generator().manual_seed(0)
    for t in range(1, 61):
        if t == 41:
            opt.add_param_group({"params": [head]})
        for p in opt.param_groups[-1]["params"] + [w]:
            p.grad = torch.randn(p.numel(), generator=gen)
        opt.step()
    monitor.close()
    assert [(a.rule, a.step, a.parameter) for a in monitor.alerts] == [("fresh_state", 41, "head")]
    (tracked,) = monitor._tracked
    seen = tracked.rules.state_dict()["spike_seen"]
    assert seen[:2].tolist() == [60, 20]  # w's baseline went on through the rebuild
