"""The framework-free engine: step hooks, on-device accumulation, sinks.

``Monitor`` hooks ``optimizer.step`` of one or more Adam-family optimizers. Every step's statistics
rows (see :mod:`adam_monitor.diagnostics`) are added to an on-device running sum; at a logged step
the sums become the pooled and per-parameter diagnostics in one host transfer and go to the sinks.
Logged values pool every optimizer step since the previous log exactly (sums of squares over sums
of counts), so no step between two log points is lost from the record.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .diagnostics import DIAGNOSTICS, NUM_STATS, diagnostics_from_statistics
from .state import StepReader, UnsupportedOptimizer

__all__ = ["Monitor", "clean_parameter_name"]

ScalarSink = Callable[[dict[str, float], int], None]


def clean_parameter_name(name: str) -> str:
    """A parameter name as the user wrote the module: no ``torch.compile`` wrapper prefix."""
    return name.replace("_orig_mod.", "")


def _is_rank_zero() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def _warn(message: str) -> None:
    if _is_rank_zero():
        warnings.warn(message, UserWarning, stacklevel=3)


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


@dataclass
class _Tracked:
    """One monitored optimizer: its reader, hook, tag prefix and the sums since the last log."""

    optimizer: torch.optim.Optimizer
    reader: StepReader
    prefix: str
    names: list[str] = field(default_factory=list)
    sums: Tensor | None = None
    pending_steps: int = 0
    step: int = 0
    hook: object | None = None


class Monitor:
    """Adam diagnostics for plain PyTorch loops and Fabric.

    Example::

        monitor = Monitor(optimizer, named_parameters=model.named_parameters(),
                          writer=SummaryWriter("runs/exp"))
        for batch in data:
            loss = model(batch).loss
            loss.backward()
            optimizer.step()          # the monitor's hook reads this step
            optimizer.zero_grad()
        monitor.close()

    Args:
        optimizer: one optimizer or a sequence of them (torch Adam/AdamW or :mod:`adam_monitor.optim`).
            Others get one warning and are not monitored; training is unaffected.
        named_parameters: ``model.named_parameters()`` (or a dict) to name per-parameter tags;
            unnamed parameters are called ``group<i>.param<j>``.
        writer: a TensorBoard ``SummaryWriter``; scalars, the custom-scalars layout and histograms go there.
        log_every_n_steps: write every this many optimizer steps (``None``: only on :meth:`flush`).
        per_parameter: also write one scalar per parameter tensor and diagnostic.
        histograms: also write a histogram of each tensor's update direction at logged steps.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        *,
        named_parameters: Iterable[tuple[str, Tensor]] | dict[str, Tensor] | None = None,
        writer=None,
        log_every_n_steps: int | None = 50,
        per_parameter: bool = True,
        histograms: bool = False,
        scalar_sink: ScalarSink | None = None,
    ):
        optimizers = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else list(optimizer)
        if not optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in optimizers):
            raise TypeError(
                "Monitor(optimizer): expected a torch.optim.Optimizer or a sequence of them, "
                f"got {type(optimizer).__name__}"
            )
        if log_every_n_steps is not None and (not isinstance(log_every_n_steps, int) or log_every_n_steps < 1):
            raise ValueError(f"log_every_n_steps must be a positive int or None, got {log_every_n_steps!r}")
        if named_parameters is None:
            self._named: dict[int, str] = {}
        else:
            items = named_parameters.items() if isinstance(named_parameters, dict) else named_parameters
            self._named = {id(p): clean_parameter_name(n) for n, p in items}
        self.writer = writer
        self.log_every_n_steps = log_every_n_steps
        self.per_parameter = per_parameter
        self.histograms = histograms
        self._scalar_sink = scalar_sink
        self._layout_written = False
        self._tracked: list[_Tracked] = []
        for opt, prefix in zip(optimizers, optimizer_prefixes(optimizers)):
            try:
                reader = StepReader(opt)
            except UnsupportedOptimizer as err:
                _warn(f"adam-monitor is not monitoring {type(opt).__name__}: {err}. Training goes on; nothing is logged for it.")
                continue
            tracked = _Tracked(opt, reader, prefix)
            tracked.hook = opt.register_step_post_hook(self._make_hook(tracked))
            self._tracked.append(tracked)

    # ------------------------------------------------------------------ stepping
    def _make_hook(self, tracked: _Tracked):
        def hook(optimizer, args, kwargs):
            self._on_step(tracked)

        return hook

    def _on_step(self, tracked: _Tracked) -> None:
        result = tracked.reader.read()
        if result is None:
            return  # skipped step (GradScaler): the optimizer's step count did not move
        rows, step = result
        if tracked.sums is None or tracked.sums.shape != rows.shape:
            tracked.sums = torch.zeros_like(rows) if tracked.sums is None else self._resize(tracked.sums, rows)
        tracked.sums.add_(rows)
        tracked.pending_steps += 1
        tracked.step = step
        if self.log_every_n_steps is not None and step % self.log_every_n_steps == 0:
            self._flush_one(tracked, step)

    @staticmethod
    def _resize(sums: Tensor, rows: Tensor) -> Tensor:
        # Parameters were added to the optimizer mid-run: keep what the old ones accumulated.
        grown = torch.zeros_like(rows)
        grown[: sums.shape[0]] = sums
        return grown

    # ------------------------------------------------------------------ logging
    def _parameter_names(self, tracked: _Tracked) -> list[str]:
        if len(tracked.names) != len(tracked.reader.params):
            names = []
            for gi, group in enumerate(tracked.optimizer.param_groups):
                for pj, p in enumerate(group["params"]):
                    names.append(self._named.get(id(p), f"group{gi}.param{pj}"))
            tracked.names = names
        return tracked.names

    def name_parameters(self, named_parameters: Iterable[tuple[str, Tensor]]) -> None:
        """Set (or refresh) parameter names, e.g. after a strategy wrapped the model."""
        self._named = {id(p): clean_parameter_name(n) for n, p in named_parameters}
        for tracked in self._tracked:
            tracked.names = []

    def compute(self) -> dict[str, float]:
        """The diagnostics pooled since the last flush, as ``{tag: value}`` (one host transfer each)."""
        metrics: dict[str, float] = {}
        for tracked in self._tracked:
            metrics.update(self._metrics(tracked))
        return metrics

    def _metrics(self, tracked: _Tracked) -> dict[str, float]:
        if tracked.sums is None or tracked.pending_steps == 0:
            return {}
        pooled = diagnostics_from_statistics(tracked.sums.sum(0))
        per_param = diagnostics_from_statistics(tracked.sums)
        packed = torch.cat([pooled, per_param.reshape(-1)]) if self.per_parameter else pooled
        values = packed.tolist()  # the one host transfer of this log point
        metrics = {f"{tracked.prefix}/{d}": v for d, v in zip(DIAGNOSTICS, values[:4]) if v == v}
        if self.per_parameter:
            names = self._parameter_names(tracked)
            for i, name in enumerate(names):
                base = 4 + 4 * i
                for k, d in enumerate(DIAGNOSTICS):
                    v = values[base + k]
                    if v == v:  # NaN: the tensor did not step since the last log
                        metrics[f"{tracked.prefix}/{d}/{name}"] = v
        return metrics

    def flush(self, step: int | None = None) -> dict[str, float]:
        """Write everything accumulated since the last flush; returns what was written.

        ``step`` is the x-axis value (default: each optimizer's own step count).
        """
        written: dict[str, float] = {}
        for tracked in self._tracked:
            written.update(self._flush_one(tracked, step))
        return written

    def _flush_one(self, tracked: _Tracked, step: int | None) -> dict[str, float]:
        metrics = self._metrics(tracked)
        if not metrics:
            return {}
        x = tracked.step if step is None else step
        self._write_layout()
        if self._scalar_sink is not None:
            self._scalar_sink(metrics, x)
        elif self.writer is not None:
            for tag, value in metrics.items():
                self.writer.add_scalar(tag, value, x)
        if self.histograms and self.writer is not None:
            names = dict(zip(map(id, tracked.reader.params), self._parameter_names(tracked)))
            for p, u in tracked.reader.updates():
                self.writer.add_histogram(f"{tracked.prefix}/update/{names.get(id(p), '?')}", u.detach().float().cpu(), x)
        tracked.sums.zero_()
        tracked.pending_steps = 0
        return metrics

    def _write_layout(self) -> None:
        if self._layout_written or self.writer is None or not hasattr(self.writer, "add_custom_scalars"):
            return
        from .layout import custom_scalars_layout

        names = {t.prefix: self._parameter_names(t) for t in self._tracked}
        self.writer.add_custom_scalars(custom_scalars_layout(names, per_parameter=self.per_parameter))
        self._layout_written = True

    # ------------------------------------------------------------------ lifecycle
    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [t.optimizer for t in self._tracked]

    def close(self) -> None:
        """Write what is pending, remove the hooks, flush the writer. Idempotent."""
        for tracked in self._tracked:
            if tracked.pending_steps:
                self._flush_one(tracked, None if self._scalar_sink is None else tracked.step)
            if tracked.hook is not None:
                tracked.hook.remove()
                tracked.hook = None
            tracked.reader.release()
        if self.writer is not None and hasattr(self.writer, "flush"):
            self.writer.flush()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def state_dict(self) -> dict:
        """Accumulated sums and step counts, so a resumed run logs what an uninterrupted one would."""
        return {
            "version": 1,
            "optimizers": [
                {
                    "prefix": t.prefix,
                    "sums": None if t.sums is None else t.sums.detach().cpu().clone(),
                    "pending_steps": t.pending_steps,
                    "step": t.step,
                }
                for t in self._tracked
            ],
        }

    def load_state_dict(self, state: dict) -> None:
        saved = {entry["prefix"]: entry for entry in state.get("optimizers", [])}
        for tracked in self._tracked:
            entry = saved.get(tracked.prefix)
            if entry is None:
                continue
            sums = entry["sums"]
            if sums is not None:
                device = tracked.reader.params[0].device if tracked.reader.params else "cpu"
                tracked.sums = sums.to(device=device, dtype=torch.float64).reshape(-1, NUM_STATS)
            tracked.pending_steps = int(entry["pending_steps"])
            tracked.step = int(entry["step"])
