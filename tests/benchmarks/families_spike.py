"""Spike families beyond the four the rules were first calibrated on (``families.py``): each a
distinct mechanism, with a matched stable control (one setting changed)."""

from __future__ import annotations

import torch
from families import SPIKE, Family, Setup


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
    )
}
