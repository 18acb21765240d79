"""Other libraries' Adams, read once their update is verified to be Adam's.

The rebuilt-update test: the direction the monitor reports equals ``(p_before − p_after)/lr``
(decay excluded) to float rounding, and each row equals the float64 reference computed from the
gradient and the state as the library keeps them. Others are named, not read.
"""

import pytest
import torch
from support import assert_named_and_not_read, small_model

from adam_monitor.diagnostics import tensor_statistics
from adam_monitor.engine.reader import StepReader

optimi = pytest.importorskip("optimi")
pytorch_optimizer = pytest.importorskip("pytorch_optimizer")

LR = 1e-2

#: name -> (make, what the step keeps of p before it: a factor, or "l2" where λ·p goes into g)
READ = {
    "optimi.Adam": (lambda ps: optimi.Adam(ps, lr=LR, foreach=False), 1.0),
    "optimi.Adam-l2": (lambda ps: optimi.Adam(ps, lr=LR, weight_decay=1e-2, foreach=False), "l2"),
    "optimi.AdamW": (lambda ps: optimi.AdamW(ps, lr=LR, weight_decay=1e-2, foreach=False), 1 - LR * 1e-2),
    "optimi.AdamW-decouple_lr": (
        lambda ps: optimi.AdamW(ps, lr=LR, weight_decay=1e-4, decouple_lr=True, foreach=False),
        1 - 1e-4,
    ),
    # Its denominator is max(√v̂, ε), Adam's √v̂ + ε: the same at ε = 0.
    "pytorch_optimizer.GrokFastAdamW": (
        lambda ps: pytorch_optimizer.GrokFastAdamW(ps, lr=LR, weight_decay=1e-2, eps=0.0, grokfast=False),
        1 - LR * 1e-2,
    ),
}


def params64():
    torch.manual_seed(0)
    return [
        torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64)),
        torch.nn.Parameter(torch.randn(5, dtype=torch.float64)),
    ]


@pytest.mark.parametrize("name", READ)
def test_adams_of_other_libraries_are_read_exactly(name):
    # Both keep the step count in the group; optimi keeps its moments bias-corrected (m̂, v̂ through β̂_t).
    make, kept = READ[name]
    params = params64()
    opt = make(params)
    reader = StepReader(opt)
    for t in range(1, 31):
        for p in params:
            p.grad = torch.randn_like(p) * (1 + t % 5)
        grads = {p: p.grad.clone() for p in params}
        before = {p: p.detach().clone() for p in params}
        v_before = {p: opt.state[p]["exp_avg_sq"].clone() for p in params if opt.state.get(p)}
        opt.step()
        rows, step = reader.read()
        assert step == t and reader.unverified == (t == 1)
        if t == 1:
            continue  # not recorded: what the update is, and how its moments are kept, shows from the second
        group = opt.param_groups[0]
        beta2 = group["betas"][1] if "betas" in group else None
        c2, c2_prev = (1.0, 1.0) if beta2 is None else (1 - beta2**t, 1 - beta2 ** (t - 1))
        for i, p in enumerate(params):
            applied = (before[p] if kept == "l2" else kept * before[p]) - p.detach()
            u = reader.direction(p, opt.state[p], group, step)
            torch.testing.assert_close(LR * u, applied, rtol=1e-9, atol=1e-15)
            g = grads[p] + 1e-2 * before[p] if kept == "l2" else grads[p]
            v_hat, v_hat_prev = opt.state[p]["exp_avg_sq"] / c2, v_before[p] / c2_prev
            expected = tensor_statistics(g, applied / LR, v_hat, v_hat_prev, group["eps"])
            torch.testing.assert_close(rows[i], expected, rtol=1e-9, atol=1e-12)


#: name -> (make, what the warning must say)
NOT_READ = {
    "optimi.StableAdamW": (lambda ps: optimi.StableAdamW(ps, lr=LR, foreach=False), "update is not Adam's"),
    "optimi.RAdam": (lambda ps: optimi.RAdam(ps, lr=LR, foreach=False), "update is not Adam's"),
    "pytorch_optimizer.Yogi": (lambda ps: pytorch_optimizer.Yogi(ps, lr=LR), "second moment of Yogi is not"),
    "pytorch_optimizer.LaProp": (lambda ps: pytorch_optimizer.LaProp(ps, lr=LR), "first moment of LaProp"),
    "pytorch_optimizer.ADOPT": (lambda ps: pytorch_optimizer.ADOPT(ps, lr=LR), "first moment of ADOPT"),
    "pytorch_optimizer.AdaBelief": (lambda ps: pytorch_optimizer.AdaBelief(ps, lr=LR), "no exp_avg_sq"),
    "pytorch_optimizer.Adan": (lambda ps: pytorch_optimizer.Adan(ps, lr=LR), "has 3 betas"),
}


@pytest.mark.parametrize("name", NOT_READ)
def test_adam_shaped_state_with_another_update_is_named_and_not_read(name):
    make, says = NOT_READ[name]
    model = small_model()
    assert_named_and_not_read(make(model.parameters()), model, says)
