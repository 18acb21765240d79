"""The reader keeps what it reads of an optimizer from step to step (its layout) and rebuilds it
whenever that may have changed: every change below is made mid-run, and every step's rows are
checked against the float64 specification computed from the optimizer's state at that step."""

import copy

import pytest
import torch

from adam_monitor import Monitor
from adam_monitor.diagnostics import tensor_statistics
from adam_monitor.engine.reader import StepReader

IMPLEMENTATIONS = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


def params_of(*shapes):
    return [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]


class Checked:
    """An AdamW (or Adam) run whose reader reads every step right after it, as the monitor's
    hook does, each read checked against the specification."""

    def __init__(self, params, impl="foreach", cls=torch.optim.AdamW, **options):
        self.opt = cls(
            params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **options, **IMPLEMENTATIONS[impl]
        )
        self.reader = StepReader(self.opt)
        self.decoupled = cls is torch.optim.AdamW
        self.generator = torch.Generator().manual_seed(0)
        self.steps = 0

    def params(self):
        return [p for g in self.opt.param_groups for p in g["params"]]

    def gradients(self, *, none=()):
        for p in self.params():
            p.grad = (
                None if any(p is q for q in none) else torch.randn(p.shape, generator=self.generator, dtype=p.dtype)
            )

    def step(self, *, none=()):
        """One step with fresh gradients (``None`` for the params in ``none``), read and checked."""
        self.gradients(none=none)
        state = self.opt.state
        before = {p: p.detach().clone() for p in self.params()}
        v_before = {p: state[p]["exp_avg_sq"].clone() for p in self.params() if state.get(p)}
        counts = {p: int(state[p]["step"]) for p in self.params() if state.get(p)}
        self.opt.step()
        self.steps += 1
        read = self.reader.read(after_step=True)
        assert read is not None
        rows, _ = read
        assert rows.shape[0] == len(self.params()) == len(self.reader.params)
        position = {id(p): i for i, p in enumerate(self.reader.params)}
        for group in self.opt.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd, eps = float(group["lr"]), group["weight_decay"], group["eps"]
            for p in group["params"]:
                row = rows[position[id(p)]]
                if p.grad is None:
                    assert (row == 0).all(), "a parameter that did not step adds nothing"
                    continue
                s = state[p]
                n = int(s["step"])
                assert n == counts.get(p, 0) + 1
                applied = before[p] - p.detach()
                g = p.grad
                if self.decoupled:
                    applied -= lr * wd * before[p]
                else:
                    g = g + wd * before[p]
                c2, c2_prev = 1 - beta2**n, 1 - beta2 ** (n - 1)
                v_prev = v_before[p] / c2_prev if n > 1 else None
                v_den = s["max_exp_avg_sq"] / c2 if group["amsgrad"] else None
                expected = tensor_statistics(g, applied / lr, s["exp_avg_sq"] / c2, v_prev, eps, v_den)
                torch.testing.assert_close(row, expected, rtol=1e-9, atol=1e-12)
        return rows

    def layout(self):
        return self.reader._layout


def stepped_with_random_gradients(opt, params, steps: int):
    """Steps 1 … ``steps`` of ``opt``, each with new random gradients, yielding each step's number after it."""
    for t in range(1, steps + 1):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        yield t


def started(impl: str, *shapes, steps: int):
    """Parameters of ``shapes`` and a checked run of ``impl`` over them, ``steps`` steps in."""
    params = params_of(*shapes)
    run = Checked(params, impl)
    for _ in range(steps):
        run.step()
    return params, run


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_the_layout_is_kept_while_nothing_changes(impl):
    run = Checked(params_of((5, 3), (7,), (4,)), impl)
    run.step()
    layout = run.layout()
    for _ in range(4):
        run.step()
    assert run.layout() is layout


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_an_optimizer_state_loaded_mid_run(impl):
    """load_state_dict replaces the group dicts and every state tensor (step counts included)."""
    run = Checked(params_of((5, 3), (7,), (4,)), impl)
    for _ in range(3):
        run.step()
    saved = copy.deepcopy(run.opt.state_dict())
    for _ in range(3):
        run.step()
    layout = run.layout()
    run.opt.load_state_dict(saved)  # back to step 3's state
    run.step()
    assert run.layout() is not layout
    assert all(int(s["step"]) == 4 for s in run.opt.state.values())
    for _ in range(3):
        run.step()


def test_an_optimizer_state_loaded_mid_run_under_a_monitor_logs_what_a_fresh_one_would():
    def run(reload: bool):
        torch.manual_seed(0)
        params = params_of((5, 3), (7,))
        opt = torch.optim.AdamW(params, betas=(0.9, 0.95), fused=True)
        monitor = Monitor(opt, log_every_n_steps=None)
        generator = torch.Generator().manual_seed(1)
        for t in range(1, 9):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            opt.step()
            if reload and t == 4:
                opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # the same values in new tensors
        out = monitor.compute()
        monitor.close()
        return out

    assert run(reload=True) == run(reload=False)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_param_group_added_mid_run(impl):
    run = Checked(params_of((5, 3), (7,)), impl)
    for _ in range(3):
        run.step()
    run.opt.add_param_group(dict(params=params_of((6,), (2, 2)), lr=3e-3, betas=(0.8, 0.9), eps=1e-6))
    for _ in range(3):  # the new params step from 1 while the others go on: two step counts
        run.step()
    assert len(run.reader.params) == 4


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_param_frozen_after_some_steps_then_unfrozen(impl):
    params, run = started(impl, (5, 3), (7,), (4,), steps=3)
    for _ in range(3):
        run.step(none=params[1:2])  # frozen: its count stays at 3
    layouts = set()
    for _ in range(4):  # unfrozen: its count lags the others' by 3 in the same bucket from now on
        run.step()
        layouts.add(id(run.layout()))
    assert len(layouts) == 1  # the split bucket is kept from step to step
    counts = [int(run.opt.state[p]["step"]) for p in params]
    assert counts == [10, 7, 10]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_gradient_set_to_none_for_one_step(impl):
    params = params_of((5, 3), (7,), (4,))
    run = Checked(params, impl)
    for t in range(6):
        run.step(none=params[:1] if t == 3 else ())


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_param_without_a_gradient_at_first_gets_its_state_later(impl):
    params = params_of((5, 3), (7,))
    run = Checked(params, impl)
    run.opt.state[params[1]]  # an empty state entry before its first step (a defaultdict's)
    for t in range(5):
        run.step(none=params[1:] if t < 2 else ())
    assert int(run.opt.state[params[1]]["step"]) == 3


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_state_dicts_and_state_tensors_replaced_in_place(impl):
    """As moving a state to a device does: new dicts under the same keys, or one tensor of one dict."""
    params, run = started(impl, (5, 3), (7,), steps=3)
    state = run.opt.state
    state[params[0]] = {k: v.clone() for k, v in state[params[0]].items()}
    run.step()
    state[params[1]]["exp_avg_sq"] = state[params[1]]["exp_avg_sq"].clone()
    run.step()
    state[params[1]]["step"] = state[params[1]]["step"].clone()
    run.step()
    run.step()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_parameter_replaced_in_its_group(impl):
    params, run = started(impl, (5, 3), (7,), steps=3)
    replacement = params_of((7,))[0]
    run.opt.param_groups[0]["params"][1] = replacement
    for _ in range(3):
        run.step()
    assert run.reader.params[1] is replacement and int(run.opt.state[replacement]["step"]) == 3


def test_hyper_parameters_changed_mid_run_are_read_at_each_step():
    run = Checked(params_of((5, 3), (7,)), "foreach")
    for t in range(6):
        group = run.opt.param_groups[0]
        group["betas"] = (0.9 - 0.05 * t, 0.95)  # what a scheduler cycling momentum does
        group["eps"] = 1e-8 * (t + 1)
        group["lr"] = 1e-2 / (t + 1)
        run.step()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_amsgrad_and_several_groups(impl):
    a, b = params_of((5, 3), (7,)), params_of((6,), (2, 2))
    run = Checked([dict(params=a), dict(params=b, amsgrad=True, betas=(0.8, 0.9))], impl)
    for t in range(5):
        run.step(none=b[:1] if t == 2 else ())


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_parameter_appended_to_a_groups_list(impl):
    params, run = started(impl, (5, 3), (7,), steps=2)
    run.opt.param_groups[0]["params"].append(params_of((3,))[0])
    for _ in range(2):
        run.step()
    assert len(run.reader.params) == 3


def test_a_group_dict_replaced_where_the_step_count_lives_in_it():
    """Libraries that count steps in the param group (optimi, pytorch-optimizer) count them in
    whatever dict the group is now."""
    from test_foreign import HandAdam

    params = params_of((5, 3), (7,))
    opt = HandAdam(params)
    reader = StepReader(opt)
    for t in stepped_with_random_gradients(opt, params, 6):
        if t == 3:
            opt.param_groups[0] = dict(opt.param_groups[0])  # a copy: the old dict no longer counts
        if t > 3:
            rows, step = reader.read(after_step=True)
            assert step == t and (rows[:, -1] > 0).all()
        else:
            assert reader.read(after_step=True)[1] == t


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_read_before_the_first_step_then_the_state_filled_in_place(impl):
    """The optimizer fills state dicts that already exist (empty ones, as any ``optimizer.state[p]``
    leaves): nothing about the parameters or the gradients changes, yet their state appears."""
    params = params_of((5, 3), (7,))
    run = Checked(params, impl)
    run.gradients()
    for p in params:
        run.opt.state[p]
    assert run.reader.read(after_step=True) is None  # nothing has stepped
    for _ in range(3):
        run.step()


@pytest.mark.parametrize("impl", ["for-loop", "foreach"])  # torch's fused kernel takes no complex tensors
def test_complex_parameters_read_through_views_kept_across_steps(impl):
    """The layout keeps the real views of complex moments; the gradients' are taken at each read.
    Each read equals that of a reader made for that step alone, before and after a load."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3, dtype=torch.complex128)), params_of((7,))[0]]
    opt = torch.optim.AdamW(params, betas=(0.9, 0.95), **IMPLEMENTATIONS[impl])
    reader = StepReader(opt)
    for t in stepped_with_random_gradients(opt, params, 6):
        if t == 3:
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        rows, step = reader.read(after_step=True)
        fresh, fresh_step = StepReader(opt).read()
        assert step == fresh_step and torch.equal(rows, fresh)
        assert rows[0, -1] == 2 * 15  # every real and imaginary part a coordinate


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_read_keeps_no_gradient_alive(impl):
    """zero_grad(set_to_none=True) frees the gradients before the next backward: nothing the
    reader keeps between steps may hold them."""
    import gc
    import weakref

    run = Checked(params_of((5, 3), (7,)), impl)
    for _ in range(2):
        run.step()
    grads = [weakref.ref(p.grad) for p in run.params()]
    run.opt.zero_grad(set_to_none=True)
    gc.collect()
    assert all(g() is None for g in grads)
