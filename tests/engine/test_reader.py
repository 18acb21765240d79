"""Reading torch Adam/AdamW state: the rebuilt update and the statistics, over all configurations."""

import copy
import itertools
import json
import warnings

import pytest
import torch

from adam_monitor import Monitor
from adam_monitor.diagnostics import EPS_COUNT, tensor_statistics
from adam_monitor.engine.reader import StepReader, UnsupportedOptimizer
from adam_monitor.optim import Adam

IMPLEMENTATIONS = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
DECAY = {"none": (torch.optim.Adam, 0.0), "adam-l2": (torch.optim.Adam, 0.1), "adamw": (torch.optim.AdamW, 0.1)}


def combinations():
    for impl, amsgrad, maximize, decay, tensor_lr in itertools.product(
        IMPLEMENTATIONS, [False, True], [False, True], DECAY, [False, True]
    ):
        # torch rejects a tensor lr on the foreach path unless capturable (a CUDA-graph mode).
        if tensor_lr and impl == "foreach":
            continue
        yield pytest.param(
            impl,
            amsgrad,
            maximize,
            decay,
            tensor_lr,
            id=f"{impl}-ams{int(amsgrad)}-max{int(maximize)}-{decay}-lr{'T' if tensor_lr else 'f'}",
        )


def make_problem(impl, amsgrad, maximize, decay, tensor_lr):
    cls, wd = DECAY[decay]
    lr = (lambda x: torch.tensor(x, dtype=torch.float64)) if tensor_lr else float
    a = [
        torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64)),
        torch.nn.Parameter(torch.randn(7, dtype=torch.float64)),
    ]
    frozen = torch.nn.Parameter(torch.randn(4, dtype=torch.float64), requires_grad=False)
    sometimes = torch.nn.Parameter(torch.randn(2, 2, dtype=torch.float64))
    b = [torch.nn.Parameter(torch.randn(6, dtype=torch.float64)), frozen, sometimes]
    opt = cls(
        [
            dict(params=a, lr=lr(1e-2), betas=(0.9, 0.99), eps=1e-8),
            dict(params=b, lr=lr(3e-3), betas=(0.8, 0.95), eps=1e-6),
        ],
        weight_decay=wd,
        amsgrad=amsgrad,
        maximize=maximize,
        **IMPLEMENTATIONS[impl],
    )
    return opt, a + b, frozen, sometimes


@pytest.mark.parametrize("impl,amsgrad,maximize,decay,tensor_lr", list(combinations()))
def test_rebuilt_update_and_statistics_match_an_independent_computation(impl, amsgrad, maximize, decay, tensor_lr):
    opt, params, frozen, sometimes = make_problem(impl, amsgrad, maximize, decay, tensor_lr)
    reader = StepReader(opt)
    cls, wd = DECAY[decay]
    decoupled = cls is torch.optim.AdamW
    for t in range(1, 6):
        for p in params:
            p.grad = None if p is frozen or (p is sometimes and t in (2, 3)) else torch.randn_like(p) * (1 + t)
        before = {p: p.detach().clone() for p in params}
        v_before = {p: opt.state[p]["exp_avg_sq"].clone() for p in params if opt.state.get(p)}
        opt.step()
        rows, step = reader.read()
        assert step == t
        position = {id(p): i for i, p in enumerate(reader.params)}
        for group in opt.param_groups:
            beta1, beta2 = group["betas"]
            lr = float(group["lr"])
            for p in group["params"]:
                row = rows[position[id(p)]]
                if p.grad is None:
                    assert (row == 0).all(), "a parameter that did not step adds nothing"
                    continue
                state = opt.state[p]
                n = int(state["step"])
                applied = before[p] - p.detach()
                if decoupled:
                    applied -= lr * wd * before[p]
                u = reader.direction(p, state, group, n)
                torch.testing.assert_close(lr * u, applied, rtol=1e-9, atol=1e-15)
                g = -p.grad if maximize else p.grad
                if wd and not decoupled:
                    g = g + wd * before[p]
                c2, c2_prev = 1 - beta2**n, 1 - beta2 ** (n - 1)
                v_hat = state["exp_avg_sq"] / c2
                v_hat_prev = v_before[p] / c2_prev if n > 1 else None
                v_den = state["max_exp_avg_sq"] / c2 if amsgrad else None
                expected = tensor_statistics(g, applied / lr, v_hat, v_hat_prev, group["eps"], v_den)
                torch.testing.assert_close(row, expected, rtol=1e-9, atol=1e-12)


def test_a_skipped_step_is_not_a_step():
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.Adam([p])
    reader = StepReader(opt)
    p.grad = torch.randn(3)
    opt.step()
    assert reader.read()[1] == 1
    # The post-hook can fire without the state moving (fused kernels under GradScaler do): no record.
    assert reader.read() is None


@pytest.mark.parametrize("make", [lambda ps: torch.optim.SGD(ps, lr=0.1), lambda ps: torch.optim.Adagrad(ps)])
def test_an_optimizer_without_adam_state_warns_once_and_training_goes_on(make, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    p = torch.nn.Parameter(torch.randn(3))
    opt = make([p])
    with pytest.raises(UnsupportedOptimizer, match=type(opt).__name__):
        StepReader(opt)
    writer = SummaryWriter(str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = Monitor(opt, writer=writer, log_every_n_steps=1)
        for _ in range(3):
            p.grad = torch.randn(3)
            opt.step()
        monitor.close()
    messages = [str(w.message) for w in caught if "adam-monitor" in str(w.message)]
    assert len(messages) == 1
    assert type(opt).__name__ in messages[0] and "exp_avg" in messages[0]
    assert monitor.compute() == {} and monitor.optimizers == []


def _transformers_adafactor(ps):
    optimization = pytest.importorskip("transformers.optimization")
    return optimization.Adafactor(ps, lr=1e-3, relative_step=False, scale_parameter=False)


@pytest.mark.parametrize("make", [torch.optim.Adafactor, _transformers_adafactor], ids=["torch", "transformers"])
def test_adafactor_is_named_for_what_it_keeps_and_pointed_to_a_monitored_equivalent(make):
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = make([p])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = Monitor(opt, log_every_n_steps=1)
        for _ in range(3):
            p.grad = torch.randn(4, 3)
            opt.step()
        monitor.close()
    messages = [str(w.message) for w in caught if "adam-monitor" in str(w.message)]
    assert len(messages) == 1 and "factors its second moment (Adafactor)" in messages[0], messages
    assert monitor.compute() == {} and monitor.optimizers == []
    # the equivalent it names exists as written, and is read
    assert "adam_monitor.optim.Adam(beta2_schedule='adafactor', update_clip=1.0)" in messages[0]
    equivalent = Adam([torch.nn.Parameter(torch.randn(4, 3))], beta2_schedule="adafactor", update_clip=1.0)
    assert StepReader(equivalent).rule == "in_step"


def test_an_adam_subclass_with_other_state_keys_is_dropped_with_one_warning():
    class RenamedState(torch.optim.Adam):
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    state = self.state[p]
                    state["step"] = state.get("step", torch.tensor(0.0)) + 1
                    state["first_moment"] = p.grad.clone()
                    p.data.add_(p.grad, alpha=-group["lr"])

    p = torch.nn.Parameter(torch.randn(3))
    opt = RenamedState([p])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = Monitor(opt, log_every_n_steps=1)
        for _ in range(3):
            p.grad = torch.randn(3)
            opt.step()
    messages = [str(w.message) for w in caught if "adam-monitor" in str(w.message)]
    assert len(messages) == 1 and "RenamedState" in messages[0] and "exp_avg" in messages[0]
    assert monitor.optimizers == [] and not opt._optimizer_step_post_hooks


def test_step_counts_on_the_device_are_read_once_then_counted_on_the_host(monkeypatch):
    """Fused and capturable Adam keep ``step`` on the device, where each read is a host sync.

    Made to take that route on the CPU, the monitor reads the counts at the first step, after a
    loaded state (new count tensors) and on a GradScaler's steps (whose inf/NaN skip only the
    device knows), and counts them itself otherwise; its records equal those of a reader that
    reads every step.
    """
    import adam_monitor.engine.reader as state_module

    def run(counts_on_device: bool):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(64)), torch.nn.Parameter(torch.randn(8))]
        opt = torch.optim.AdamW(params, betas=(0.9, 0.95), fused=True)
        monitor = Monitor(opt, log_every_n_steps=None)
        scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
        scaler.scale(torch.ones(()))  # what scaling a loss does first: create the scale
        reads = []
        with monkeypatch.context() as m:
            if counts_on_device:
                m.setattr(state_module, "_cpu_steps", lambda raw: None)
            real_tolist = torch.Tensor.tolist
            m.setattr(torch.Tensor, "tolist", lambda t: reads.append(len(reads)) or real_tolist(t))
            steps_read = []
            for t in range(1, 13):
                for p in params:
                    p.grad = torch.randn_like(p)
                before = len(reads)
                if t in (6, 7):  # through a GradScaler; step 6's gradient overflows
                    for p in params:
                        p.grad.mul_(scaler.get_scale())
                    if t == 6:
                        params[1].grad[0] = float("inf")
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                if t == 5:
                    saved = copy.deepcopy(opt.state_dict())
                if t == 9:
                    opt.load_state_dict(saved)  # back to step 5's counts, in new tensors
                steps_read.append(len(reads) > before)
            tracked = monitor._tracked[0]
            record = (monitor.compute(), tracked.applied, tracked.hook_skips, tracked.step)
        monitor.close()
        return record, steps_read, [int(s["step"]) for s in opt.state.values()]

    reference, _, ref_counts = run(counts_on_device=False)
    record, steps_read, counts = run(counts_on_device=True)
    assert counts == ref_counts == [8, 8]  # 12 calls, one skipped by the scaler, 3 undone by the load
    assert record == reference
    assert record[1:] == (11, 1, 8)
    # Read at step 1, at the scaler's steps 6 and 7, and at 10 (after the load at 9); counted otherwise.
    assert steps_read == [t in (1, 6, 7, 10) for t in range(1, 13)]


NADAM_RADAM = [
    pytest.param(cls, impl, maximize, decay, id=f"{cls.__name__}-{impl}-max{int(maximize)}-{decay}")
    for cls in (torch.optim.NAdam, torch.optim.RAdam)
    for impl in ("for-loop", "foreach")
    for maximize in (False, True)
    for decay in ("none", "l2", "decoupled")
]


@pytest.mark.parametrize("cls,impl,maximize,decay", NADAM_RADAM)
def test_nadam_and_radam_steps_are_rebuilt_and_their_statistics_exact(cls, impl, maximize, decay):
    # β2 = 0.95 puts RAdam's switch from the momentum alone to its rectified step (ρ_t > 5) at step 6.
    torch.manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64)),
        torch.nn.Parameter(torch.randn(4, dtype=torch.float64)),
    ]
    opt = cls(
        params,
        lr=1e-2,
        betas=(0.9, 0.95),
        eps=1e-3,  # large enough that ε-dominance counts something
        weight_decay=0.0 if decay == "none" else 0.1,
        decoupled_weight_decay=decay == "decoupled",
        maximize=maximize,
        foreach=impl == "foreach",
    )
    reader = StepReader(opt)
    assert reader.rule == cls.__name__.lower() and not reader.unverified
    rectified_steps, eps_counted = [], 0.0
    for t in range(1, 11):
        # The second tensor's gradients sit far below ε: ε sets its step (where ε has a part in it).
        params[0].grad = torch.randn_like(params[0]) * 10 ** (-(t % 3))
        params[1].grad = torch.randn_like(params[1]) * 1e-5
        before = {p: p.detach().clone() for p in params}
        v_before = {p: opt.state[p]["exp_avg_sq"].clone() for p in params if opt.state.get(p)}
        opt.step()
        rows, step = reader.read()
        assert step == t
        for i, p in enumerate(params):
            applied = before[p] - p.detach()
            if decay == "decoupled":
                applied -= 1e-2 * 0.1 * before[p]
            state = opt.state[p]
            u = reader.direction(p, state, opt.param_groups[0], t)
            torch.testing.assert_close(1e-2 * u, applied, rtol=1e-9, atol=1e-15)
            g = -p.grad if maximize else p.grad
            if decay == "l2":
                g = g + 0.1 * before[p]
            c2, c2_prev = 1 - 0.95**t, 1 - 0.95 ** (t - 1)
            eps = 1e-3
            if cls is torch.optim.RAdam:
                rho_inf = 2 / 0.05 - 1
                rectified = rho_inf - 2 * t * 0.95**t / c2 > 5
                rectified_steps.append(rectified)
                eps = 1e-3 / c2**0.5  # RAdam's ε is added to √v: it sets the step where √v̂ ≤ ε/√c2
            v_hat_prev = v_before[p] / c2_prev if t > 1 else None
            expected = tensor_statistics(g, applied / 1e-2, state["exp_avg_sq"] / c2, v_hat_prev, eps)
            if cls is torch.optim.RAdam and not rectified:
                expected[EPS_COUNT] = 0.0  # the momentum alone sets the step: ε has no part in it
            torch.testing.assert_close(rows[i], expected, rtol=1e-9, atol=1e-12)
        eps_counted += float(rows[:, EPS_COUNT].sum())
    if cls is torch.optim.RAdam:
        switch = rectified_steps.index(True)
        assert switch > 0 and all(rectified_steps[switch:]), "both regimes are covered, in order"
    # (Under L2 decay the gradient holds 0.1·p, far above ε.)
    assert eps_counted > 0 or decay == "l2", "some coordinates are ε-dominated"


class CallsItsBase(torch.optim.AdamW):
    """A subclass with a step of its own that still steps as AdamW (it only counts its calls)."""

    calls = 0

    def step(self, closure=None):
        self.calls += 1
        return super().step(closure)


class Cautious(torch.optim.AdamW):
    """AdamW's update masked where it disagrees in sign with the gradient (a 'cautious' optimizer)."""

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        before = [p.clone() for p in params]
        super().step(closure)
        for p, b in zip(params, before):
            delta = p - b
            p.copy_(b + delta * ((delta * -p.grad) > 0))


class SignUpdate(torch.optim.AdamW):
    """AdamW's state, a sign update: the step is lr·sign(m)."""

    @torch.no_grad()
    def step(self, closure=None):
        params = [(p, g["lr"]) for g in self.param_groups for p in g["params"] if p.grad is not None]
        before = [p.clone() for p, _ in params]
        super().step(closure)
        for (p, lr), b in zip(params, before):
            p.copy_(b - lr * self.state[p]["exp_avg"].sign())


def run_subclass(cls, *, lrs=(1e-2,) * 4):
    torch.manual_seed(0)
    model = torch.nn.Linear(32, 8)
    opt = cls(model.parameters(), lr=lrs[0], weight_decay=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = Monitor(opt, named_parameters=model.named_parameters(), log_every_n_steps=None)
        for i, lr in enumerate(lrs):
            opt.param_groups[0]["lr"] = lr
            model(torch.randn(16, 32)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            if i == 0:
                monitor.flush()  # the steps compared are the later ones: a first step is not verified
    values = monitor.compute()
    monitor.close()
    return values, [str(w.message) for w in caught if "adam-monitor" in str(w.message)], opt


def test_a_subclass_that_keeps_its_bases_update_is_read_as_its_base():
    class Plain(torch.optim.AdamW):
        pass

    assert StepReader(Plain([torch.nn.Parameter(torch.zeros(1))])).unverified is False
    expected, _, _ = run_subclass(torch.optim.AdamW)
    for cls in (Plain, CallsItsBase):
        values, messages, opt = run_subclass(cls)
        assert messages == [] and values == pytest.approx(expected, rel=1e-12)
    assert opt.calls == 4


def test_steps_before_the_check_are_counted_but_not_recorded(tmp_path):
    # A step whose update is not yet known to be Adam's (the first: sign descent tells nothing)
    # may be wrong: it is counted apart, neither recorded nor a skipped step.
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = CallsItsBase(model.parameters(), lr=1e-2)
    monitor = Monitor(opt, log_dir=tmp_path, log_every_n_steps=None)
    for _ in range(3):
        monitor.note_step_attempt(opt)
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    monitor.close()
    (entry,) = json.loads((tmp_path / "adam_monitor" / "run.json").read_text())["monitored"]
    assert (entry["steps_applied"], entry["steps_unverified"], entry["steps_skipped"]) == (2, 1, 0)


@pytest.mark.parametrize("cls,off_by", [(Cautious, "update_rms 28% off"), (SignUpdate, "sign update")])
def test_a_subclass_whose_step_changes_the_update_is_not_read_as_its_base(cls, off_by):
    values, messages, opt = run_subclass(cls)
    assert values == {}, f"nothing logged rather than numbers that are wrong ({off_by})"
    assert len(messages) == 1
    assert cls.__name__ in messages[0] and "not AdamW's" in messages[0] and "% RMS" in messages[0]
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_a_first_step_at_lr_zero_defers_the_check_to_the_next():
    # Warmup schedules often start at lr = 0, where no update shows what the class does.
    values, messages, _ = run_subclass(SignUpdate, lrs=(0.0, 1e-2, 1e-2))
    assert values == {} and len(messages) == 1 and "SignUpdate" in messages[0]
    values, messages, _ = run_subclass(CallsItsBase, lrs=(0.0, 1e-2, 1e-2))
    assert messages == [] and values["adam/update_rms"] > 0


@pytest.mark.parametrize("maximize", [False, True])
def test_sparse_adam_steps_are_rebuilt_and_their_statistics_exact(maximize):
    # An embedding's sparse gradient: rows of absent tokens neither move nor decay their moments.
    torch.manual_seed(0)
    emb = torch.nn.Embedding(40, 6, sparse=True).double()
    opt = torch.optim.SparseAdam(emb.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-3, maximize=maximize)
    reader = StepReader(opt)
    (p,) = emb.parameters()
    assert reader.rule == "sparse_adam"
    for t in range(1, 9):
        tokens = torch.randint(0, 10 + 3 * t, (12,))  # later steps reach rows never seen before
        emb(tokens).square().sum().mul(10 ** -(t % 3)).backward()
        before, v_before = p.detach().clone(), opt.state[p]["exp_avg_sq"].clone() if opt.state.get(p) else None
        opt.step()
        rows, step = reader.read()
        state = opt.state[p]
        applied = before - p.detach()
        u = reader.direction(p, state, opt.param_groups[0], step)
        torch.testing.assert_close(1e-2 * u, applied, rtol=1e-9, atol=1e-15)
        assert (applied[~torch.isin(torch.arange(40), tokens)] == 0).all()
        g = p.grad.coalesce().to_dense()
        c2, c2_prev = 1 - 0.95**step, 1 - 0.95 ** (step - 1)
        v_hat_prev = v_before / c2_prev if step > 1 else None
        expected = tensor_statistics(g, applied / 1e-2, state["exp_avg_sq"] / c2, v_hat_prev, 1e-3 / c2**0.5)
        torch.testing.assert_close(rows[0], expected, rtol=1e-9, atol=1e-12)
        opt.zero_grad()
