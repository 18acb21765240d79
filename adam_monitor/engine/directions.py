"""Directions of Adam-shaped optimizers whose step is not Adam's ``m̂/(√v̂+ε)``: a registry that
other libraries and users add to with :func:`register_direction`.

An optimizer is Adam-shaped when each param group holds ``betas`` (or ``beta1`` and ``beta2``) and
``eps``, and each parameter's state holds ``exp_avg`` and ``exp_avg_sq``, the moving averages of
the gradient and of its square (``m_t = β1·m_{t-1} + (1-β1)·g_t``, ``v_t = β2·v_{t-1} + (1-β2)·g_t²``),
and a step count (in the state or in its group). Such a state gives the staleness, the gradient
jump and ε-dominance whatever the step did with it; the update RMS needs the direction the step
applied, which is what a registered function returns. The monitor checks both on every step: the
moments against the gradient (from the second step), the direction against the step the optimizer
applied (a sample of coordinates: ``(p_before - p_after)/lr``, decoupled weight decay excluded). A
class that fails either is not monitored, with a warning saying by how much it differs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["Direction", "register_direction", "registered_direction"]

#: ``direction(state, grad, group, step)``: the step the optimizer applied to a parameter over its
#: lr, decoupled weight decay excluded (``p_t = kept(p_{t-1}) - lr·u``), with the shape of
#: ``state["exp_avg"]``. ``state``: the parameter's state after the step; ``grad``: the gradient its
#: moments took in (``p.grad``, negated under ``maximize``); ``group``: its param group; ``step``:
#: the step count after the step (1 at the first).
Direction = Callable[[dict, Tensor, dict, float], Tensor]

#: The classes torch's own rules read (:data:`~adam_monitor.engine.reader.UPDATE_RULES`).
_TORCH_RULES = ("Adam", "AdamW", "NAdam", "RAdam", "SparseAdam")

_REGISTRY: dict[str, Direction] = {}


def _dotted(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_direction(optimizer_class: type | str, direction: Direction) -> None:
    """Read ``optimizer_class`` (and its subclasses) as an Adam-shaped optimizer whose step is
    ``direction`` (see :data:`Direction`).

    ``optimizer_class``: the class, or its dotted name (``"package.module.Class"``, the module that
    defines it), which registers it without importing its library. A later registration of the same
    class replaces the earlier one.

    The registered direction is not taken on trust: from the second step on (the first step of Adam
    and of most of its variants is sign descent, which says nothing), every step is compared with
    it, and a class whose step differs is not monitored (a warning says by how much). Weight decay
    may be decoupled in any of the usual forms (``η·λ``, ``λ``, ``λ·η/η_max``) or absent; moments
    that took in L2 decay are not read through a registered direction.

    >>> def nesterov(state, grad, group, step):  # doctest: +SKIP
    ...     beta1, beta2 = group["betas"]
    ...     m = beta1 * state["exp_avg"] + (1 - beta1) * grad
    ...     v_hat = state["exp_avg_sq"] / (1 - beta2**step)
    ...     return m / (1 - beta1**step) / (v_hat.sqrt() + group["eps"])
    >>> register_direction("mylib.optim.NesterovAdamW", nesterov)  # doctest: +SKIP
    """
    if isinstance(optimizer_class, str):
        key = optimizer_class
        if key.count(".") < 1 or not all(part.isidentifier() for part in key.split(".")):
            raise ValueError(
                f"register_direction: optimizer_class {optimizer_class!r} is not a dotted class name "
                "('package.module.Class', the module that defines the class)"
            )
    elif isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer):
        key = _dotted(optimizer_class)
    else:
        raise TypeError(
            "register_direction: optimizer_class must be a torch.optim.Optimizer subclass or its dotted "
            f"name, got {optimizer_class!r}"
        )
    if any(optimizer_class is getattr(torch.optim, name) for name in _TORCH_RULES):
        raise ValueError(
            f"register_direction: {optimizer_class.__name__} is torch's and read by its own rule; register "
            "the subclass whose step differs"
        )
    if not callable(direction):
        raise TypeError(f"register_direction: direction must be callable (state, grad, group, step), got {direction!r}")
    _REGISTRY[key] = direction


def registered_direction(cls: type) -> Direction | None:
    """The direction registered for ``cls`` itself (not its bases), or ``None``."""
    return _REGISTRY.get(_dotted(cls)) if _REGISTRY else None


def _betas(group: dict) -> tuple[float, float]:
    beta1, beta2 = group["betas"]
    return float(beta1), float(beta2)


def timm_nadamw(state: dict, grad: Tensor, group: dict, step: float) -> Tensor:
    """timm's ``NAdamW``: AdamW with Nesterov momentum, ``(β1·m_t + (1-β1)·g_t)/c1 / (√v̂_t + ε)``
    (its ``caution`` and ``clipping_threshold`` change the step: the check refuses them)."""
    beta1, beta2 = _betas(group)
    m, v = state["exp_avg"], state["exp_avg_sq"]
    nesterov = m.lerp(grad.to(m.dtype), 1 - beta1)
    denom = (v.sqrt() / (1 - beta2**step) ** 0.5).add_(float(group["eps"]))
    return nesterov.div_(denom).div_(1 - beta1**step)


register_direction("timm.optim.nadamw.NAdamW", timm_nadamw)


def heavyball_adamw(state: dict, grad: Tensor, group: dict, step: float) -> Tensor:
    """HeavyBall's ``AdamW``: its moments are kept bias-corrected (m̂_t, v̂_t) and its denominator is
    ``max(√v̂_t, ε)``; ``caution``, MARS, PaLM's β2 and update clipping change the step: the check
    refuses them."""
    return state["exp_avg"] / state["exp_avg_sq"].clamp_min(0).sqrt().clamp_min(float(group["eps"]))


register_direction("heavyball.AdamW", heavyball_adamw)
