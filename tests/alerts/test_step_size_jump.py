"""``step_size_jump``: the tensors trained so far move farther in one step than in any step before."""

import math

import pytest
import torch
from support import with_update_spike_at_the_end

from adam_monitor import Monitor
from adam_monitor.alerts import AlertRules, Thresholds
from adam_monitor.engine.reader import StepReader

LR = 1e-2


def noise_run(lr_at, steps=100, seed=0):
    """Torch Adam on N(0, 1) gradients, "w" (4096) and "b" (64); ``lr_at(t)`` the lr of step t.
    Yields (step, rows, per-tensor lrs)."""
    gen = torch.Generator().manual_seed(seed)
    w, b = (torch.nn.Parameter(torch.zeros(n)) for n in (4096, 64))
    opt = torch.optim.Adam([w, b], lr=lr_at(1))
    reader = StepReader(opt)
    for t in range(1, steps + 1):
        opt.param_groups[0]["lr"] = lr_at(t)
        for p in (w, b):
            p.grad = torch.randn(p.numel(), generator=gen)
        opt.step()
        rows, step = reader.read()
        yield step, rows, [opt.param_groups[0]["lr"]] * 2


def jump_alerts(lr_at, rules=None, **kwargs):
    rules = rules or AlertRules(["w", "b"], optimizer="Adam", betas=(0.9, 0.999))
    alerts = [a for step, rows, lrs in noise_run(lr_at, **kwargs) for a in rules.observe(step, rows, lrs)]
    return [a for a in alerts if a.rule == "step_size_jump"], rules


def test_an_lr_raised_tenfold_at_once_is_named_at_that_step():
    alerts, _ = jump_alerts(lambda t: LR * (10 if t >= 70 else 1))
    assert [(a.step, a.parameter, a.severity) for a in alerts] == [(70, "w", "info")]
    # On pure noise the update RMS holds at ≈ 0.23 (β1 = 0.9): the move grows with the lr alone.
    assert 8 < alerts[0].value < 11 and alerts[0].threshold == Thresholds().step_size_ratio
    text = alerts[0].message
    assert "step 70" in text and "went from 0.01 to 0.1 at this step (10x)" in text and "raise the lr gradually" in text


@pytest.mark.parametrize(
    "lr_at",
    [
        lambda t: LR * (1 + 9 * min(1.0, max(0.0, (t - 70) / 100))),  # the same rise, ramped over 100 steps
        lambda t: LR * min(1.0, t / 50),  # a linear warmup from lr/50
        lambda t: LR * (1 + math.cos(math.pi * (t % 40) / 40)) / 2 + 1e-5,  # cosine restarts to the first lr
        lambda t: LR * (0.1 if t >= 70 else 1),  # a step down
        lambda t: LR * (10 if t >= 30 else 1),  # tenfold before the largest move has 20 steps behind it
    ],
    ids=["ramped", "warmup", "restarts", "step-down", "too-early"],
)
def test_what_stays_below_any_earlier_step_size_raises_nothing(lr_at):
    assert jump_alerts(lr_at, steps=160)[0] == []


def test_an_update_that_jumps_by_itself_is_left_to_update_rms_spike():
    rules = AlertRules(["w", "b"], optimizer="Adam", betas=(0.9, 0.999))
    runs = list(noise_run(lambda t: LR * (1 + 0.01 * (t >= 60)), steps=60))  # the lr rises 1% at step 60
    found = []
    for step, rows, lrs in runs:
        rows = rows.clone()
        if step == 60:
            rows[:, 0] *= 25.0  # the update RMS of both tensors jumps 5x
        found += [a.rule for a in rules.observe(step, rows, lrs)]
    assert found == ["update_rms_spike"]
    # Without lrs (one lr for all) it never fires.
    rules = AlertRules(["w", "b"], optimizer="Adam", betas=(0.9, 0.999))
    assert not [
        a for step, rows, _ in noise_run(lambda t: LR * (10 if t >= 70 else 1)) for a in rules.observe(step, rows)
    ]


def test_off_at_an_infinite_ratio_and_the_ratio_is_checked():
    rules = AlertRules(
        ["w", "b"], optimizer="Adam", betas=(0.9, 0.999), thresholds=Thresholds(step_size_ratio=math.inf)
    )
    assert jump_alerts(lambda t: LR * (100 if t >= 70 else 1), rules=rules)[0] == []
    with pytest.raises(ValueError, match="Thresholds.step_size_ratio must be a number > 1"):
        Thresholds(step_size_ratio=1.0)


def test_a_resumed_rules_state_knows_the_largest_step_size_so_far():
    lr_at = lambda t: LR * (10 if t >= 70 else 1)  # noqa: E731
    runs = list(noise_run(lr_at))
    first = AlertRules(["w", "b"], optimizer="Adam", betas=(0.9, 0.999))
    for step, rows, lrs in runs[:65]:
        first.observe(step, rows, lrs)
    resumed = AlertRules(["w", "b"], optimizer="Adam", betas=(0.9, 0.999))
    resumed.load_state_dict(first.state_dict())
    after = [
        a.step for step, rows, lrs in runs[65:] for a in resumed.observe(step, rows, lrs) if a.rule == "step_size_jump"
    ]
    assert after == [70]
    # A state saved before the rule existed: it starts afresh, and judges nothing for 20 steps.
    old = {k: v for k, v in first.state_dict().items() if not k.startswith("jump_")}
    again = AlertRules(["w", "b"], optimizer="Adam", betas=(0.9, 0.999))
    again.load_state_dict(old)
    assert not [
        a for step, rows, lrs in runs[65:] for a in again.observe(step, rows, lrs) if a.rule == "step_size_jump"
    ]


def test_the_alerts_that_follow_are_evidence_with_its_fix():
    rules = AlertRules(["w", "b"], optimizer="Adam", betas=(0.9, 0.999))
    runs = list(noise_run(lambda t: LR * (10 if t >= 70 else 1), steps=71))
    first, (spike,) = with_update_spike_at_the_end(rules, runs)  # then w's update RMS jumps 5x
    assert [(a.rule, a.step) for a in (*first, spike)] == [("step_size_jump", 70), ("update_rms_spike", 71)]
    for part in ("evidence of the episode that started at step 70 with step_size_jump on w", "raise the lr gradually"):
        assert part in spike.message


def test_a_monitored_loop_whose_lr_is_raised_at_once_records_it_and_passes_the_gate():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor = Monitor(opt, named_parameters=model.named_parameters(), log_every_n_steps=None)
    x = torch.randn(256, 16)
    y = x[:, :1].sin()
    for t in range(1, 121):
        if t == 100:
            opt.param_groups[0]["lr"] = 1e-2
        i = torch.randint(0, 256, (32,))
        (model(x[i]) - y[i]).square().mean().backward()
        opt.step()
        opt.zero_grad()
    monitor.close()
    jumps = [a for a in monitor.alerts if a.rule == "step_size_jump"]
    assert [(a.step, a.severity) for a in jumps] == [(100, "info")]
    assert not [a for a in monitor.alerts if a.severity != "info"]
