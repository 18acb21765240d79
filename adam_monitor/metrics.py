"""The four diagnostics as a :class:`torchmetrics.Metric`, for code that already logs Metrics.

Its states are the sufficient statistics of :mod:`adam_monitor.diagnostics.rows`: the pooled
statistics row and, with ``per_parameter=True``, one row per parameter. Every diagnostic is a ratio
of sums, so adding rows pools exactly over steps and parameters, and ``dist_reduce_fx="sum"`` pools
exactly over ranks: :meth:`~AdamDiagnostics.compute` gives the diagnostics of every row fed to
every rank since the last reset, the same numbers the engine logs for the same steps.

Under DDP every replica steps the same optimizer state, so every rank reads the same rows and the
sum over ranks scales each ratio's numerator and denominator alike: the values are those of one
rank. The sum is what counts when ranks feed different rows (each rank's optimizer owning its own
parameters, or rows of its own from :class:`~adam_monitor.engine.reader.StepReader`).

In a LightningModule (``self.log`` takes a Metric that computes one scalar; this one computes a
dict, which ``self.log_dict`` takes once computed)::

    import lightning as L
    import torch
    from lightning.pytorch.demos.boring_classes import BoringModel

    from adam_monitor.metrics import AdamDiagnostics


    class Model(BoringModel):
        def __init__(self):
            super().__init__()
            names = [name for name, _ in self.named_parameters()]
            self.adam = AdamDiagnostics(per_parameter=True, names=names, prefix="adam")

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=0.1)
            self.adam.attach(optimizer)  # every optimizer.step() feeds the metric
            return optimizer

        def on_train_batch_end(self, outputs, batch, batch_idx):
            # Lightning writes on-step values every log_every_n_steps: pool exactly those steps.
            if self.trainer.global_step % self.trainer.log_every_n_steps == 0:
                self.log_dict(self.adam.compute())
                self.adam.reset()


    L.Trainer(max_steps=10, log_every_n_steps=5).fit(Model())

Keys are ``update_rms``, ``staleness``, ``gradient_jump``, ``eps_dominance`` and, per parameter,
``per_parameter/<diagnostic>/<name>``; with ``prefix="adam"`` they are the engine's own tags
(``adam/update_rms``, ``adam_per_parameter/update_rms/<name>``). A diagnostic with nothing to pool
(``gradient_jump`` of a first step, a parameter that did not step) is NaN, where the engine leaves
the tag out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle
from torchmetrics import Metric

from ._faults import warn
from .diagnostics.rows import DIAGNOSTICS, NUM_STATS, STAT_FIELDS, diagnostics_from_statistics, pool
from .engine.metrics import parameter_tag
from .engine.names import unwrap_optimizer
from .engine.reader import StepReader, UnsupportedOptimizer

__all__ = ["AdamDiagnostics"]


def _checked_names(per_parameter: bool, names: Sequence[str] | None) -> list[str]:
    if not per_parameter:
        if names is not None:
            raise ValueError("AdamDiagnostics(names=...) names per-parameter rows: pass per_parameter=True too")
        return []
    if names is None or isinstance(names, str):
        raise ValueError(
            "AdamDiagnostics(per_parameter=True) needs names=[...], one name per parameter in the optimizer's "
            "order (all param groups, in order), e.g. [n for n, _ in model.named_parameters()] for "
            "AdamW(model.parameters())"
        )
    names = list(names)
    wrong = [n for n in names if not isinstance(n, str)]
    if wrong:
        raise TypeError(f"AdamDiagnostics(names=...) must be strings, got {wrong[0]!r:.60}")
    repeated = sorted(n for n, k in Counter(names).items() if k > 1)
    if repeated:
        raise ValueError(f"AdamDiagnostics(names=...) repeats {repeated[:3]}: their entries would merge under one key")
    return names


class AdamDiagnostics(Metric):
    """Update RMS, staleness, gradient jump and ε-dominance pooled over the rows fed since the last reset.

    Args:
        per_parameter: also keep one statistics row per parameter, and compute each one's diagnostics.
        names: with ``per_parameter``, the parameters' names in the order of the rows (for
            :meth:`attach`, the optimizer's order: all param groups, in order).
        prefix: a tag prefix for the keys of :meth:`compute` (``"adam"`` gives the engine's tags).
        kwargs: :class:`torchmetrics.Metric`'s own (``sync_on_compute``, ``process_group``, ...).
    """

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    def __init__(
        self, per_parameter: bool = False, names: Sequence[str] | None = None, *, prefix: str = "", **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.names = _checked_names(per_parameter, names)
        self.per_parameter = per_parameter
        self.prefix = prefix
        self.add_state("statistics", torch.zeros(NUM_STATS, dtype=torch.float64), dist_reduce_fx="sum")
        if per_parameter:
            rows = torch.zeros(len(self.names), NUM_STATS, dtype=torch.float64)
            self.add_state("parameter_statistics", rows, dist_reduce_fx="sum")

    def _expected_shape(self) -> str:
        return f"(..., {len(self.names)}, {NUM_STATS})" if self.per_parameter else f"(..., {NUM_STATS})"

    def update(self, rows: Tensor) -> None:
        """Add statistics rows ``(..., NUM_STATS)`` (``(..., len(names), NUM_STATS)`` per parameter),
        e.g. the rows of ``StepReader(optimizer).read()``. Rows on another device than the metric's
        states are copied to it (a host sync per call from a GPU to a CPU metric)."""
        if not isinstance(rows, Tensor):
            raise TypeError(
                f"AdamDiagnostics.update(rows) takes a tensor of statistics rows {self._expected_shape()}, got "
                f"{type(rows).__name__} (StepReader.read() returns (rows, step), or None for a skipped step)"
            )
        shape = tuple(rows.shape)
        fits = len(shape) >= 1 and shape[-1] == NUM_STATS
        if self.per_parameter:
            fits = fits and len(shape) >= 2 and shape[-2] == len(self.names)
        if not fits:
            raise ValueError(
                f"AdamDiagnostics.update: expected statistics rows of shape {self._expected_shape()} "
                f"(columns {', '.join(STAT_FIELDS)}), got {shape}"
            )
        rows = rows.detach().to(self.statistics)
        self.statistics += pool(rows)
        if self.per_parameter:
            self.parameter_statistics += rows.reshape(-1, len(self.names), NUM_STATS).sum(0)

    def _keys(self) -> tuple[list[str], list[str]]:
        """The pooled keys and the per-parameter keys (row-major over names × diagnostics)."""
        if self.prefix:
            pooled = [f"{self.prefix}/{d}" for d in DIAGNOSTICS]
            per_parameter = [parameter_tag(self.prefix, d, n) for n in self.names for d in DIAGNOSTICS]
        else:
            pooled = list(DIAGNOSTICS)
            per_parameter = [f"per_parameter/{d}/{n}" for n in self.names for d in DIAGNOSTICS]
        return pooled, per_parameter

    def compute(self) -> dict[str, Tensor]:
        """``{key: 0-dim float64 tensor}``: the pooled diagnostics, then each parameter's (see the module doc)."""
        pooled_keys, parameter_keys = self._keys()
        values = dict(zip(pooled_keys, diagnostics_from_statistics(self.statistics).unbind()))
        if self.per_parameter:
            per_parameter = diagnostics_from_statistics(self.parameter_statistics)
            values.update(zip(parameter_keys, per_parameter.reshape(-1).unbind()))
        return values

    def attach(self, optimizer: torch.optim.Optimizer) -> _Attachment:
        """Feed this metric the rows of every step of ``optimizer`` (a step post-hook); returns the
        hook's handle (``handle.remove()`` stops it).

        ``optimizer`` is a torch Adam/AdamW or an :mod:`adam_monitor.optim` optimizer (a Lightning or
        Fabric wrapper of one is unwrapped). A step that a GradScaler skips feeds nothing.
        """
        inner = unwrap_optimizer(optimizer)
        if not isinstance(inner, torch.optim.Optimizer):
            raise TypeError(
                f"AdamDiagnostics.attach(optimizer) takes a torch optimizer, got {type(optimizer).__name__}"
            )
        try:
            reader = StepReader(inner)
        except UnsupportedOptimizer as err:
            raise TypeError(f"AdamDiagnostics.attach: cannot read {type(inner).__name__}: {err}") from None
        if self.per_parameter and len(reader.params) != len(self.names):
            raise ValueError(
                f"AdamDiagnostics.attach: the optimizer has {len(reader.params)} parameters, this metric was "
                f"given {len(self.names)} names; pass one name per parameter, in the optimizer's order"
            )

        def on_step(*_) -> None:
            try:
                read = reader.read(after_step=True)  # one call per step(), right after it
            except UnsupportedOptimizer as err:  # found stepping (state not Adam's, update not Adam's)
                attachment.remove()
                warn(
                    f"AdamDiagnostics stopped reading {type(inner).__name__}: {err}. Training goes on; "
                    "nothing more is fed to the metric."
                )
                return
            if read is not None and not reader.unverified:  # an update not yet verified Adam's feeds nothing
                self.update(read[0])

        attachment = _Attachment(inner.register_step_post_hook(on_step), reader)
        return attachment


class _Attachment:
    """What :meth:`AdamDiagnostics.attach` returns: ``remove()`` takes the hook off and releases the
    reader (an :mod:`adam_monitor.optim` optimizer stops recording once no reader is left)."""

    def __init__(self, hook: RemovableHandle, reader: StepReader):
        self._hook, self._reader = hook, reader

    def remove(self) -> None:
        self._hook.remove()
        self._reader.release()
