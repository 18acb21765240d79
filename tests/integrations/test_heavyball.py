"""HeavyBall's AdamW, read through its registered direction and its per-view state.

HeavyBall keeps the moments bias-corrected in a dict per view of each parameter, divides by
``max(√v̂, ε)``, scales its lr during a warmup inside the step, and by default clears ``p.grad`` in its
step (``consume_grad=True``): the reader holds the gradients from a pre-hook. The rebuilt-update test:
the direction the monitor reports equals ``(kept·p_before − p_after)/lr`` to float rounding, and each
row equals the float64 reference from the gradient the step was given.
"""

import json
import warnings

import pytest
import torch
from support import AdamBoring, assert_named_and_not_read, quiet_trainer, small_model

from adam_monitor import AdamMonitor, Monitor
from adam_monitor.diagnostics import tensor_statistics
from adam_monitor.engine.reader import StepReader

heavyball = pytest.importorskip("heavyball")

LR, EPS = 1e-2, 1e-8

#: name -> HeavyBall AdamW's options
READ = {
    "defaults (consume_grad)": {},
    "consume_grad=False": {"consume_grad": False},
    "decoupled decay": {"weight_decay": 0.1},
    "warmup": {"warmup_steps": 5},
    "for-loop": {"multi_tensor": False},
    "PaLM's beta2 schedule": {"palm": True},  # β2_t = 1 - t^-0.8, written into the group's betas
}


@pytest.mark.parametrize("name", READ)
def test_heavyball_adamw_is_read_exactly(name):
    options = READ[name]
    torch.manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64)),
        torch.nn.Parameter(torch.randn(5, dtype=torch.float64)),
    ]
    opt = heavyball.AdamW(params, lr=LR, eps=EPS, storage_dtype="float64", **options)
    reader = StepReader(opt)
    decay = options.get("weight_decay", 0.0)
    for t in range(1, 31):
        for p in params:
            p.grad = torch.randn_like(p) * (1 + t % 5)
        grads = {p: p.grad.clone() for p in params}
        before = {p: p.detach().clone() for p in params}
        v_before = {p: opt.state[p][0]["update_by_adam_exp_avg_sq_0"].clone() for p in params if opt.state.get(p)}
        opt.step()
        rows, step = reader.read(after_step=True)
        assert step == t and reader.unverified == (t == 1)
        assert all((p.grad is None) == options.get("consume_grad", True) for p in params), "as the step left it"
        if t == 1:
            continue  # not recorded: the first step is sign descent, which says nothing of the update
        group = opt.param_groups[0]
        lr = float(group["prev_lr"])  # the warmup's lr of this step
        assert lr == pytest.approx(LR * min(1.0, t / (options.get("warmup_steps", 0) + 1)))
        assert reader.lr(group) == lr
        for i, p in enumerate(params):
            view = opt.state[p][0]
            applied = ((1 - lr * decay) * before[p] - p.detach()) / lr
            v_hat = view["update_by_adam_exp_avg_sq_0"]
            u = view["update_by_adam_exp_avg_0"] / v_hat.sqrt().clamp_min(EPS)
            torch.testing.assert_close(u, applied, rtol=1e-9, atol=1e-12)
            expected = tensor_statistics(grads[p], u, v_hat, v_before[p], EPS)
            torch.testing.assert_close(rows[i], expected, rtol=1e-9, atol=1e-12)


#: name -> (make, what the warning must say)
NOT_READ = {
    "caution": (lambda ps: heavyball.AdamW(ps, lr=LR, caution=True), "not the direction registered for it"),
    "NAdam": (lambda ps: heavyball.NAdam(ps, lr=LR), "it keeps one state per view"),
}


@pytest.mark.parametrize("name", NOT_READ)
def test_heavyball_updates_that_are_not_adamws_are_named_and_not_read(name):
    make, says = NOT_READ[name]
    model = small_model()
    assert_named_and_not_read(make(model.parameters()), model, says)


def test_a_monitored_heavyball_run_keeps_the_step_clearing_its_gradients():
    # The reader puts the gradients back while it reads and clears them again: what the user's
    # loop sees after step() is HeavyBall's behaviour, and no gradient outlives the read.
    model = small_model()
    opt = heavyball.AdamW(model.parameters(), lr=LR)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = Monitor(opt, named_parameters=model.named_parameters(), log_every_n_steps=None)
        for _ in range(10):
            model(torch.randn(16, 8)).square().mean().backward()
            opt.step()
            assert all(p.grad is None for p in model.parameters())
        values = monitor.compute()
        monitor.close()
    assert [str(w.message) for w in caught if "adam-monitor" in str(w.message)] == []
    assert 0 < values["adam/update_rms"] <= 1 and values["adam/eps_dominance"] == 0
    assert reader_holds_nothing(monitor)


def reader_holds_nothing(monitor) -> bool:
    return all(t.reader._given is None or t.reader._given._given == [] for t in monitor._tracked)


def test_heavyball_under_lightning_is_read_from_the_gradients_its_closure_made(tmp_path):
    # Lightning's step(closure) computes the gradients inside the step, which then clears them:
    # the monitor holds them once the closure returns, and checks the update from the second step.
    torch.manual_seed(0)
    trainer = quiet_trainer(tmp_path, callbacks=[AdamMonitor()], max_steps=8, log_every_n_steps=2)
    trainer.fit(AdamBoring(optimizer=heavyball.AdamW, weight_decay=0.01))
    run = tmp_path / "run" / "version_0" / "adam_monitor" / "run.json"
    (entry,) = json.loads(run.read_text())["monitored"]
    assert (entry["steps"], entry["steps_applied"], entry["steps_unverified"], entry["steps_skipped"]) == (8, 7, 1, 0)


def test_a_closure_given_positionally_is_followed_too():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    opt = heavyball.AdamW(model.parameters(), lr=LR)
    reader = StepReader(opt)
    read = []
    for _ in range(3):

        def closure():
            opt.zero_grad()
            loss = model(torch.randn(16, 8)).square().mean()
            loss.backward()
            return loss

        opt.step(closure)
        read.append(reader.read(after_step=True))
    assert [r is not None and r[1] for r in read] == [1, 2, 3]
    assert reader.unverified is False
