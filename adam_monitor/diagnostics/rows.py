"""The statistics row: the sufficient statistics of the four diagnostics, and their pooling.

Every diagnostic is a ratio of sums, so we carry the sums (one row of ``NUM_STATS`` numbers per
tensor) and pool them exactly over tensors, optimizer steps and ranks by adding rows. Definitions
(per coordinate, bias-corrected moments ``v̂_t = v_t / (1 - β2^t)``):

* ``update_rms      = sqrt(Σ u²  / n)``                 u: the direction of the step (over the lr)
* ``staleness       = sqrt(Σ g² / max(v̂_t, ε²) / n)``   v̂_t already holds g_t
* ``gradient_jump   = sqrt(Σ' g² / max(v̂_{t-1}, ε²) / n')`` over the n' coordinates with v_{t-1} > 0
* ``eps_dominance   = #(√v̂ ≤ ε and g ≠ 0) / #(g ≠ 0)``  v̂ of the denominator (the running max under amsgrad)

``eps_dominance`` counts only the coordinates that got a gradient this step: one with g = 0 exactly
(an embedding row of a token absent from the batch, a masked or frozen slice) carries no signal,
and its v̂ decays until it counts as ε-dominated whatever ε is. Both counts pool by addition.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "STAT_FIELDS",
    "NUM_STATS",
    "DIAGNOSTICS",
    "UPDATE_SQ",
    "STALENESS_SQ",
    "JUMP_SQ",
    "JUMP_COUNT",
    "EPS_COUNT",
    "GRAD_COUNT",
    "COUNT",
    "reconstruction_tolerance",
    "pool",
    "rows_with_grad_count",
    "diagnostics_from_statistics",
]

#: Columns of a statistics row.
STAT_FIELDS = ("update_sq", "staleness_sq", "jump_sq", "jump_count", "eps_count", "grad_count", "count")
NUM_STATS = len(STAT_FIELDS)
UPDATE_SQ, STALENESS_SQ, JUMP_SQ, JUMP_COUNT, EPS_COUNT, GRAD_COUNT, COUNT = range(NUM_STATS)

#: Diagnostic names, in the order ``diagnostics_from_statistics`` returns them.
DIAGNOSTICS = ("update_rms", "staleness", "gradient_jump", "eps_dominance")


def reconstruction_tolerance(dtype: torch.dtype) -> float:
    # v_{t-1} rebuilt as (v_t - (1-β2)·g²)/β2 carries a rounding error of a few ulp of v_t; a
    # remainder below this fraction of v_t is indistinguishable from an exact zero (a coordinate
    # that had never seen a gradient), which must count as "no previous second moment", not as an
    # astronomically small one.
    return 16 * torch.finfo(dtype).eps


def pool(rows: Tensor) -> Tensor:
    """Pool statistics rows exactly (sum over all leading dimensions)."""
    return rows.reshape(-1, NUM_STATS).sum(0)


def rows_with_grad_count(rows: Tensor) -> Tensor:
    """Rows ``(..., NUM_STATS)`` from rows saved before ``grad_count`` existed (one column fewer).

    Those rows counted ε-dominance over every coordinate, so every coordinate stands as one that
    got a gradient: the diagnostics they give stay what they were. Rows of ``NUM_STATS`` columns
    come back as they are.
    """
    if rows.shape[-1] != NUM_STATS - 1:
        return rows
    return torch.cat([rows[..., :GRAD_COUNT], rows[..., COUNT - 1 :], rows[..., GRAD_COUNT:]], dim=-1)


def diagnostics_from_statistics(row: Tensor) -> Tensor:
    """The four diagnostics (``DIAGNOSTICS`` order) from pooled rows ``(..., NUM_STATS)``.

    ``gradient_jump`` is NaN where no coordinate had a previous second moment (the first step),
    ``eps_dominance`` where no coordinate got a gradient (a fraction of nothing: not 0, which
    would claim that ε sets no step). Works on any device and never syncs with the host.
    """
    count = row[..., COUNT]
    jump_count = row[..., JUMP_COUNT]
    grad_count = row[..., GRAD_COUNT]
    nan = torch.full_like(count, math.nan)
    safe = torch.where(count > 0, count, 1.0)
    safe_jump = torch.where(jump_count > 0, jump_count, 1.0)
    safe_grad = torch.where(grad_count > 0, grad_count, 1.0)
    return torch.stack(
        [
            torch.where(count > 0, (row[..., UPDATE_SQ] / safe).sqrt(), nan),
            torch.where(count > 0, (row[..., STALENESS_SQ] / safe).sqrt(), nan),
            torch.where(jump_count > 0, (row[..., JUMP_SQ] / safe_jump).sqrt(), nan),
            torch.where(grad_count > 0, row[..., EPS_COUNT] / safe_grad, nan),
        ],
        dim=-1,
    )
