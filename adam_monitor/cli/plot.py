"""The plot of ``adam-monitor report``: one PNG with loss and the diagnostics over steps, alerts marked.

Needs matplotlib (``pip install 'adam-monitor[report]'``).

Alerts are drawn per *episode*, not per alert: an unstable run raises a precursor alert every few
steps, and one line each buries the chart. An episode is a run of alerts of one kind, each within
:data:`EPISODE_WINDOW` chart steps of the previous one (the window in which the rules join
precursor alerts into one episode); the precursor rules share episodes, as in the rules, and
every other rule has its own. Each episode gets one line at its first alert, a light band to its
last, and one label in the "alerts" lane on top naming its first alert's rule and step; a tick in
the lane marks every single alert.

Step convention: everything on the chart, labels included, is on the charts' step axis (the step
the scalars were logged at, ``x_step`` in ``alerts.jsonl``). Under Lightning that axis counts
batches from 0 and lags the optimizer step (``step`` in ``alerts.jsonl`` and ``adam-monitor
check``) by one; the x axis label says so whenever the two differ.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.transforms import blended_transform_factory  # noqa: E402

from ..alerts.log import ALERTS_FILE, read_alert_records  # noqa: E402
from ..alerts.records import SEVERITY_ORDER, Alert, Thresholds  # noqa: E402
from ..theory import noise_level  # noqa: E402
from .events import event_dirs, read_scalars  # noqa: E402

__all__ = [
    "Episode",
    "RunPlot",
    "alert_episodes",
    "build_figure",
    "find_loss_tag",
    "load_runs",
    "run_label",
    "write_report",
]

#: (tag, y label, scale); scale "fraction" is a linear axis fixed to [0, 1].
PANELS = (
    ("loss", "loss", "log"),
    ("adam/update_rms", "update RMS (step / lr)", "linear"),
    ("adam/staleness", "staleness  sqrt(mean g²/v̂)", "linear"),
    ("adam/gradient_jump", "gradient jump  sqrt(mean g²/v̂_prev)", "log"),
    ("adam/eps_dominance", "ε-dominance (fraction)", "fraction"),
)
LINESTYLE = {"error": "-", "warning": "--", "info": ":"}
#: Alerts that describe a regime rather than forecast a spike: marked, but no zoom on them (severity
#: info; runs recorded before that severity existed have them as warnings).
REGIME_RULES = ("eps_dominance", "beta_order")
ZOOM_BEFORE, ZOOM_AFTER = 30, 70
#: Alerts of one kind at most this many chart steps after the previous one are one episode, one
#: marker: the rules' ``after_alert_window``, in which they join precursor alerts into one episode.
EPISODE_WINDOW = Thresholds().after_alert_window
#: The precursor rules, which share episodes (``adam_monitor.alerts.rules.EPISODE_RULES``; not
#: imported from there, which would load torch for a plot).
PRECURSOR_RULES = ("stale_second_moment", "update_rms_spike", "gradient_growth", "fresh_state", "step_size_jump")
#: A series whose values all lie within this of zero is drawn on a fixed y range, not autoscaled
#: to its rounding noise.
FLAT = 1e-6
LANE_HEIGHT = 0.55  # the alerts lane, in panel heights


class Episode(NamedTuple):
    """Alerts of one kind in a row, each within the window of the previous one."""

    first: Alert  # the first alert: its rule names the episode
    x: int  # chart step of the first alert
    last_x: int  # chart step of the last
    count: int  # alerts in the episode
    severity: str  # the worst severity among them
    xs: tuple[int, ...]  # chart step of every alert

    @property
    def label(self) -> str:
        more = f" (+{self.count - 1} to {self.last_x})" if self.count > 1 else ""
        return f"{self.first.rule} at {self.x}{more}"


def alert_episodes(records: Sequence[tuple[Alert, int]], window: int = EPISODE_WINDOW) -> list[Episode]:
    """Group ``(alert, x_step)`` records into episodes, in order of their first step.

    An alert joins the open episode of its kind (the precursor rules are one kind, every other rule
    its own) when it comes at most ``window`` chart steps after that episode's last alert.
    """
    groups: list[list[tuple[Alert, int]]] = []
    open_by_kind: dict[str, list[tuple[Alert, int]]] = {}
    for alert, x in sorted(records, key=lambda r: r[1]):
        kind = "precursor" if alert.rule in PRECURSOR_RULES else alert.rule
        group = open_by_kind.get(kind)
        if group is not None and x <= group[-1][1] + window:
            group.append((alert, x))
        else:
            open_by_kind[kind] = group = [(alert, x)]
            groups.append(group)
    return [
        Episode(
            first=g[0][0],
            x=g[0][1],
            last_x=g[-1][1],
            count=len(g),
            severity=max((a.severity for a, _ in g), key=SEVERITY_ORDER.__getitem__),
            xs=tuple(x for _, x in g),
        )
        for g in groups
    ]


def run_label(run: Path, logdir: Path) -> str:
    """A run's name in the legend: its path under ``logdir``, with parent folders added until it has
    two parts, so a lone ``version_0`` reads ``my_experiment/version_0``."""
    parts = list(run.relative_to(logdir).parts) if run != logdir else []
    above = list(logdir.resolve().parts[1:])  # without the root
    while len(parts) < 2 and above:
        parts.insert(0, above.pop())
    return "/".join(parts) or str(run)


def find_loss_tag(tags) -> str | None:
    """The training loss among the logged tags: exact common names first, then any '*loss*'."""
    for name in ("train/loss", "train_loss", "loss", "train/loss_step", "train_loss_step"):
        if name in tags:
            return name
    candidates = sorted(t for t in tags if "loss" in t.lower() and not t.startswith(("val", "test")))
    return candidates[0] if candidates else None


def _runs(logdir: Path, progress: Callable[[str], None]) -> list[tuple[Path, dict]]:
    """``(run folder, its scalars)`` for every monitored run: each event file is parsed once."""
    runs = []
    progress(f"looking for TensorBoard event files under {logdir}...")
    folders = event_dirs(logdir)
    for i, run in enumerate(folders, 1):
        progress(f"reading {run} ({i}/{len(folders)})...")
        scalars = read_scalars(run)
        if any(tag.startswith("adam/") for tag in scalars):
            runs.append((run, scalars))
    if not runs:
        raise ValueError(f"no TensorBoard event files with adam/* scalars under {logdir}")
    return runs


class RunPlot(NamedTuple):
    """One run as the report draws it."""

    label: str  # its name in the legend (:func:`run_label`)
    colour: str
    scalars: dict  # {tag: [(step, value), ...]}
    records: list  # [(alert, x_step), ...] from its alerts.jsonl
    episodes: list[Episode]


def _step_note(runs: Sequence[RunPlot]) -> str:
    """How the optimizer step of the alerts relates to the chart's step ("" where they are the same)."""
    offsets = {a.step - x for r in runs for a, x in r.records}
    if not offsets or offsets == {0}:
        return ""  # one step for everything: nothing to explain
    if len(offsets) == 1:
        d = offsets.pop()
        return (
            "Steps (x axis and alert labels) are the logged steps; an alert's optimizer step, as in "
            f"alerts.jsonl and `adam-monitor check`, is {'one' if abs(d) == 1 else abs(d)} "
            f"{'more' if d > 0 else 'less'}."
        )
    return (
        "Steps (x axis and alert labels) are the logged steps; alerts.jsonl and `adam-monitor check` "
        "give optimizer steps, which differ from them."
    )


def _positive_log(values: list[float]) -> bool:
    """A log axis fits: no negative value, some positive one (zeros are left out)."""
    return bool(values) and min(values) >= 0 and max(values) > 0


def _set_y(ax, values: list[float], scale: str) -> None:
    """The panel's y scale; a flat series gets a fixed range instead of one that magnifies rounding."""
    if scale == "log" and _positive_log(values):
        ax.set_yscale("log")
        return
    ax.set_yscale("linear")
    if scale == "fraction":
        ax.set_ylim(-0.02, 1.02)
        return
    if not values or max(abs(v) for v in values) <= FLAT:  # all zeros: [0, 1] (or [-1, 1] below zero)
        ax.set_ylim(0.0 if not values or min(values) >= -FLAT else -1.0, 1.0)


def _fit_y(ax, series: list[tuple[Sequence[int], Sequence[float]]], lo: float, hi: float) -> None:
    """Fit the y range of a zoomed panel to the data inside ``[lo, hi]``."""
    seen = [v for steps, values in series for s, v in zip(steps, values) if lo <= s <= hi and math.isfinite(v)]
    if ax.get_yscale() == "log":
        seen = [v for v in seen if v > 0]
        if seen:
            bottom, top = min(seen), max(seen)
            ax.set_ylim(bottom / 1.5, top * 1.5)
        return
    if seen and max(abs(v) for v in seen) > FLAT:
        bottom, top = min(seen), max(seen)
        pad = 0.08 * (top - bottom) or 0.08 * abs(top)
        ax.set_ylim(bottom - pad, top + pad)


def _place_labels(fig, lane, labels: list[tuple[object, str]]) -> None:
    """Stagger the lane's ``(text, severity)`` labels so none overlaps another.

    Errors first, then warnings, then info, each in order of step, a label takes the highest row
    where it fits beside those already placed; one that would leave the lane on the right ends at
    its line instead. When the lane is full, the labels that fit nowhere are hidden (their lines and
    ticks stay) and the lowest row says how many: ``adam-monitor check`` lists every alert.
    """
    renderer = fig.canvas.get_renderer()
    box = lane.get_window_extent(renderer)
    if not labels or box.height <= 0:
        return
    texts = [t for t, _ in labels]
    for text in texts:
        if text.get_window_extent(renderer).x1 > box.x1:
            text.set_horizontalalignment("right")
    height = max(t.get_window_extent(renderer).height for t in texts)
    row_step = 1.15 * height / box.height  # one row, in lane fractions
    rows = max(1, int((0.97 - 0.15) / row_step) + 1)  # the tick strip at the bottom stays free
    order = sorted(labels, key=lambda ts: (-SEVERITY_ORDER[ts[1]], ts[0].get_position()[0]))
    spans = {id(t): (t.get_window_extent(renderer).x0 - 3, t.get_window_extent(renderer).x1 + 3) for t in texts}

    def place(usable: int) -> dict[int, int]:
        taken: list[list[tuple[float, float]]] = [[] for _ in range(usable)]
        placed = {}
        for text, _ in order:
            lo, hi = spans[id(text)]
            for row in range(usable):
                if all(hi <= a or lo >= b for a, b in taken[row]):
                    taken[row].append((lo, hi))
                    placed[id(text)] = row
                    break
        return placed

    placed = place(rows)
    hidden = len(texts) - len(placed)
    if hidden and rows > 1:  # keep the lowest row for the count of what is hidden
        placed = place(rows - 1)
        hidden = len(texts) - len(placed)
    for text in texts:
        if id(text) in placed:
            text.set_y(0.97 - placed[id(text)] * row_step)
        else:
            text.set_visible(False)
    if hidden:
        lane.text(
            0.995,
            0.97 - (rows - 1) * row_step,
            f"{hidden} more episode{'s' if hidden > 1 else ''} not labelled here (adam-monitor check lists every alert)",
            transform=lane.transAxes,
            ha="right",
            va="top",
            fontsize=7,
            color="grey",
            bbox={"boxstyle": "square,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85},
        ).set_in_layout(False)


def _reference_lines(update_ax, staleness_ax) -> None:
    """The healthy levels: update RMS under pure noise at β1 = 0.9 (the logs do not hold the
    betas), staleness 1."""
    noise = noise_level(0.9)
    update_ax.axhline(noise, color="grey", lw=0.8, ls=":")
    update_ax.text(
        0.005,
        noise,
        " noise level at β1 = 0.9",
        transform=update_ax.get_yaxis_transform(),
        fontsize=7,
        color="grey",
        va="bottom",
    )
    staleness_ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    staleness_ax.text(
        0.005,
        1.0,
        " 1: v̂ up to date",
        transform=staleness_ax.get_yaxis_transform(),
        fontsize=7,
        color="grey",
        va="bottom",
    )


def _lane(lane, runs: Sequence[RunPlot], *, zoomed: bool) -> list:
    """The alerts lane of one column: a tick per alert, a label per episode (in view when
    ``zoomed``); returns the labels with their severities, to be staggered once laid out."""
    texts: list = []
    lane.set_ylim(0, 1)
    lane.set_yticks([])
    lane.grid(axis="x", alpha=0.3)
    trans = blended_transform_factory(lane.transData, lane.transAxes)
    lo, hi = lane.get_xlim() if zoomed else (-math.inf, math.inf)
    for r in runs:
        xs = [x for ep in r.episodes for x in ep.xs]
        lane.plot(xs, [0.06] * len(xs), ls="none", marker="|", ms=7, color=r.colour, transform=trans)
        for ep in r.episodes:
            if not lo <= ep.x <= hi:
                continue  # outside the zoom
            text = lane.text(
                ep.x,
                0.97,
                " " + ep.label,
                transform=trans,
                fontsize=7.5,
                color=r.colour,
                ha="left",
                va="top",
                fontweight="bold" if ep.severity == "error" else "normal",
                clip_on=True,
                bbox={"boxstyle": "square,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85},
            )
            text.set_in_layout(False)  # labels must not squeeze the axes
            texts.append((text, ep.severity))
    if not any(r.episodes for r in runs):
        lane.text(0.5, 0.5, "no alerts", transform=lane.transAxes, ha="center", va="center", fontsize=8, color="grey")
    return texts


def build_figure(runs: Sequence[RunPlot], *, title: str):
    """The report's figure: an alerts lane on top, then one panel per diagnostic; a zoom on the
    first warning or error on the right."""
    flagged = [
        (ep.x, ep) for r in runs for ep in r.episodes if ep.severity != "info" and ep.first.rule not in REGIME_RULES
    ]
    columns = 2 if flagged else 1
    fig, axes = plt.subplots(
        len(PANELS) + 1,
        columns,
        figsize=(7 * columns + 2, 2.3 * (len(PANELS) + LANE_HEIGHT) + 0.6),
        sharex="col",
        squeeze=False,
        gridspec_kw={"width_ratios": [3, 2][:columns], "height_ratios": [LANE_HEIGHT] + [1] * len(PANELS)},
        layout="constrained",
    )
    lanes, panels = axes[0], axes[1:]
    series_by_row: list[list] = [[] for _ in PANELS]
    for r in runs:
        for row, (tag, _, _) in enumerate(PANELS):
            key = find_loss_tag(r.scalars) if tag == "loss" else tag
            if key in r.scalars:
                steps, values = zip(*r.scalars[key])
                series_by_row[row].append((r.colour, steps, values))
    for row, (_, ylabel, scale) in enumerate(PANELS):
        values = [v for _, _, vs in series_by_row[row] for v in vs if math.isfinite(v)]
        for col in range(columns):
            ax = panels[row, col]
            for colour, steps, vs in series_by_row[row]:
                ax.plot(steps, vs, color=colour, lw=1.1)
            _set_y(ax, values, scale)
            ax.grid(alpha=0.3)
        panels[row, 0].set_ylabel(ylabel, fontsize=8)
    for col in range(columns):
        for r in runs:
            for ep in r.episodes:
                for ax in axes[:, col]:
                    ax.axvline(ep.x, color=r.colour, ls=LINESTYLE[ep.severity], lw=0.9, alpha=0.8)
                    if ep.last_x > ep.x:
                        ax.axvspan(ep.x, ep.last_x, color=r.colour, alpha=0.07, lw=0)
    _reference_lines(panels[1, 0], panels[2, 0])
    if flagged:
        first_x, first = min(flagged, key=lambda f: f[0])
        lo, hi = first_x - ZOOM_BEFORE, first_x + ZOOM_AFTER
        for ax in axes[:, 1]:
            ax.set_xlim(lo, hi)
        for row in range(len(PANELS)):
            if PANELS[row][2] != "fraction":
                _fit_y(panels[row, 1], [(s, v) for _, s, v in series_by_row[row]], lo, hi)
        lanes[1].set_title(f"around the first warning or error: {first.first.rule} at step {first_x}", fontsize=9)
    texts_by_col = [_lane(lane, runs, zoomed=col == 1) for col, lane in enumerate(lanes)]
    lanes[0].set_ylabel("alerts", fontsize=8)
    handles = [Line2D([], [], color=r.colour, lw=1.5, label=r.label) for r in runs]
    severities = sorted({ep.severity for r in runs for ep in r.episodes}, key=SEVERITY_ORDER.__getitem__, reverse=True)
    handles += [Line2D([], [], color="grey", ls=LINESTYLE[s], lw=0.9, label=f"{s} alert episode") for s in severities]
    # the step convention, where it needs explaining, as the legend's title: one block under the charts
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncols=min(len(handles), 4),
        fontsize=8,
        frameon=False,
        title=_step_note(runs) or None,
        title_fontsize=8,
    )
    for ax in panels[-1]:
        ax.set_xlabel("step", fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.canvas.draw()  # lay the axes out, then stagger the labels in the final positions
    for col, lane in enumerate(lanes):
        _place_labels(fig, lane, texts_by_col[col])
    return fig


def load_runs(logdir: str | Path, progress: Callable[[str], None] | None = None) -> list[RunPlot]:
    """Every monitored run under ``logdir`` with its scalars, alerts and episodes, one colour each."""
    say = progress or (lambda message: None)
    logdir = Path(logdir)
    if not logdir.exists():
        raise FileNotFoundError(f"{logdir} does not exist")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    runs = []
    for i, (run, scalars) in enumerate(_runs(logdir, say)):
        alerts_file = run / ALERTS_FILE
        records = read_alert_records(alerts_file) if alerts_file.exists() else []
        label = run_label(run, logdir)
        runs.append(RunPlot(label, colours[i % len(colours)], scalars, records, alert_episodes(records)))
    return runs


def write_report(
    logdir: str | Path,
    output: str | Path,
    *,
    title: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Plot every monitored run under ``logdir`` (one colour each) into ``output`` (PNG).

    Left: the whole run. Right (when a warning or error fired): a zoom on the first one, where the
    forecast and the loss's answer to it can be read step by step. ``progress`` receives a line
    per stage (reading each run, drawing, writing), for a command line that should not sit silent.
    """
    say = progress or (lambda message: None)
    runs = load_runs(logdir, say)
    say(f"drawing {len(runs)} run(s)...")
    fig = build_figure(runs, title=title or f"adam-monitor report: {logdir}")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(output, dpi=100)
    finally:
        plt.close(fig)
    say(f"wrote {output}")
    return output
