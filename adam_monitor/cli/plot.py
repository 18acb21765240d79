"""The plot of ``adam-monitor report``: one PNG with loss and the diagnostics over steps, alerts marked.

Needs matplotlib (``pip install 'adam-monitor[report]'``).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

from ..alerts.log import ALERTS_FILE, read_alert_records  # noqa: E402
from .events import event_dirs, read_scalars  # noqa: E402

__all__ = ["write_report", "find_loss_tag"]

PANELS = (
    ("loss", "loss", "log"),
    ("adam/update_rms", "update RMS (step / lr)", "linear"),
    ("adam/staleness", "staleness  sqrt(mean g²/v̂)", "linear"),
    ("adam/gradient_jump", "gradient jump  sqrt(mean g²/v̂_prev)", "log"),
    ("adam/eps_dominance", "ε-dominance (fraction)", "linear"),
)
LINESTYLE = {"error": "-", "warning": "--", "info": ":"}
#: Alerts that describe a regime rather than forecast a spike: marked, but no zoom on them (severity
#: info; runs recorded before that severity existed have them as warnings).
REGIME_RULES = ("eps_dominance", "beta_order")
ZOOM_BEFORE, ZOOM_AFTER = 30, 70


def find_loss_tag(tags) -> str | None:
    """The training loss among the logged tags: exact common names first, then any '*loss*'."""
    for name in ("train/loss", "train_loss", "loss", "train/loss_step", "train_loss_step"):
        if name in tags:
            return name
    candidates = sorted(t for t in tags if "loss" in t.lower() and not t.startswith(("val", "test")))
    return candidates[0] if candidates else None


def _runs(logdir: Path) -> list[tuple[Path, dict]]:
    """``(run folder, its scalars)`` for every monitored run: each event file is parsed once."""
    runs = []
    for run in event_dirs(logdir):
        scalars = read_scalars(run)
        if any(tag.startswith("adam/") for tag in scalars):
            runs.append((run, scalars))
    if not runs:
        raise ValueError(f"no TensorBoard event files with adam/* scalars under {logdir}")
    return runs


def write_report(logdir: str | Path, output: str | Path, *, title: str | None = None) -> Path:
    """Plot every monitored run under ``logdir`` (one colour each) into ``output`` (PNG).

    Left: the whole run. Right (when a spike precursor fired): a zoom on the first one, where the
    forecast and the loss's answer to it can be read step by step.
    """
    logdir = Path(logdir)
    if not logdir.exists():
        raise FileNotFoundError(f"{logdir} does not exist")
    runs = _runs(logdir)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    loaded = []
    for i, (run, scalars) in enumerate(runs):
        alerts_file = run / ALERTS_FILE
        records = read_alert_records(alerts_file) if alerts_file.exists() else []
        label = str(run.relative_to(logdir)) if run != logdir else run.name
        loaded.append((label, colours[i % len(colours)], scalars, records))
    precursors = [
        x for *_, records in loaded for a, x in records if a.rule not in REGIME_RULES and a.severity != "info"
    ]
    columns = 2 if precursors else 1
    fig, axes = plt.subplots(
        len(PANELS),
        columns,
        figsize=(7 * columns + 2, 2.3 * len(PANELS)),
        sharex="col",
        squeeze=False,
        gridspec_kw={"width_ratios": [3, 2][:columns]},
        layout="constrained",
    )
    for label, colour, scalars, records in loaded:
        for row, (tag, ylabel, scale) in enumerate(PANELS):
            key = find_loss_tag(scalars) if tag == "loss" else tag
            for col in range(columns):
                ax = axes[row, col]
                if key in scalars:
                    steps, values = zip(*scalars[key])
                    ax.plot(steps, values, color=colour, lw=1.1, label=label if row == col == 0 else None)
                for alert, x in records:
                    ax.axvline(x, color=colour, ls=LINESTYLE[alert.severity], lw=0.8, alpha=0.7)
                ax.set_yscale(scale)
                ax.grid(alpha=0.3)
            axes[row, 0].set_ylabel(ylabel, fontsize=8)
        first_of_rule = {}
        for alert, x in records:
            first_of_rule.setdefault(alert.rule, (alert, x))
        for alert, x in first_of_rule.values():
            for col in range(columns):
                note = axes[0, col].annotate(
                    f"{alert.rule} (step {alert.step})",
                    xy=(x, 1.0),
                    xycoords=("data", "axes fraction"),
                    fontsize=7,
                    color=colour,
                    ha="right",
                    va="top",
                    rotation=90,
                )
                note.set_in_layout(False)  # labels on the chart must not squeeze the axes
    if precursors:
        first = min(precursors)
        for ax in axes[:, 1]:
            ax.set_xlim(first - ZOOM_BEFORE, first + ZOOM_AFTER)
        axes[0, 1].set_title(f"around the first spike precursor (step axis {first})", fontsize=9)
    axes[1, 0].axhline(0.2294, color="grey", lw=0.8, ls=":", label="noise level (β1 = 0.9)")
    axes[2, 0].axhline(1.0, color="grey", lw=0.8, ls=":")
    axes[0, 0].legend(fontsize=8, loc="upper right")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    fig.suptitle(title or f"adam-monitor report: {logdir}", fontsize=11)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output
