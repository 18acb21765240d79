"""Reading torch Adam/AdamW state: the rebuilt update and the statistics, over all configurations."""

import copy
import itertools
import warnings

import pytest
import torch

from adam_monitor import Monitor
from adam_monitor.diagnostics import tensor_statistics
from adam_monitor.engine.reader import StepReader, UnsupportedOptimizer

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
