"""The statistics row: the sufficient statistics of the four diagnostics, and their pooling.

Every diagnostic is a ratio of sums, so we carry the sums (one row of ``NUM_STATS`` numbers per
tensor) and pool them exactly over tensors, optimizer steps and ranks by adding rows. Definitions
(per coordinate, bias-corrected moments ``v̂_t = v_t / (1 - β2^t)``):

* ``update_rms      = sqrt(Σ u²  / n)``                 u: the direction of the step (over the lr)
* ``staleness       = sqrt(Σ g² / max(v̂_t, ε²) / n)``   v̂_t already holds g_t
* ``gradient_jump   = sqrt(Σ' g² / max(v̂_{t-1}, ε²) / n')`` over the n' coordinates with v_{t-1} > 0
* ``eps_dominance   = #(√v̂ ≤ ε) / n``                  v̂ of the denominator (the running max under amsgrad)
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
    "COUNT",
    "reconstruction_tolerance",
    "pool",
    "diagnostics_from_statistics",
]

#: Columns of a statistics row.
STAT_FIELDS = ("update_sq", "staleness_sq", "jump_sq", "jump_count", "eps_count", "count")
NUM_STATS = len(STAT_FIELDS)
UPDATE_SQ, STALENESS_SQ, JUMP_SQ, JUMP_COUNT, EPS_COUNT, COUNT = range(NUM_STATS)

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


def diagnostics_from_statistics(row: Tensor) -> Tensor:
    """The four diagnostics (``DIAGNOSTICS`` order) from pooled rows ``(..., NUM_STATS)``.

    ``gradient_jump`` is NaN where no coordinate had a previous second moment (the first step).
    Works on any device and never syncs with the host.
    """
    count = row[..., COUNT]
    jump_count = row[..., JUMP_COUNT]
    nan = torch.full_like(count, math.nan)
    safe = torch.where(count > 0, count, 1.0)
    safe_jump = torch.where(jump_count > 0, jump_count, 1.0)
    return torch.stack(
        [
            torch.where(count > 0, (row[..., UPDATE_SQ] / safe).sqrt(), nan),
            torch.where(count > 0, (row[..., STALENESS_SQ] / safe).sqrt(), nan),
            torch.where(jump_count > 0, (row[..., JUMP_SQ] / safe_jump).sqrt(), nan),
            torch.where(count > 0, row[..., EPS_COUNT] / safe, nan),
        ],
        dim=-1,
    )
