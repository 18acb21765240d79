"""When the preconditioned sharpness is estimated, and its value at a log point.

The estimate (``diagnostics.sharpness``) needs the curvature sums of two consecutive steps: one
pass over the gradient and the moments each, as costly as the statistics themselves. So it is
taken on two consecutive steps out of every ``every``, the second a multiple of ``every``: the
step a log point falls on when it writes every ``every`` steps. A log point writes the newest
estimate taken since the previous one.
"""

from __future__ import annotations

import math

from torch import Tensor

from ..diagnostics.sharpness import edge_of_stability, preconditioned_sharpness
from .reader import betas_of, curvature

__all__ = ["SharpnessSampler"]


class SharpnessSampler:
    """η·λ(P⁻¹H) along the update over Adam's edge (2+2β1)/(1−β1) of one optimizer, sampled."""

    def __init__(self, every: int | None):
        self.every = every
        self._previous: tuple[int, Tensor, float] | None = None  # (step, curvature sums, lr)
        self._estimate: Tensor | None = None  # the newest, not yet written

    def due(self, step: int) -> bool:
        every = self.every
        return every is not None and (every <= 2 or step % every in (0, every - 1))

    def observe(self, reader, step: int) -> None:
        """After ``reader`` read ``step``: take the curvature sums if due, and the estimate when
        the step before was taken too. Nothing for optimizers whose direction is not Adam's."""
        if not self.due(step):
            return
        sums = curvature(reader)
        if sums is None:
            self._previous = None
            return
        group = reader.optimizer.param_groups[0]
        lr = float(group["lr"])
        previous, self._previous = self._previous, (step, sums, lr)
        if previous is None or previous[0] != step - 1 or previous[2] <= 0:
            return
        beta1 = betas_of(group)[0]
        if not 0 < beta1 < 1:  # no momentum to rebuild u_{t-1} from, or none that decays
            return
        self._estimate = preconditioned_sharpness(previous[1], sums, lr / previous[2]) / edge_of_stability(beta1)

    def latest(self) -> float | None:
        """The newest estimate since the last ``clear`` (a host read), or ``None``."""
        if self._estimate is None:
            return None
        value = float(self._estimate)
        return value if math.isfinite(value) else None

    def clear(self) -> None:
        self._estimate = None
