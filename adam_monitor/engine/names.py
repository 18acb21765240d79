"""Names on the charts: parameter names as the user wrote the module, tag prefixes per optimizer."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["clean_parameter_name", "optimizer_prefixes", "parameter_names", "unwrap_optimizer"]

_WRAPPER_COMPONENTS = ("_orig_mod.", "_forward_module.")  # torch.compile, Lightning Fabric


def clean_parameter_name(name: str) -> str:
    """A parameter name as the user wrote the module: no ``torch.compile`` or Fabric wrapper prefix."""
    for component in _WRAPPER_COMPONENTS:
        name = name.replace(component, "")
    return name


def unwrap_optimizer(optimizer):
    """The optimizer that Fabric's or Lightning's wrapper steps (the one to hook), else ``optimizer``."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


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
    """``id(parameter) -> clean name`` from ``model.named_parameters()`` or a dict."""
    if named_parameters is None:
        return {}
    items = named_parameters.items() if isinstance(named_parameters, dict) else named_parameters
    return {id(p): clean_parameter_name(n) for n, p in items}


def parameter_names(optimizer: torch.optim.Optimizer, named: dict[int, str]) -> list[str]:
    """One name per parameter of ``optimizer``, in its order; unnamed ones ``group<i>.param<j>``."""
    return [
        named.get(id(p), f"group{gi}.param{pj}")
        for gi, group in enumerate(optimizer.param_groups)
        for pj, p in enumerate(group["params"])
    ]
