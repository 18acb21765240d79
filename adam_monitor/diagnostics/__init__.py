"""The four Adam diagnostics as sufficient statistics: pure tensor math, no optimizer objects.

``rows`` (the statistics row and its pooling), ``reference`` (the readable one-tensor
specification), ``foreach`` (many tensors, batched) and ``compiled`` (one fused read of the state),
the last two tested against the first.
"""

from .foreach import adam_statistics
from .reference import adam_direction, previous_second_moment, tensor_statistics
from .rows import (
    COUNT,
    DIAGNOSTICS,
    EPS_COUNT,
    GRAD_COUNT,
    JUMP_COUNT,
    JUMP_SQ,
    NUM_STATS,
    STALENESS_SQ,
    STAT_FIELDS,
    UPDATE_SQ,
    diagnostics_from_statistics,
    pool,
)

__all__ = [
    "COUNT",
    "DIAGNOSTICS",
    "EPS_COUNT",
    "GRAD_COUNT",
    "JUMP_COUNT",
    "JUMP_SQ",
    "NUM_STATS",
    "STALENESS_SQ",
    "STAT_FIELDS",
    "UPDATE_SQ",
    "adam_direction",
    "adam_statistics",
    "diagnostics_from_statistics",
    "pool",
    "previous_second_moment",
    "tensor_statistics",
]
