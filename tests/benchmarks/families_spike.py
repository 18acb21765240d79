"""Spike families beyond the four the rules were first calibrated on (``families.py``): each a
distinct mechanism, with a matched stable control (one setting changed)."""

from __future__ import annotations

import torch
from families import SPIKE, Family, Setup, mlp, teacher_loss


def _separable_ce(seed: int, variant: str, n: int = 1024, d: int = 16, classes: int = 4, batch: int = 64) -> Setup:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(d, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, classes)
    )
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    y = (x @ torch.randn(d, classes, generator=gen)).argmax(1)  # linearly separable labels
    steps = 800
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range(steps * batch // n + 1)])
    # hard labels: the cross-entropy has no finite minimum; smoothed ones keep the optimum at finite logits
    smoothing = 0.0 if variant == SPIKE else 0.1

    def loss(t: int) -> torch.Tensor:
        rows = order[(t - 1) * batch : t * batch]
        return torch.nn.functional.cross_entropy(model(x[rows]), y[rows], label_smoothing=smoothing)

    opt = torch.optim.Adam(model.parameters(), lr=3e-2, betas=(0.9, 0.999))
    return Setup(model, opt, loss, steps=steps)


def _distribution_shift(seed: int, variant: str, d: int = 16, new: int = 4, h: int = 64, batch: int = 256) -> Setup:
    torch.manual_seed(seed)
    teacher, model = mlp(d, h), mlp(d + new, h)
    teacher.requires_grad_(False)
    with torch.no_grad():
        model[0].weight[:, d:] = 0  # the new inputs start without effect: the loss is continuous at the switch
    gen = torch.Generator().manual_seed(seed)
    switch = 400

    def loss(t: int) -> torch.Tensor:
        x = torch.randn(batch, d, generator=gen)
        # silent inputs until the switch: their weights get exactly zero gradient, so their v stays 0
        extra = 20.0 * torch.randn(batch, new, generator=gen) if t > switch else torch.zeros(batch, new)
        y = teacher(x) + 0.1 * torch.randn(batch, 1, generator=gen)
        return torch.nn.functional.mse_loss(model(torch.cat([x, extra], 1)), y)

    beta2 = 0.999 if variant == SPIKE else 0.95
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, beta2))
    return Setup(model, opt, loss, steps=700)


def _unfreeze(seed: int, variant: str, lr: float = 3e-2, at: int = 400) -> Setup:
    model, loss = teacher_loss(seed, full_batch=False)
    body = [*model[0].parameters(), *model[2].parameters()]
    for p in body:
        p.requires_grad_(False)  # no gradient, so no Adam state until the unfreeze
    opt = torch.optim.Adam([{"params": body}, {"params": model[4].parameters()}], lr=lr)
    ramp = 1 if variant == SPIKE else 50

    def after(t: int) -> None:
        if t + 1 == at:
            for p in body:
                p.requires_grad_(True)
        opt.param_groups[0]["lr"] = lr * min(1.0, max(0.0, (t + 2 - at) / ramp))

    return Setup(model, opt, loss, steps=600, after_step=after)


def _lr_step(seed: int, variant: str, low: float = 3e-4, high: float = 3e-2, at: int = 500) -> Setup:
    model, loss = teacher_loss(seed, full_batch=False)
    opt = torch.optim.Adam(model.parameters(), lr=low, betas=(0.9, 0.999))
    ramp = 1 if variant == SPIKE else 100

    def after(t: int) -> None:
        opt.param_groups[0]["lr"] = low + (high - low) * min(1.0, max(0.0, (t + 2 - at) / ramp))

    return Setup(model, opt, loss, steps=800, after_step=after)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "separable_ce",
            False,
            "minibatch cross-entropy on separable data: the loss goes to ~0, v-hat decays with the gradient "
            "while Adam's step stays ~lr, so the logits keep growing and a batch near the margin throws a "
            "large update (loss up 10-100x); control: label smoothing 0.1 (finite optimum, the gradient "
            "does not vanish)",
            _separable_ce,
        ),
        Family(
            "distribution_shift",
            False,
            "at step 400 four inputs that were zero since the start turn on (std 20, uninformative): their "
            "first-layer weights have v = 0, and at beta2 = 0.999 v-hat needs hundreds of steps to reach "
            "their gradient, so they move at several times lr and the net overshoots; control: beta2 = 0.95",
            _distribution_shift,
        ),
        Family(
            "unfreeze",
            False,
            "the two hidden layers are frozen while the head trains, then unfrozen at step 400: their Adam "
            "state starts empty, and the first steps are sign-sized (m-hat/sqrt(v-hat) = +-1 on every "
            "coordinate) at lr 3e-2, which throws the co-adapted head off; control: the unfrozen layers' "
            "lr ramps up over 50 steps",
            _unfreeze,
        ),
        Family(
            "lr_step",
            False,
            "minibatch regression converged for 500 steps at lr 3e-4 (no weight decay), then lr steps to "
            "3e-2 at once: the minimum found at the small lr is too sharp for a 100x larger step, so the "
            "iterate is thrown out of it before it settles in a flatter one; control: the same increase "
            "ramped over 100 steps",
            _lr_step,
        ),
    )
}
