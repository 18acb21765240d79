"""The TensorBoard sink, and its custom-scalars layout: the loss beside the pooled charts first, then
one category per module.

One multiline chart over hundreds of tensors is unreadable, so per-parameter charts are split by
the module that owns the tensors (the name's leading components), and each chart holds at most
``LINES_PER_CHART`` tensors. TensorBoard colours a custom-scalars line by its *run* only (the run's
colour, whatever the layout says), so the lines of one run in one chart share a colour; it tells
them apart by a marker symbol per line (■ ◆ ▲ ★ ✚, also shown in the chart's "Matches" list),
cycling through five. Five lines a chart at most gives each tensor its own marker.

The worst-tensor text (``adam/worst_tensors``) is written at the first log point, at the first
log point at or after an alert, and when a diagnostic's worst tensor has changed for good (see
``_TableSchedule``), not at every log point: TensorBoard shows at most 100 texts per tag (10 with
``--load_fast=false``), picked at random but for the last, so tables at every log point would
bury the ones that matter. ``tensorboard --samples_per_plugin=text=100000`` shows them all (not
``text=0``: in TensorBoard 2.21 that shows none; ``text=all`` is refused).
"""

from __future__ import annotations

import re
import sys
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping

from torch import Tensor

from .._faults import SoftWrites
from ..alerts.log import markdown_code, markdown_escaped
from ..diagnostics.rows import DIAGNOSTICS
from .metrics import parameter_tag

__all__ = [
    "LINES_PER_CHART",
    "LOSS_TAGS",
    "WORST_SETTLED",
    "TensorBoardSink",
    "custom_scalars_layout",
    "module_of",
    "worst_table",
    "write_scalars",
]

#: The marker symbols TensorBoard's custom-scalars chart cycles through for the lines of one run.
LINES_PER_CHART = 5

#: Log points in a row a diagnostic's worst tensor must be another one before the table is rewritten.
WORST_SETTLED = 3

#: The trainer's loss tags, whatever they are called (``loss``, ``train_loss``, ``train/loss_step``,
#: ``val_loss``, ``eval/Loss``...): a tag whose last component contains "loss" in any case, outside
#: ``adam/`` and ``adam_per_parameter/``. The layout is written before the trainer logs anything, hence a pattern. The
#: custom-scalars plugin matches it with Python's ``re.match``; it is also valid JavaScript (no
#: inline flags, hence the character classes).
LOSS_TAGS = r"^(?!adam(?:_per_parameter)?/)(?:.*/)?[^/]*[Ll][Oo][Ss][Ss][^/]*$"


def module_of(name: str, depth: int) -> str:
    """The first ``depth`` dotted components of a parameter name, without the tensor's own name."""
    parts = name.split(".")[:-1] or [name]
    return ".".join(parts[:depth])


def _module_groups(names: list[str], max_lines: int) -> OrderedDict[str, list[str]]:
    # Go one level deeper while a module holds more tensors than a category shows well, and while
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


def _chunks(members: list[str], size: int) -> list[list[str]]:
    """``members`` in consecutive charts of at most ``size``, as even as possible (12 → 4, 4, 4)."""
    count = -(-len(members) // size)
    even = -(-len(members) // count)
    return [members[i : i + even] for i in range(0, len(members), even)]


def _pooled(prefixes: list[str]) -> dict:
    def chart(diag: str) -> list:
        return ["Multiline", [f"^{re.escape(prefix)}/{diag}$" for prefix in prefixes]]

    # The loss first, beside what foretells it: an alert shows up before the loss moves.
    first = {"loss": ["Multiline", [LOSS_TAGS]], "update_rms": chart("update_rms"), "staleness": chart("staleness")}
    first["alerts (count)"] = ["Multiline", ["^adam/alerts$"]]
    return {**first, **{diag: chart(diag) for diag in DIAGNOSTICS if diag not in first}}


def custom_scalars_layout(
    names_by_prefix: dict[str, list[str]],
    *,
    per_parameter: bool = True,
    max_lines: int = 12,
    lines_per_chart: int = LINES_PER_CHART,
) -> dict:
    """Layout for ``SummaryWriter.add_custom_scalars``.

    ``names_by_prefix`` maps each optimizer's tag prefix (``adam`` or ``adam/<Class>[-i]``) to the
    names of its parameters. A module category holds about ``max_lines`` tensors, a chart at most
    ``lines_per_chart``.
    """
    layout: dict = {"adam: pooled over all tensors": _pooled(list(names_by_prefix))}
    if not per_parameter:
        return layout
    layout["adam: worst tensor (named in the Text tab, adam/worst_tensors)"] = {
        diag: ["Multiline", [f"^{re.escape(prefix)}/worst/{diag}$" for prefix in names_by_prefix]]
        for diag in DIAGNOSTICS
    }
    for prefix, names in names_by_prefix.items():
        for module, members in _module_groups(list(dict.fromkeys(names)), max_lines).items():
            charts = {}
            chunks = _chunks(members, lines_per_chart)
            for diag in DIAGNOSTICS:
                for k, chunk in enumerate(chunks):
                    title = diag if len(chunks) == 1 else f"{diag} ({k + 1}/{len(chunks)})"
                    charts[title] = ["Multiline", [f"^{re.escape(parameter_tag(prefix, diag, n))}$" for n in chunk]]
            category = f"{prefix}: {module}" if len(names_by_prefix) > 1 else f"adam: {module}"
            layout[category] = charts
    return layout


def worst_table(worst: dict[str, list[tuple[float, str]]]) -> str:
    """Markdown: per diagnostic the worst tensors and their values."""
    rows = ["| diagnostic | worst tensors (value) |", "|---|---|"]
    for diag, top in worst.items():
        named = ", ".join(f"{markdown_code(name)} ({value:.4g})" for value, name in top)
        rows.append(f"| {markdown_escaped(diag)} | {named} |")
    return "\n".join(rows)


def fast_record_checksums() -> bool:
    """Make TensorBoard's event records checksummed in C; ``True`` where that is now so.

    Each record of an event file carries a masked CRC-32C, which TensorBoard's record writer
    computes in pure Python a byte at a time: at hundreds of tensors most of a log point's cost
    (its writer thread holds the GIL while it runs). Where google-crc32c's C implementation is
    installed the record writer's checksum function is replaced by one built on it, for every
    writer in the process: the same values (checked here before the swap), so the files are
    byte for byte those it wrote before.
    """
    try:
        import google_crc32c
        from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
        from tensorboard.summary.writer import record_writer
    except ImportError:
        return False
    if getattr(record_writer.masked_crc32c, "__module__", None) == __name__:
        return True
    if google_crc32c.implementation != "c" or record_writer.masked_crc32c is not pywrap_tensorflow.masked_crc32c:
        return False  # the pure-Python fallback gains nothing; a checksum someone else put there stays

    def masked_crc32c(data: bytes) -> int:
        x = google_crc32c.value(bytes(data))
        return ((((x >> 15) | (x << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF

    samples = [b"", b"\x00", b"adam-monitor", bytes(range(256)) * 5]
    if any(masked_crc32c(d) != pywrap_tensorflow.masked_crc32c(d) for d in samples):
        return False
    record_writer.masked_crc32c = masked_crc32c
    return True


def write_scalars(writer, metrics: Mapping[str, object], step: int | None) -> None:
    """``writer.add_scalar(tag, value, step)`` for every item, in one event where ``writer`` is
    torch's ``SummaryWriter``: the same tags, step and float32 values read back, at a small
    fraction of the cost with hundreds of tags. The wall time is the time of the write, as
    add_scalar's, one for all of them rather than one per tag.

    Any other writer gets one ``add_scalar`` call per tag. An error propagates to the caller; in
    one event, a value add_scalar would refuse leaves the whole batch unwritten (the caller
    retries it whole) where add_scalar would have written the tags before it.
    """
    file_writer = _summary_file_writer(writer)
    if file_writer is None:
        for tag, value in metrics.items():
            writer.add_scalar(tag, value, step)
        return
    from tensorboard.compat.proto.summary_pb2 import Summary
    from torch.utils.tensorboard.summary import scalar

    summary = Summary()
    add = summary.value.add
    for tag, value in metrics.items():
        if type(value) is float:
            add(tag=tag, simple_value=value)  # what scalar() makes of a float, without its numpy round trip
        else:
            summary.value.extend(scalar(tag, value).value)  # ints, numpy, tensors: torch's own conversion
    file_writer.add_summary(summary, step)


def _summary_file_writer(writer):
    """The file writer behind ``writer.add_scalar`` when that is torch's own, else ``None``.

    ``SummaryWriter.add_scalar`` is ``scalar()`` then ``_get_file_writer().add_summary()``: one
    event per tag, each its own proto, serialisation and hand-off to the writer's thread, and that
    per-tag cost is most of a per-parameter log point. ``_get_file_writer`` is private, so it is
    used only where skipping ``add_scalar`` skips nothing else: a ``SummaryWriter`` whose
    ``add_scalar`` is torch's unchanged (no subclass override, nothing patched onto the instance),
    whose file writer takes summaries. tensorboardX's writer, with protos of its own, is no
    ``SummaryWriter`` of torch's and keeps ``add_scalar``.
    """
    module = sys.modules.get("torch.utils.tensorboard.writer")  # not loaded: writer cannot be one
    summary_writer = getattr(module, "SummaryWriter", None)
    if summary_writer is None or not isinstance(writer, summary_writer):
        return None
    if type(writer).add_scalar is not summary_writer.add_scalar or "add_scalar" in vars(writer):
        return None
    get_file_writer = getattr(writer, "_get_file_writer", None)
    if not callable(get_file_writer):
        return None
    file_writer = get_file_writer()
    return file_writer if callable(getattr(file_writer, "add_summary", None)) else None


class _TableSchedule:
    """When one optimizer's worst-tensor table is written: at its first log point; at the first
    log point at or after an alert; and when the worst tensor of a diagnostic is another one than
    the last table named, and has been for ``WORST_SETTLED`` log points in a row. (Rewriting on
    any change of the ranking would write nearly every log point: among tensors of similar size
    the order flips from one log point to the next.) A table that could not be written is due again."""

    def __init__(self):
        self.named: dict[str, str] | None = None  # the worst tensor per diagnostic, as last written
        self.recent: deque[dict[str, str]] = deque(maxlen=WORST_SETTLED)
        self.alerts = 0.0
        self.owed = False

    def due(self, worst: dict[str, list[tuple[float, str]]], alerts: float) -> bool:
        tops = {diag: top[0][1] for diag, top in worst.items() if top}
        self.recent.append(tops)
        alerted, self.alerts = alerts > self.alerts, alerts
        moved = self.named is None or any(self._settled(d, n) for d, n in tops.items() if self.named.get(d) != n)
        self.owed = self.owed or alerted or moved
        return self.owed

    def _settled(self, diag: str, name: str) -> bool:
        return len(self.recent) == WORST_SETTLED and all(tops.get(diag) == name for tops in self.recent)

    def written(self) -> None:
        self.named, self.owed = dict(self.recent[-1]), False


class TensorBoardSink:
    """Where a log point goes: scalars to ``scalar_sink`` (Lightning's loggers) or the writer; the
    worst-tensor text, the custom-scalars layout (once) and histograms to the writer.

    A sink that fails (disk full, a closed writer, a logger's error) is warned about once and
    skipped at that log point: the next log point pools every step since the last one written.
    The worst-tensor text is written only where it says something new (see the module's docstring).
    """

    def __init__(self, writer, *, scalar_sink: Callable[[dict[str, float], int], None] | None, per_parameter: bool):
        self.writer = writer
        if writer is not None:
            fast_record_checksums()
        self._scalar_sink = scalar_sink
        self._per_parameter = per_parameter
        self._layout_written = False
        self._tables: dict[str, _TableSchedule] = {}  # per prefix
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
        """Write one log point; ``False`` if the scalars could not be written.

        ``metrics["adam/alerts"]`` (the run's alert count) tells whether an alert came since this
        optimizer's last log point.
        """
        kept = "the next log point written pools these steps with its own"
        if self._scalar_sink is not None:
            written = self.soft.attempt("scalars to the loggers", lambda: self._scalar_sink(metrics, x), kept=kept)
        elif self.writer is not None:
            written = self.soft.attempt(f"scalars to {self._where}", lambda: self._scalars(metrics, x), kept=kept)
        else:
            written = True
        schedule = self._tables.setdefault(prefix, _TableSchedule())
        table = worst if worst and schedule.due(worst, metrics.get("adam/alerts", 0.0)) else {}
        if self.writer is not None and (table or histograms):
            extras = self.soft.attempt(
                f"text and histograms to {self._where}",
                lambda: self._extras(prefix, x, table, histograms),
                kept="the scalars are written without them",
            )
            if extras and table:
                schedule.written()
        return written

    def _scalars(self, metrics: dict[str, float], x: int) -> None:
        write_scalars(self.writer, metrics, x)

    def _extras(self, prefix, x, worst, histograms) -> None:
        if worst:
            self.writer.add_text(f"{prefix}/worst_tensors", worst_table(worst), x)
        for name, direction in histograms:
            self.writer.add_histogram(f"{prefix}/update/{name}", direction.detach().float().cpu(), x)

    def flush(self) -> None:
        if self.writer is not None and hasattr(self.writer, "flush"):
            self.soft.attempt(f"{self._where} (flush)", self.writer.flush, kept="what it held may be lost")
