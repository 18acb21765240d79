"""Adam-shaped optimizers that are not torch's: read once their update is verified to be Adam's.

``HandAdam`` is written as third-party libraries write Adam: not a subclass of torch's, its step
count in the param group, ``beta1``/``beta2`` keys, and each of the forms of weight decay they use.
"""

import pytest
import torch
from support import monitored_run

from adam_monitor.diagnostics import tensor_statistics
from adam_monitor.engine.reader import StepReader, UnsupportedOptimizer, unsupported_reason

DECAYS = ["none", "decoupled", "fully-decoupled", "l2", "l2-in-place"]


class HandAdam(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, **how):
        super().__init__(params, dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay))
        self.decay = how.get("decay", "decoupled")
        self.clamp_from = how.get("clamp_from")  # a bound on the update that binds from this step on
        self.consume = how.get("consume", False)
        self.sign = how.get("sign", False)
        self.debiased = how.get("debiased", False)  # moments kept bias-corrected, as optimi keeps them
        self.yogi = how.get("yogi", False)  # Yogi's second moment: v − (1 − β2)·sign(v − g²)·g²
        self.counted = how.get("counted", True)  # False: the step count kept where no reader looks

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            t = group.get("step", getattr(self, "_count", 0)) + 1
            if self.counted:
                group["step"] = t
            else:
                self._count = t
            b1, b2, lr, wd, eps = (group[k] for k in ("beta1", "beta2", "lr", "weight_decay", "eps"))
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if self.decay == "l2":
                    g = g + wd * p
                elif self.decay == "l2-in-place":
                    g = p.grad.add_(p, alpha=wd)
                elif self.decay == "decoupled":
                    p.mul_(1 - lr * wd)
                elif self.decay == "fully-decoupled":
                    p.mul_(1 - wd)
                state = self.state[p]
                if not state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if self.debiased:
                    b1, b2 = (b * (1 - b ** (t - 1)) / (1 - b**t) for b in (group["beta1"], group["beta2"]))
                m.lerp_(g, 1 - b1)
                if self.yogi:
                    v.addcmul_((v - g * g).sign(), g * g, value=-(1 - b2))
                else:
                    v.mul_(b2).addcmul_(g, g, value=1 - b2)
                if self.debiased:
                    u = m / (v.sqrt() + eps)
                else:
                    u = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
                if self.sign:
                    u = u.sign()
                if self.clamp_from is not None and t >= self.clamp_from:
                    u = u.clamp(-0.05, 0.05)
                p.sub_(lr * u)
                if self.consume:
                    p.grad = None


def params64():
    torch.manual_seed(0)
    return [
        torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64)),
        torch.nn.Parameter(torch.randn(7, dtype=torch.float64)),
    ]


@pytest.mark.parametrize("debiased", [False, True], ids=["raw", "debiased"])
@pytest.mark.parametrize("decay", DECAYS)
def test_its_rows_match_an_independent_computation_once_verified(decay, debiased):
    params = params64()
    wd = 0.0 if decay == "none" else 0.05
    opt = HandAdam(params, weight_decay=wd, decay=decay, debiased=debiased)
    reader = StepReader(opt)
    assert reader.foreign and reader.unverified
    for t in range(1, 81):  # far enough for β̂1_t to come within the check's tolerance of β1
        for p in params:
            p.grad = torch.randn_like(p) * (1 + t)
        grads = {p: p.grad.clone() for p in params}
        before = {p: p.detach().clone() for p in params}
        v_before = {p: opt.state[p]["exp_avg_sq"].clone() for p in params if opt.state.get(p)}
        opt.step()
        rows, step = reader.read()
        assert step == t and reader.unverified == (t == 1), (
            "verified at its second step, Adam's first being sign descent"
        )
        group = opt.param_groups[0]
        lr, b2 = group["lr"], group["beta2"]
        # The first step's rows are not recorded (unverified): from the second, the decay's form is known.
        for i, p in enumerate(params):
            kept = {"decoupled": 1 - lr * wd, "fully-decoupled": 1 - wd}.get(decay, 1.0) * before[p]
            applied = kept - p.detach()
            u = reader.direction(p, opt.state[p], group, step)
            if t > 1 or not debiased:  # how the moments are kept is known from the second step
                torch.testing.assert_close(lr * u, applied, rtol=1e-9, atol=1e-15)
            g = grads[p] + wd * before[p] if decay.startswith("l2") else grads[p]
            c2, c2_prev = (1.0, 1.0) if debiased else (1 - b2**t, 1 - b2 ** (t - 1))
            v_hat_prev = v_before[p] / c2_prev if t > 1 else None
            expected = tensor_statistics(g, applied / lr, opt.state[p]["exp_avg_sq"] / c2, v_hat_prev, group["eps"])
            if t > 1:
                torch.testing.assert_close(rows[i], expected, rtol=1e-9, atol=1e-12)


def test_it_is_checked_at_every_step_and_an_update_that_departs_later_is_found_at_once():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    values, messages = monitored_run(HandAdam(model.parameters(), lr=1e-3), model, 200)
    assert messages == [] and values["adam/update_rms"] > 0

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    _, messages = monitored_run(HandAdam(model.parameters(), lr=1e-3, clamp_from=150), model, 200)
    assert len(messages) == 1 and "stopped monitoring HandAdam" in messages[0]
    assert "at step 150 " in messages[0] and "not Adam's" in messages[0]


def test_an_optimizer_that_wraps_another_is_read_as_itself():
    class Blend(torch.optim.Optimizer):
        """Steps an inner AdamW, then moves the parameters halfway back (as masking wrappers do)."""

        def __init__(self, params):
            self.optimizer = torch.optim.AdamW(params, lr=1e-2)
            super().__init__(self.optimizer.param_groups, {})
            self.state = self.optimizer.state

        @torch.no_grad()
        def step(self, closure=None):
            before = [p.clone() for g in self.param_groups for p in g["params"]]
            self.optimizer.step()
            for p, b in zip((p for g in self.param_groups for p in g["params"]), before):
                p.lerp_(b, 0.5)

    model = torch.nn.Linear(8, 1)
    values, messages = monitored_run(Blend(model.parameters()), model, 4)
    assert values == {} and len(messages) == 1 and "Blend has a step() whose update is not Adam's" in messages[0]


def test_an_update_that_is_not_adams_is_not_read():
    model = torch.nn.Linear(8, 1)
    values, messages = monitored_run(HandAdam(model.parameters(), sign=True), model, 4)
    assert values == {} and len(messages) == 1 and "HandAdam has a step() whose update is not Adam's" in messages[0]


def test_a_step_that_consumes_the_gradient_is_named():
    model = torch.nn.Linear(8, 1)
    values, messages = monitored_run(HandAdam(model.parameters(), consume=True), model, 3)
    assert values == {} and len(messages) == 1
    assert "cleared the gradients it was given" in messages[0] and "consume_grad = True" in messages[0]


def test_a_step_marked_as_consuming_its_gradients_is_read_from_the_gradients_it_was_given():
    model = torch.nn.Linear(8, 1)
    opt = HandAdam(model.parameters(), consume=True)
    opt.consume_grad = True
    values, messages = monitored_run(opt, model, 4)
    assert messages == [] and 0 < values["adam/update_rms"] <= 1


def test_moments_that_took_in_another_gradient_are_named():
    class Clipped(HandAdam):
        """Clips the gradient inside its step, out of the reader's sight."""

        def step(self, closure=None):
            grads = {p: p.grad for g in self.param_groups for p in g["params"]}
            for p, g in grads.items():
                p.grad = g.clamp(-1e-3, 1e-3)
            super().step(closure)
            for p, g in grads.items():
                p.grad = g

    model = torch.nn.Linear(8, 1)
    _, messages = monitored_run(Clipped(model.parameters()), model, 3)
    assert len(messages) == 1 and "first moment of Clipped took in neither the gradient" in messages[0]


def test_a_second_moment_that_is_not_adams_is_named():
    # Its direction is Adam's m̂/(√v̂+ε), and v differs from Adam's by (1 − β2)·v a step: the
    # check compares what v took in, not v.
    model = torch.nn.Linear(8, 1)
    values, messages = monitored_run(HandAdam(model.parameters(), beta2=0.999, yogi=True), model, 3)
    assert values == {} and len(messages) == 1 and "second moment of HandAdam is not" in messages[0]


def test_a_state_that_counts_no_steps_is_named_not_left_silent():
    # Its moments are Adam's, but no reader can tell how many steps they have taken in: rather
    # than read nothing for the whole run, the monitor says so at the first step.
    model = torch.nn.Linear(8, 1)
    values, messages = monitored_run(HandAdam(model.parameters(), counted=False), model, 3)
    assert values == {} and len(messages) == 1
    assert "stopped monitoring HandAdam" in messages[0] and "no step count" in messages[0], messages
    assert "'exp_avg', 'exp_avg_sq'" in messages[0]


def test_groups_that_are_not_adams_say_what_is_missing():
    p = [torch.nn.Parameter(torch.zeros(2))]
    no_eps = torch.optim.Optimizer(p, dict(lr=1.0, betas=(0.9, 0.99)))
    assert "its param group 0 has no eps" in unsupported_reason(no_eps)
    three = torch.optim.Optimizer(p, dict(lr=1.0, betas=(0.9, 0.99, 0.999), eps=1e-8))
    assert "has 3 betas" in unsupported_reason(three)
    with pytest.raises(UnsupportedOptimizer, match="has 3 betas"):
        StepReader(three)
