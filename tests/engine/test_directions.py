"""Adam-shaped optimizers whose step is not Adam's, read through a registered direction.

``NesterovAdam`` is written as a third-party library would write one (not a subclass of torch's):
Adam's moments, a Nesterov step. The rebuilt-update test: the direction the monitor reports
equals ``(p_before − p_after)/lr`` (decay excluded) to float rounding, and each row equals the
float64 reference computed from the gradient and the state.
"""

import importlib.util
import pathlib
import sys
import types
import warnings

import pytest
import torch
from support import monitored_run

from adam_monitor import Monitor, register_direction
from adam_monitor.diagnostics import tensor_statistics
from adam_monitor.engine import directions
from adam_monitor.engine.reader import StepReader

LR, WD = 1e-2, 0.05


class NesterovAdam(torch.optim.Optimizer):
    def __init__(self, params, lr=LR, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, decay="decoupled", **kw):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=False))
        self.decay = decay
        self.kw = kw

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            (b1, b2), lr, wd, eps = group["betas"], group["lr"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = -p.grad if group["maximize"] else p.grad
                if self.decay == "l2":
                    g = g + wd * p
                elif self.decay == "decoupled":
                    p.mul_(1 - lr * wd)
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                state["step"] += 1
                t = state["step"].item()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                u = (b1 * m + (1 - b1) * g) / (1 - b1**t) / ((v / (1 - b2**t)).sqrt() + eps)
                if self.kw.get("clamp"):
                    u = u.clamp(-0.5, 0.5)
                p.sub_(lr * u)


def nesterov(state, grad, group, step):
    beta1, beta2 = group["betas"]
    m = beta1 * state["exp_avg"] + (1 - beta1) * grad
    v_hat = state["exp_avg_sq"] / (1 - beta2**step)
    return m / (1 - beta1**step) / (v_hat.sqrt() + group["eps"])


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry for the test: what it registers is gone after it."""
    monkeypatch.setattr(directions, "_REGISTRY", dict(directions._REGISTRY))
    return directions._REGISTRY


def params64():
    torch.manual_seed(0)
    return [
        torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64)),
        torch.nn.Parameter(torch.randn(5, dtype=torch.float64)),
    ]


def check_rebuilt_update(opt, params, steps=30, kept=lambda lr, wd: 1.0, rule="registered"):
    """The rebuilt-update test over ``steps`` steps; returns the reader."""
    reader = StepReader(opt)
    assert reader.rule == rule and reader.unverified
    group = opt.param_groups[0]
    for t in range(1, steps + 1):
        for p in params:
            p.grad = torch.randn_like(p) * (1 + t % 5)
        grads = {p: (-p.grad if group.get("maximize") else p.grad).clone() for p in params}
        before = {p: p.detach().clone() for p in params}
        v_before = {p: opt.state[p]["exp_avg_sq"].clone() for p in params if opt.state.get(p)}
        opt.step()
        rows, step = reader.read()
        assert step == t and reader.unverified == (t == 1), "verified at its second step"
        lr, (_, b2) = group["lr"], group["betas"]
        for i, p in enumerate(params):
            applied = kept(lr, group["weight_decay"]) * before[p] - p.detach()
            u = reader.direction(p, opt.state[p], group, step)
            torch.testing.assert_close(lr * u, applied, rtol=1e-9, atol=1e-15)
            v_hat_prev = v_before[p] / (1 - b2 ** (t - 1)) if t > 1 else None
            expected = tensor_statistics(
                grads[p], applied / lr, opt.state[p]["exp_avg_sq"] / (1 - b2**t), v_hat_prev, group["eps"]
            )
            if t > 1:
                torch.testing.assert_close(rows[i], expected, rtol=1e-9, atol=1e-12)
    return reader


@pytest.mark.parametrize("decay", ["none", "decoupled"])
@pytest.mark.parametrize("maximize", [False, True], ids=["minimize", "maximize"])
def test_a_registered_direction_is_read_exactly(registry, decay, maximize):
    register_direction(NesterovAdam, nesterov)
    params = params64()
    opt = NesterovAdam(params, weight_decay=0.0 if decay == "none" else WD, decay=decay)
    opt.param_groups[0]["maximize"] = maximize
    check_rebuilt_update(opt, params, kept=lambda lr, wd: 1 - lr * wd)


def test_a_class_registered_by_its_dotted_name_and_its_subclasses_are_read(registry):
    class Subclass(NesterovAdam):
        pass

    register_direction(f"{NesterovAdam.__module__}.{NesterovAdam.__qualname__}", nesterov)
    params = params64()
    check_rebuilt_update(Subclass(params), params, steps=5)


def test_the_monitor_logs_the_update_rms_of_the_steps_a_registered_direction_applied(registry):
    register_direction(NesterovAdam, nesterov)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    opt = NesterovAdam(model.parameters(), lr=1e-3)
    monitor = Monitor(opt, named_parameters=model.named_parameters(), log_every_n_steps=None)
    w, applied = model[0].weight, []
    for t in range(1, 21):
        model(torch.randn(16, 8, dtype=torch.float64)).square().mean().backward()
        before = w.detach().clone()
        opt.step()
        opt.zero_grad()
        if t > 1:  # the first step is checked against the next, not recorded
            applied.append((before - w.detach()) / 1e-3)
    expected = torch.stack(applied).square().mean().sqrt().item()
    values = monitor.compute()
    monitor.close()
    assert values["adam_per_parameter/update_rms/0.weight"] == pytest.approx(expected, rel=1e-9)


def test_unregistered_it_is_refused_as_not_adams(registry):
    model = torch.nn.Linear(8, 1)
    values, messages = monitored_run(NesterovAdam(model.parameters()), model, 4)
    assert values == {} and len(messages) == 1
    assert "NesterovAdam has a step() whose update is not Adam's" in messages[0]


def test_a_step_that_is_not_the_registered_direction_is_refused_by_how_much(registry):
    register_direction(NesterovAdam, nesterov)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    values, messages = monitored_run(NesterovAdam(model.parameters(), clamp=True), model, 4)
    assert values == {} and len(messages) == 1
    assert "the step of NesterovAdam is not the direction registered for it" in messages[0]
    assert "% RMS" in messages[0] and "Training goes on" in messages[0]


@pytest.mark.parametrize(
    "direction, expected",
    [
        (lambda state, grad, group, step: 1 / 0, "the direction registered for NesterovAdam raised ZeroDivisionError"),
        (
            lambda state, grad, group, step: grad.reshape(-1)[:1],
            "the direction registered for NesterovAdam returned (1,)",
        ),
        (lambda state, grad, group, step: 1.0, "the direction registered for NesterovAdam returned float"),
    ],
    ids=["raises", "shape", "not-a-tensor"],
)
def test_a_faulty_registered_direction_stops_the_monitoring_not_the_run(registry, direction, expected):
    register_direction(NesterovAdam, direction)
    model = torch.nn.Linear(8, 1)
    opt = NesterovAdam(model.parameters())
    values, messages = monitored_run(opt, model, 4)
    assert values == {} and len(messages) == 1 and expected in messages[0], messages
    assert opt.state[model.weight]["step"].item() == 4, "training went on"


def test_moments_that_took_in_l2_decay_are_named(registry):
    register_direction(NesterovAdam, nesterov)
    model = torch.nn.Linear(8, 1)
    values, messages = monitored_run(NesterovAdam(model.parameters(), weight_decay=WD, decay="l2"), model, 4)
    assert values == {} and len(messages) == 1
    assert "took in L2 weight decay" in messages[0] and "only with decoupled weight decay or none" in messages[0]


def test_bad_registrations_name_what_to_fix(registry):
    with pytest.raises(TypeError, match="optimizer_class must be a torch.optim.Optimizer subclass"):
        register_direction(object, nesterov)
    with pytest.raises(ValueError, match="not a dotted class name"):
        register_direction("NesterovAdam", nesterov)
    with pytest.raises(ValueError, match="AdamW is torch's and read by its own rule"):
        register_direction(torch.optim.AdamW, nesterov)
    with pytest.raises(TypeError, match="direction must be callable"):
        register_direction(NesterovAdam, "nesterov")
    assert directions.registered_direction(NesterovAdam) is None


# ----------------------------------------------------------------------------------- timm


def timm_optim(module: str):
    """A module of timm's optimizers, without timm's package: importing ``timm`` imports torchvision's
    compiled ops, which a CPU build of torch without a matching torchvision cannot load; its
    optimizer modules import only torch."""
    spec = importlib.util.find_spec("timm")
    if spec is None:
        pytest.skip("timm is not installed")
    root = pathlib.Path(spec.submodule_search_locations[0])
    # Stand-ins for the two packages while the module imports, removed after it: left in place, a
    # package without a spec would break find_spec("timm") for whatever imports later.
    stand_ins = [name for name in ("timm", "timm.optim") if name not in sys.modules]
    for name, path in (("timm", root), ("timm.optim", root / "optim")):
        if name in stand_ins:
            package = types.ModuleType(name)
            package.__path__ = [str(path)]
            sys.modules[name] = package
    try:
        return importlib.import_module(f"timm.optim.{module}")
    finally:
        for name in stand_ins:
            sys.modules.pop(name, None)


@pytest.mark.parametrize("foreach", [False, True], ids=["for-loop", "foreach"])
@pytest.mark.parametrize("maximize", [False, True], ids=["minimize", "maximize"])
def test_timm_nadamw_is_read_exactly(foreach, maximize):
    nadamw = timm_optim("nadamw")
    params = params64()
    opt = nadamw.NAdamW(params, lr=LR, weight_decay=WD, foreach=foreach, maximize=maximize)
    check_rebuilt_update(opt, params, kept=lambda lr, wd: 1 - lr * wd)


@pytest.mark.parametrize("foreach", [False, True], ids=["for-loop", "foreach"])
def test_timm_adamw_legacy_is_read_exactly_as_adam(foreach):
    adamw = timm_optim("adamw")
    params = params64()
    opt = adamw.AdamWLegacy(params, lr=LR, weight_decay=WD, foreach=foreach)
    check_rebuilt_update(opt, params, kept=lambda lr, wd: 1 - lr * wd, rule="adam")


def test_timm_adamp_is_refused_once_its_projection_acts():
    adamp = timm_optim("adamp")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = adamp.AdamP(model.parameters(), lr=1e-2, weight_decay=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = Monitor(opt, log_every_n_steps=None)
        for _ in range(100):
            model(torch.randn(64, 16)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        monitor.close()
    messages = [str(w.message) for w in caught if "adam-monitor" in str(w.message)]
    assert len(messages) == 1 and "AdamP has a step() whose update is not Adam's (at step" in messages[0]


def test_timm_nadamw_with_caution_is_refused():
    nadamw = timm_optim("nadamw")
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    values, messages = monitored_run(nadamw.NAdamW(model.parameters(), lr=1e-3, caution=True), model, 4)
    assert values == {} and len(messages) == 1
    assert "the step of NAdamW is not the direction registered for it" in messages[0]
