"""The scenario families of the forecast benchmark (``spike_scenarios.py``): each a way to build one
training run, for a seed and a variant.

A *spike family* has two variants, ``"spike"`` (a run whose loss spikes, by one named mechanism) and
``"control"`` (the matched run that does not: one setting changed); a *healthy family* has one,
``"healthy"`` (a run as users train, that must raise no alert). A family only builds runs: the
harness trains them, records them and scores the alerts; nothing here knows the rules or their
thresholds. Every family is checked to spike (and its control not to) on the loss alone, before any
alert is looked at.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

SPIKE, CONTROL, HEALTHY = "spike", "control", "healthy"


@dataclass
class Setup:
    """One run, ready to train: the harness calls, for t = 1 … steps,
    ``loss = loss(t)``; ``(loss * weight(t)).backward()``; clip to ``clip``; ``optimizer.step()``;
    ``after_step(t)``; ``optimizer.zero_grad()``."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[int], torch.Tensor]  # the reported (unweighted) loss of step t, graph attached
    steps: int
    weight: Callable[[int], float] | None = None  # the factor on the loss that is backpropagated
    clip: float = 0.0  # gradient-norm clipping before the step (0: none)
    after_step: Callable[[int], None] | None = None  # schedules: lr, betas (scheduler.step())


@dataclass(frozen=True)
class Family:
    name: str
    healthy: bool  # True: variant "healthy" only; False: "spike" and "control"
    mechanism: str  # one line: why it spikes (or why it is healthy), and what the control changes
    build: Callable[[int, str], Setup]  # (seed, variant) -> Setup

    @property
    def variants(self) -> tuple[str, ...]:
        return (HEALTHY,) if self.healthy else (SPIKE, CONTROL)


# ------------------------------------------------------------------------------------------------
# models and data


def mlp(d: int, h: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(d, h), torch.nn.Tanh(), torch.nn.Linear(h, h), torch.nn.Tanh(), torch.nn.Linear(h, 1)
    )


def teacher_loss(seed: int, full_batch: bool, d: int = 16, h: int = 64):
    """(student MLP, loss(t)) on a teacher MLP's outputs (noise 0.1; ``full_batch``: 256 fixed
    points, no noise)."""
    torch.manual_seed(seed)
    teacher, model = mlp(d, h), mlp(d, h)
    teacher.requires_grad_(False)
    fixed_x = torch.randn(256, d)
    fixed_y = teacher(fixed_x)

    def loss(t: int) -> torch.Tensor:
        if full_batch:
            x, y = fixed_x, fixed_y
        else:
            x = torch.randn(256, d)
            y = teacher(x) + 0.1 * torch.randn(256, 1)
        return torch.nn.functional.mse_loss(model(x), y)

    return model, loss


class Block(torch.nn.Module):
    """A transformer block without normalization layers: x + attn(x), then x + mlp(x)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.proj = torch.nn.Linear(d, d)
        self.fc1, self.fc2 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class TinyGPT(torch.nn.Module):
    def __init__(self, vocab: int, ctx: int, d: int, heads: int, layers: int):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Embedding(ctx, d)
        self.blocks = torch.nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.head = torch.nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.tok(idx) + self.pos(torch.arange(idx.shape[1]))))


def reverse_loss(seed: int, steps: int, vocab=32, n=15, d=32, heads=2, layers=2, batch=16, noise=0.05):
    """(TinyGPT, loss(t)): next-token cross-entropy on ``a_1 … a_n SEP a_n … a_1`` (n = 15 random
    tokens of 31, then their reverse; only the reversed half is scored), each target replaced by a
    random token with probability ``noise``: the loss floor is ~0.36 nats, so the gradient never
    vanishes and a 3x spike means the learned attention pattern broke. Fresh sequences each step."""
    torch.manual_seed(seed)
    model = TinyGPT(vocab, 2 * n + 1, d, heads, layers)
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(vocab - 1, (steps * batch, n), generator=gen)
    seq = torch.cat([a, torch.full((steps * batch, 1), vocab - 1), a.flip(1)], 1)
    x, y = seq[:, :-1], seq[:, 1:].clone()
    flip = torch.rand(y.shape, generator=gen) < noise
    y = torch.where(flip, torch.randint(vocab - 1, y.shape, generator=gen), y)
    y[:, :n] = -100  # the random half is not predictable

    def loss(t: int) -> torch.Tensor:
        rows = slice((t - 1) * batch, t * batch)
        logits = model(x[rows]).reshape(-1, vocab)
        return torch.nn.functional.cross_entropy(logits, y[rows].reshape(-1), ignore_index=-100)

    return model, loss


def linear_warmup(optimizer: torch.optim.Optimizer, peak: float, steps: int) -> Callable[[int], None]:
    """An ``after_step`` that sets lr for step t + 1 to peak·min(1, (t+1)/steps)."""
    for g in optimizer.param_groups:
        g["lr"] = peak / steps

    def after(t: int) -> None:
        for g in optimizer.param_groups:
            g["lr"] = peak * min(1.0, (t + 1) / steps)

    return after


# ------------------------------------------------------------------------------------------------
# the families the rules were first calibrated on (CALIBRATION.md)


def _decline(t: int, floor: float) -> float:
    """1 up to step 200, then a geometric decline to ``floor`` over 200 steps."""
    return floor ** min(1.0, max(0.0, (t - 200) / 200))


def _stale_v(seed: int, variant: str) -> Setup:
    model, loss = teacher_loss(seed, full_batch=False)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2, betas=(0.9, 0.995))
    weight = (lambda t: _decline(t, 1e-4) if t <= 800 else 1.0) if variant == SPIKE else None
    return Setup(model, opt, loss, steps=900, weight=weight)


def _high_lr(seed: int, variant: str) -> Setup:
    steps = 500
    model, loss = reverse_loss(seed, steps)
    peak = 3e-2 if variant == SPIKE else 1e-2
    opt = torch.optim.Adam(model.parameters(), lr=peak, betas=(0.9, 0.999))
    return Setup(model, opt, loss, steps=steps, clip=20.0, after_step=linear_warmup(opt, peak, 100))


def _beta_coupling(seed: int, variant: str) -> Setup:
    model, loss = teacher_loss(seed, full_batch=False)
    betas = (0.95, 0.8) if variant == SPIKE else (0.9, 0.95)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=betas)
    return Setup(model, opt, loss, steps=400, weight=lambda t: 1.0 if t <= 200 else 1e-3)


def _tiny_eps(seed: int, variant: str) -> Setup:
    model, loss = teacher_loss(seed, full_batch=True)
    eps = 1e-12 if variant == SPIKE else 1e-3
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=eps)
    return Setup(model, opt, loss, steps=700)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "stale_v",
            False,
            "loss weight declines to 1e-4 over steps 200-400 and returns to 1 at step 800 (beta2 = 0.995: "
            "v-hat lags and the gradient outruns it); control: weight held at 1",
            _stale_v,
        ),
        Family(
            "high_lr",
            False,
            "normalization-free 2-layer transformer on sequence reversal at peak lr 3e-2 after a 100-step "
            "warmup: gradient bursts of the first layers after the task is learned; control: lr 1e-2",
            _high_lr,
        ),
        Family(
            "beta_coupling",
            False,
            "betas (0.95, 0.8) have beta1^2 > beta2: after the loss weight drops to 1e-3 the update grows "
            "by beta1/sqrt(beta2) per step; control: betas (0.9, 0.95)",
            _beta_coupling,
        ),
        Family(
            "tiny_eps",
            False,
            "full batch, eps = 1e-12: converged, sqrt(v-hat) decays and the preconditioned sharpness "
            "crosses (2+2 beta1)/(1-beta1) (adaptive edge of stability); control: eps = 1e-3",
            _tiny_eps,
        ),
    )
}
