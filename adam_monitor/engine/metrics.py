"""A log point's values: the pooled and per-parameter diagnostics of the steps since the last one,
under their TensorBoard tags (DESIGN's tag contract), in one host transfer."""

from __future__ import annotations

import heapq
from functools import lru_cache

import torch
from torch import Tensor

from ..diagnostics.rows import DIAGNOSTICS, diagnostics_from_statistics

__all__ = ["WORST_NAMED", "log_point", "parameter_tag"]

#: Tensors named per diagnostic in the "worst tensors" text at each log point.
WORST_NAMED = 5


def parameter_tag(prefix: str, diagnostic: str, name: str) -> str:
    """The tag of one tensor's diagnostic: ``adam_per_parameter/<diagnostic>/<name>`` for the
    prefix ``adam``, ``adam_per_parameter/<Class>/<diagnostic>/<name>`` for ``adam/<Class>``.

    Not ``adam/<diagnostic>/<name>``: the pooled tag ``adam/<diagnostic>`` would be a folder of
    it, which a store with one file per metric (MLflow's file store) cannot hold beside the
    pooled metric's file. And not under ``adam/`` at all: TensorBoard groups its cards by the
    tag's first component, and the few pooled charts would sit among hundreds of tensors' ones.
    """
    root, _, rest = prefix.partition("/")
    return "/".join(part for part in (f"{root}_per_parameter", rest, diagnostic, name) if part)


@lru_cache(maxsize=32)
def _parameter_tags(prefix: str, names: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    """Every tensor's tag per diagnostic, built once per optimizer (a log point writes them all)."""
    return tuple(tuple(parameter_tag(prefix, d, name) for d in DIAGNOSTICS) for name in names)


def log_point(
    prefix: str,
    sums: Tensor,
    names: list[str],
    *,
    skipped: int,
    alert_count: int,
    per_parameter: bool,
    sharpness: float | None = None,
) -> tuple[dict[str, float], dict[str, list[tuple[float, str]]]]:
    """``({tag: value}, worst tensors per diagnostic)`` from the summed rows ``(len(names), NUM_STATS)``
    and the newest preconditioned sharpness estimate (over the edge), if any.

    A diagnostic that is NaN (a tensor that did not step since the last log point, a jump at the
    first step) is left out rather than written as NaN.
    """
    pooled = diagnostics_from_statistics(sums.sum(0))
    per_param = diagnostics_from_statistics(sums)
    packed = torch.cat([pooled, per_param.reshape(-1)]) if per_parameter else pooled
    values = packed.tolist()  # the one host transfer of this log point
    width = len(DIAGNOSTICS)
    metrics = {f"{prefix}/{d}": v for d, v in zip(DIAGNOSTICS, values[:width]) if v == v}
    metrics[f"{prefix}/skipped_steps"] = float(skipped)
    if sharpness is not None:
        metrics[f"{prefix}/preconditioned_sharpness"] = sharpness
    metrics["adam/alerts"] = float(alert_count)
    if not per_parameter:
        return metrics, {}
    ranked: dict[str, list[tuple[float, str]]] = {d: [] for d in DIAGNOSTICS}
    lists = [ranked[d] for d in DIAGNOSTICS]
    for i, (name, tags) in enumerate(zip(names, _parameter_tags(prefix, tuple(names)))):
        for v, tag, found in zip(values[width * (i + 1) : width * (i + 2)], tags, lists):
            if v == v:
                metrics[tag] = v
                found.append((v, name))
    # With hundreds of tensors no chart shows them all: the worst one is a scalar of its own and
    # the top few are named in a text summary.
    worst = {d: heapq.nlargest(WORST_NAMED, r) for d, r in ranked.items() if r}
    for d, top in worst.items():
        metrics[f"{prefix}/worst/{d}"] = top[0][0]
    return metrics, worst
