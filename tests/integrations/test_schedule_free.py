"""Schedule-free AdamW read as the Adam step its z takes (β1 = 0, the lr after its warmup).

The rebuilt-update test on z: the direction the monitor reports equals
``(z_before − z_after)/γ − λ·y`` (y: the point the gradient was taken at) to float rounding, and each
row equals the float64 reference computed from the gradient the step was given.
"""

import warnings

import pytest
import torch
from support import assert_named_and_not_read, small_model

from adam_monitor import Monitor
from adam_monitor.diagnostics import tensor_statistics
from adam_monitor.diagnostics.rows import GRAD_COUNT
from adam_monitor.engine.reader import StepReader

schedulefree = pytest.importorskip("schedulefree")

LR, EPS = 1e-2, 1e-8


def params64():
    torch.manual_seed(0)
    return [
        torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64)),
        torch.nn.Parameter(torch.randn(5, dtype=torch.float64)),
    ]


def _gradients(params, t):
    """Gradients of a changing scale; the first row of the matrix gets none (0 exactly)."""
    for p in params:
        p.grad = torch.randn_like(p) * (1 + t % 5)
    params[0].grad[0] = 0.0


@pytest.mark.parametrize("closure_form", [False, True], ids=["AdamWScheduleFree", "AdamWScheduleFreeClosure"])
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "for-loop"])
@pytest.mark.parametrize("decay", [0.0, 0.1])
def test_schedule_free_adamw_is_read_exactly(closure_form, foreach, decay):
    params = params64()
    cls = schedulefree.AdamWScheduleFreeClosure if closure_form else schedulefree.AdamWScheduleFree
    opt = cls(params, lr=LR, weight_decay=decay, warmup_steps=5, eps=EPS, foreach=foreach)
    if not closure_form:
        opt.train()
    reader = StepReader(opt)
    group = opt.param_groups[0]
    beta2 = group["betas"][1]
    for t in range(1, 31):
        seen = {}

        def closure(t=t, seen=seen):
            _gradients(params, t)
            seen.update({p: (p.grad.clone(), p.detach().clone()) for p in params})  # g, and y where it was taken
            return 0.0

        if not closure_form:
            closure()
        z_before = {p: opt.state[p]["z"].clone() for p in params if opt.state.get(p)}
        v_before = {p: opt.state[p]["exp_avg_sq"].clone() for p in params if opt.state.get(p)}
        opt.step(closure) if closure_form else opt.step()
        rows, step = reader.read()
        assert step == t and reader.betas(group) == (0.0, beta2) and reader.lr(group) == group["scheduled_lr"]
        for i, p in enumerate(params):
            state, (g, y) = opt.state[p], seen[p]
            z_prev = z_before.get(p, y)  # z starts as a copy of p
            applied = (z_prev - state["z"]) / group["scheduled_lr"] - decay * y
            u = reader.direction(p, state, group, step)
            torch.testing.assert_close(u, applied, rtol=1e-9, atol=1e-12)
            v_hat = state["exp_avg_sq"] / (1 - beta2**t)
            v_hat_prev = None if t == 1 else v_before[p] / (1 - beta2 ** (t - 1))
            expected = tensor_statistics(g, g / (v_hat.sqrt() + EPS), v_hat, v_hat_prev, EPS)
            torch.testing.assert_close(rows[i], expected, rtol=1e-9, atol=1e-12)
        assert rows[0, GRAD_COUNT] == 20  # the row without a gradient counts as none, decay or not


def test_monitor_follows_schedule_free_training_through_eval_and_compiled_statistics():
    # A tensor large enough for the compiled statistics; eval() between steps moves p to x and back.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 160), torch.nn.Tanh(), torch.nn.Linear(160, 1))
    opt = schedulefree.AdamWScheduleFree(model.parameters(), lr=1e-3, weight_decay=0.01, warmup_steps=10)
    beta2 = opt.param_groups[0]["betas"][1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = Monitor(opt, named_parameters=model.named_parameters(), log_every_n_steps=None)
        for _ in range(12):
            opt.train()
            model(torch.randn(32, 512)).square().mean().backward()
            grads = [p.grad.clone() for p in model.parameters()]
            monitor.flush()  # each window holds one step
            opt.step()
            opt.zero_grad()
            opt.eval()
            model(torch.randn(8, 512))
        written = monitor.flush()
        monitor.close()
    assert [str(w.message) for w in caught if "adam-monitor" in str(w.message)] == []
    u_sq, n = 0.0, 0
    for p, g in zip(model.parameters(), grads):
        v_hat = opt.state[p]["exp_avg_sq"] / (1 - beta2**12)
        u_sq += float((g.double() / (v_hat.double().sqrt() + 1e-8)).square().sum())
        n += p.numel()
    assert written["adam/update_rms"] == pytest.approx((u_sq / n) ** 0.5, rel=1e-5)
    assert 0 < written["adam/update_rms"] < 1  # a z step of Adam without momentum, not a move of the average


def _subclass_with_its_own_step():
    class Stepped(schedulefree.AdamWScheduleFree):
        def step(self, closure=None):
            return super().step(closure)

    return Stepped


#: name -> (make, what the warning must say)
NOT_READ = {
    "RAdamScheduleFree": (
        lambda ps: schedulefree.RAdamScheduleFree(ps, lr=LR),
        "a schedule-free optimizer whose step adam-monitor does not read",
    ),
    "AdamWScheduleFreePaper": (
        lambda ps: schedulefree.AdamWScheduleFreePaper(ps, lr=LR),
        "reads schedulefree's AdamWScheduleFree and AdamWScheduleFreeClosure",
    ),
    "AdamWScheduleFreeReference": (
        lambda ps: schedulefree.AdamWScheduleFreeReference(ps, lr=LR),
        "a schedule-free optimizer whose step adam-monitor does not read",
    ),
    "SGDScheduleFree": (
        lambda ps: schedulefree.SGDScheduleFree(ps, lr=LR),
        "a schedule-free optimizer whose step adam-monitor does not read",
    ),
    "a subclass with its own step": (
        lambda ps: _subclass_with_its_own_step()(ps, lr=LR),
        "Stepped overrides the step of AdamWScheduleFree",
    ),
}


@pytest.mark.parametrize("name", NOT_READ)
def test_other_schedule_free_optimizers_are_named_and_not_read(name):
    make, says = NOT_READ[name]
    model = small_model()
    opt = make(model.parameters())
    if hasattr(opt, "train"):
        opt.train()
    assert_named_and_not_read(opt, model, says, steps=5)
