"""The TensorBoard sink, and its custom-scalars layout: pooled charts first, then one category per module.

One multiline chart over hundreds of tensors is unreadable, so per-parameter charts are split by
the module that owns the tensors (the name's leading components) and each chart holds at most
``max_lines`` tensors.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Iterable

from torch import Tensor

from .._faults import SoftWrites
from ..diagnostics.rows import DIAGNOSTICS

__all__ = ["TensorBoardSink", "custom_scalars_layout", "module_of", "worst_table"]


def module_of(name: str, depth: int) -> str:
    """The first ``depth`` dotted components of a parameter name, without the tensor's own name."""
    parts = name.split(".")[:-1] or [name]
    return ".".join(parts[:depth])


def _module_groups(names: list[str], max_lines: int) -> OrderedDict[str, list[str]]:
    # Go one level deeper while a module holds more tensors than a chart shows well, and while
    # everything sits under one root (e.g. "model."), which would make a single useless group.
    depth = 1
    while True:
        groups: OrderedDict[str, list[str]] = OrderedDict()
        for n in names:
            groups.setdefault(module_of(n, depth), []).append(n)
        deepest = max(len(n.split(".")) - 1 for n in names) if names else 0
        too_big = any(len(v) > max_lines for v in groups.values())
        if depth >= deepest or (len(groups) > 1 and not too_big):
            return groups
        depth += 1


def custom_scalars_layout(
    names_by_prefix: dict[str, list[str]], *, per_parameter: bool = True, max_lines: int = 12
) -> dict:
    """Layout for ``SummaryWriter.add_custom_scalars``.

    ``names_by_prefix`` maps each optimizer's tag prefix (``adam`` or ``adam/<Class>[-i]``) to the
    names of its parameters.
    """
    layout: dict = {}
    pooled = {}
    for diag in DIAGNOSTICS:
        pooled[diag] = ["Multiline", [f"^{re.escape(prefix)}/{diag}$" for prefix in names_by_prefix]]
    pooled["alerts (count)"] = ["Multiline", ["^adam/alerts$"]]
    layout["adam: pooled over all tensors"] = pooled
    if not per_parameter:
        return layout
    layout["adam: worst tensor (named in the Text tab, adam/worst_tensors)"] = {
        diag: ["Multiline", [f"^{re.escape(prefix)}/worst/{diag}$" for prefix in names_by_prefix]]
        for diag in DIAGNOSTICS
    }
    for prefix, names in names_by_prefix.items():
        for module, members in _module_groups(list(dict.fromkeys(names)), max_lines).items():
            charts = {}
            chunks = [members[i : i + max_lines] for i in range(0, len(members), max_lines)]
            for diag in DIAGNOSTICS:
                for k, chunk in enumerate(chunks):
                    title = diag if len(chunks) == 1 else f"{diag} ({k + 1}/{len(chunks)})"
                    charts[title] = ["Multiline", [f"^{re.escape(f'{prefix}/{diag}/{n}')}$" for n in chunk]]
            category = f"{prefix}: {module}" if len(names_by_prefix) > 1 else f"adam: {module}"
            layout[category] = charts
    return layout


def worst_table(worst: dict[str, list[tuple[float, str]]]) -> str:
    """Markdown: per diagnostic the worst tensors and their values."""
    rows = ["| diagnostic | worst tensors (value) |", "|---|---|"]
    for diag, top in worst.items():
        rows.append(f"| {diag} | " + ", ".join(f"`{name}` ({value:.4g})" for value, name in top) + " |")
    return "\n".join(rows)


class TensorBoardSink:
    """Where a log point goes: scalars to ``scalar_sink`` (Lightning's loggers) or the writer; the
    worst-tensor text, the custom-scalars layout (once) and histograms to the writer.

    A sink that fails (disk full, a closed writer, a logger's error) is warned about once and
    skipped at that log point: the next log point pools every step since the last one written.
    """

    def __init__(self, writer, *, scalar_sink: Callable[[dict[str, float], int], None] | None, per_parameter: bool):
        self.writer = writer
        self._scalar_sink = scalar_sink
        self._per_parameter = per_parameter
        self._layout_written = False
        self.soft = SoftWrites()
        folder = getattr(writer, "log_dir", None)
        self._where = f"TensorBoard ({folder})" if folder else "the TensorBoard writer"

    def write_layout(self, names_by_prefix: dict[str, list[str]]) -> None:
        if self._layout_written or self.writer is None or not hasattr(self.writer, "add_custom_scalars"):
            return
        layout = custom_scalars_layout(names_by_prefix, per_parameter=self._per_parameter)
        self._layout_written = self.soft.attempt(
            f"the custom-scalars layout to {self._where}",
            lambda: self.writer.add_custom_scalars(layout),
            kept="the scalars are written without it",
        )

    def write(
        self,
        prefix: str,
        metrics: dict[str, float],
        x: int,
        *,
        worst: dict[str, list[tuple[float, str]]],
        histograms: Iterable[tuple[str, Tensor]] = (),
    ) -> bool:
        """Write one log point; ``False`` if the scalars could not be written."""
        kept = "the next log point written pools these steps with its own"
        if self._scalar_sink is not None:
            written = self.soft.attempt("scalars to the loggers", lambda: self._scalar_sink(metrics, x), kept=kept)
        elif self.writer is not None:
            written = self.soft.attempt(f"scalars to {self._where}", lambda: self._scalars(metrics, x), kept=kept)
        else:
            written = True
        if self.writer is not None and (worst or histograms):
            self.soft.attempt(
                f"text and histograms to {self._where}",
                lambda: self._extras(prefix, x, worst, histograms),
                kept="the scalars are written without them",
            )
        return written

    def _scalars(self, metrics: dict[str, float], x: int) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, x)

    def _extras(self, prefix, x, worst, histograms) -> None:
        if worst:
            self.writer.add_text(f"{prefix}/worst_tensors", worst_table(worst), x)
        for name, direction in histograms:
            self.writer.add_histogram(f"{prefix}/update/{name}", direction.detach().float().cpu(), x)

    def flush(self) -> None:
        if self.writer is not None and hasattr(self.writer, "flush"):
            self.soft.attempt(f"{self._where} (flush)", self.writer.flush, kept="what it held may be lost")
