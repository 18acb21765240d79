"""Names on the charts: parameter names as the user wrote the module, tag prefixes per optimizer."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = [
    "clean_parameter_name",
    "names_by_id",
    "optimizer_prefixes",
    "parameter_names",
    "unnamed_parameters",
    "unwrap_optimizer",
]

_WRAPPER_COMPONENTS = ("_orig_mod.", "_forward_module.")  # torch.compile, Lightning Fabric


def clean_parameter_name(name: str) -> str:
    """A parameter name as the user wrote the module: no ``torch.compile`` or Fabric wrapper prefix."""
    for component in _WRAPPER_COMPONENTS:
        name = name.replace(component, "")
    return name


#: Optimizers that only pass ``step`` on to the one they wrap (accelerate's, which the Hugging
#: Face Trainer steps): the wrapped one is hooked.
PASS_THROUGH_OPTIMIZERS = ("AcceleratedOptimizer",)


def unwrap_optimizer(optimizer):
    """The optimizer that Fabric's, Lightning's or accelerate's wrapper steps (the one to hook),
    else ``optimizer``. Another torch optimizer holding one (Lookahead, a masking or schedule-free
    wrapper) changes the parameters after the inner step: it is read as itself."""
    inner = getattr(optimizer, "optimizer", None)
    if not isinstance(inner, torch.optim.Optimizer):
        return optimizer
    if isinstance(optimizer, torch.optim.Optimizer) and type(optimizer).__name__ not in PASS_THROUGH_OPTIMIZERS:
        return optimizer
    return inner


def optimizer_prefixes(optimizers: Sequence[torch.optim.Optimizer], root: str = "adam") -> list[str]:
    """Tag prefixes: ``adam`` for a single optimizer, else ``adam/<Class>[-i]`` (LearningRateMonitor's rule)."""
    if len(optimizers) == 1:
        return [root]
    seen: Counter[str] = Counter()
    prefixes = []
    for opt in optimizers:
        cls = type(opt).__name__
        seen[cls] += 1
        prefixes.append(f"{root}/{cls}" + (f"-{seen[cls] - 1}" if seen[cls] > 1 else ""))
    return prefixes


def names_by_id(named_parameters: Iterable[tuple[str, Tensor]] | dict[str, Tensor] | None) -> dict[int, str]:
    """``id(parameter) -> clean name`` from ``model.named_parameters()`` or a dict.

    Raises ``ValueError`` when one name is given to different tensors (their tags would merge) and
    ``TypeError`` for anything that is not ``(name, tensor)`` pairs.
    """
    if named_parameters is None:
        return {}
    items = named_parameters.items() if isinstance(named_parameters, dict) else named_parameters
    named: dict[int, str] = {}
    owner: dict[str, int] = {}
    try:
        pairs = list(items)
    except TypeError:
        raise TypeError(
            f"named_parameters must be model.named_parameters() or a dict of name -> tensor, got "
            f"{type(named_parameters).__name__}"
        ) from None
    for pair in pairs:
        if not (
            isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str) and isinstance(pair[1], Tensor)
        ):
            raise TypeError(
                f"named_parameters must yield (name, tensor) pairs like model.named_parameters(), got {pair!r:.80}"
            )
        name, p = clean_parameter_name(pair[0]), pair[1]
        if owner.setdefault(name, id(p)) != id(p):
            raise ValueError(
                f"named_parameters names two different tensors {name!r}: their charts and alerts would merge "
                "under one tag. Give every tensor its own name (e.g. prefix the names of each model)."
            )
        named[id(p)] = name
    return named


def unnamed_parameters(optimizer: torch.optim.Optimizer, named: dict[int, str]) -> list[str]:
    """The ``group<i>.param<j>`` (and shape) of each parameter of ``optimizer`` that ``named`` misses."""
    return [
        f"group{gi}.param{pj} {tuple(p.shape)}"
        for gi, group in enumerate(optimizer.param_groups)
        for pj, p in enumerate(group["params"])
        if id(p) not in named
    ]


def parameter_names(optimizer: torch.optim.Optimizer, named: dict[int, str]) -> list[str]:
    """One name per parameter of ``optimizer``, in its order; unnamed ones ``group<i>.param<j>``."""
    return [
        named.get(id(p), f"group{gi}.param{pj}")
        for gi, group in enumerate(optimizer.param_groups)
        for pj, p in enumerate(group["params"])
    ]
