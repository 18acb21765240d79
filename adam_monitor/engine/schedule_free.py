"""Schedule-free AdamW (the ``schedulefree`` package) read as the Adam step it takes.

Its base sequence z takes Adam's step without momentum, ``z_t = z_{t−1} − γ_t·(u_t + λ·y_{t−1})``,
with ``u_t = g_t/(√v̂_t + ε)``, v Adam's second moment, γ_t the lr after the optimizer's own warmup
(its group's ``scheduled_lr``) and y the point the gradient was taken at; β1 only places y between z
and the average x, which is what ``p`` holds (y in training mode for ``AdamWScheduleFree``, x for the
closure form). So its diagnostics are Adam's with β1 = 0 at the lr γ_t, and its direction is u_t.

The step overwrites ``p.grad`` with ``G = u_t + λ·y_{t−1}``; the gradient is rebuilt from it after the
step: ``g_t = (G − λ·y_{t−1})·(√v̂_t + ε)``, with y_{t−1} solved from p, z and G after the step. The
library is never imported: its classes are known by their dotted names.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..diagnostics.compiled import fast_adam_statistics
from ..diagnostics.rows import NUM_STATS

__all__ = ["CLASSES", "betas", "direction", "form", "is_schedule_free", "lr", "statistics"]

#: The classes read, with the point ``p`` holds between their steps.
CLASSES = {
    "schedulefree.adamw_schedulefree.AdamWScheduleFree": "y",
    "schedulefree.adamw_schedulefree_closure.AdamWScheduleFreeClosure": "x",
}

#: Coordinates rebuilt together: the temporaries of a read stay a few times this size whatever the model.
CHUNK_NUMEL = 1 << 20


def _dotted(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def form(optimizer: torch.optim.Optimizer) -> tuple[str, type] | None:
    """``(the point p holds, the class read)`` of the nearest read class ``optimizer`` is, else ``None``."""
    for base in type(optimizer).__mro__:
        holds = CLASSES.get(_dotted(base))
        if holds is not None:
            return holds, base
    return None


def is_schedule_free(group: dict) -> bool:
    """Whether a param group is one of the ``schedulefree`` package's (its step count ``k``, its
    running weight sum)."""
    return "k" in group and "weight_sum" in group


def betas(group: dict) -> tuple[float, float]:
    """The betas of the Adam step z takes: no momentum, the group's β2."""
    return 0.0, float(group["betas"][1])


def lr(group: dict) -> float:
    """The lr the last step moved z by (the group's lr after the optimizer's warmup)."""
    return float(group["scheduled_lr"])


def _terms(group: dict) -> dict:
    """The scalars of the step just taken, as the optimizer computed them (Python floats)."""
    beta1, beta2 = (float(b) for b in group["betas"])
    t = group["k"]  # after the step: the count including it
    gamma = float(group["scheduled_lr"])
    weight = (t ** group["r"]) * (group["lr_max"] ** group["weight_lr_power"])
    c = weight / group["weight_sum"] if group["weight_sum"] else 0.0
    return dict(
        beta1=beta1,
        beta2=beta2,
        step=t,
        eps=float(group["eps"]),
        decay=float(group["weight_decay"]),
        gamma=gamma,
        c=c,
    )


def _previous_y(p: Tensor, z: Tensor, G: Tensor, k: dict, holds: str) -> Tensor:
    """y_{t−1}, where the gradient was taken, from ``p``, ``z`` and ``G`` after the step."""
    z_prev = z + k["gamma"] * G
    c = k["c"]
    if c == 1.0:  # every earlier step had lr 0: z, x and y were one point
        return z_prev
    if holds == "y":  # y_t = (1−c)·y_{t−1} + c·z_{t−1} + γ(β1(1−c) − 1)·G
        a = k["gamma"] * (k["beta1"] * (1 - c) - 1)
        return (p - c * z_prev - a * G) / (1 - c)
    # x_t = (1−c)·x_{t−1} + c·z_t, and y_{t−1} = β1·x_{t−1} + (1−β1)·z_{t−1}
    x_prev = (p - c * z) / (1 - c)
    return k["beta1"] * x_prev + (1 - k["beta1"]) * z_prev


def _direction(p: Tensor, z: Tensor, G: Tensor, k: dict, holds: str) -> Tensor:
    """u_t = G − λ·y_{t−1} (G itself without decay). Where the gradient was 0, G is λ·y_{t−1} and
    the rebuilt difference is rounding: it is set to 0, so that coordinate counts as one without
    a gradient, as it was."""
    if not k["decay"]:
        return G
    decayed = k["decay"] * _previous_y(p, z, G, k, holds)
    u = G - decayed
    rounding = 8 * torch.finfo(u.dtype).eps * decayed.abs()
    return u.masked_fill_(u.abs() <= rounding, 0.0)


def _working(t: Tensor) -> Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def direction(p: Tensor, state: dict, group: dict, holds: str) -> Tensor:
    """The direction of ``p``'s last step, u_t, from ``p.grad`` as the step left it."""
    k = _terms(group)
    return _direction(_working(p.detach()), _working(state["z"]), _working(p.grad), k, holds)


def _gradient(u: Tensor, v: Tensor, k: dict) -> Tensor:
    return u * (v / (1 - k["beta2"] ** k["step"])).sqrt_().add_(k["eps"])


def statistics(params: list[Tensor], states: list[dict], group: dict, holds: str, view) -> Tensor:
    """Rows ``(len(params), NUM_STATS)`` of one param group's step: Adam's statistics with β1 = 0
    on the rebuilt gradients, in chunks of at most ``CHUNK_NUMEL`` coordinates (rows are sums, so a
    tensor's pieces add up to its row). ``view``: the reader's view of a tensor (a shard's real view)."""
    k = _terms(group)
    device = view(params[0]).device
    rows = torch.zeros(len(params), NUM_STATS, dtype=torch.float64, device=device)
    owners, grads, sqs, size = [], [], [], 0

    def flush():
        nonlocal owners, grads, sqs, size
        if owners:
            part = fast_adam_statistics(
                grads, grads, sqs, beta1=0.0, beta2=k["beta2"], eps=k["eps"], step=int(k["step"])
            )
            rows.index_add_(0, torch.tensor(owners, device=device), part.to(device))
        owners, grads, sqs, size = [], [], [], 0

    for i, (p, state) in enumerate(zip(params, states)):
        flat = [view(t).reshape(-1) for t in (p.detach(), state["z"], p.grad, state["exp_avg_sq"])]
        for start in range(0, flat[0].numel(), CHUNK_NUMEL):
            y, z, G, v = (_working(t[start : start + CHUNK_NUMEL]) for t in flat)
            u = _direction(y, z, G, k, holds)
            owners.append(i)
            grads.append(_gradient(u, v, k).to(v.dtype))
            sqs.append(v)
            size += v.numel()
            if size >= CHUNK_NUMEL:
                flush()
    flush()
    return rows
