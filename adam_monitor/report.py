"""``adam-monitor report``: one PNG with loss and the diagnostics over steps, alerts marked.

Needs matplotlib (``pip install 'adam-monitor[report]'``).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

from .alert_log import ALERTS_FILE, read_alert_records  # noqa: E402
from .events import event_dirs, read_scalars  # noqa: E402

__all__ = ["write_report", "find_loss_tag"]

PANELS = (
    ("loss", "loss", "log"),
    ("adam/update_rms", "update RMS (step / lr)", "linear"),
    ("adam/staleness", "staleness  sqrt(mean g²/v̂)", "linear"),
    ("adam/gradient_jump", "gradient jump  sqrt(mean g²/v̂_prev)", "log"),
    ("adam/eps_dominance", "ε-dominance (fraction)", "linear"),
)
SEVERITY_COLOUR = {"error": "#c0392b", "warning": "#e67e22"}


def find_loss_tag(tags) -> str | None:
    """The training loss among the logged tags: exact common names first, then any '*loss*'."""
    for name in ("train/loss", "train_loss", "loss", "train/loss_step", "train_loss_step"):
        if name in tags:
            return name
    candidates = sorted(t for t in tags if "loss" in t.lower() and not t.startswith(("val", "test")))
    return candidates[0] if candidates else None


def _runs(logdir: Path) -> list[Path]:
    runs = [d for d in event_dirs(logdir) if any(t.startswith("adam/") for t in read_scalars(d))]
    if not runs:
        raise ValueError(f"no TensorBoard event files with adam/* scalars under {logdir}")
    return runs


def write_report(logdir: str | Path, output: str | Path, *, title: str | None = None) -> Path:
    """Plot every monitored run under ``logdir`` (one colour each) into ``output`` (PNG)."""
    logdir = Path(logdir)
    if not logdir.exists():
        raise FileNotFoundError(f"{logdir} does not exist")
    runs = _runs(logdir)
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(11, 2.3 * len(PANELS)), sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        colour = colours[i % len(colours)]
        label = str(run.relative_to(logdir)) if run != logdir else run.name
        scalars = read_scalars(run)
        for ax, (tag, ylabel, scale) in zip(axes, PANELS):
            key = find_loss_tag(scalars) if tag == "loss" else tag
            if key in scalars:
                steps, values = zip(*scalars[key])
                ax.plot(steps, values, color=colour, lw=1.2, label=label)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_yscale(scale)
            ax.grid(alpha=0.3)
        alerts_file = run / ALERTS_FILE
        records = read_alert_records(alerts_file) if alerts_file.exists() else []
        for alert, x in records:
            for ax in axes:
                ax.axvline(x, color=SEVERITY_COLOUR[alert.severity], ls="--", lw=0.9, alpha=0.8)
            axes[0].annotate(
                f"{alert.rule}\n(step {alert.step})",
                xy=(x, 1.0),
                xycoords=("data", "axes fraction"),
                fontsize=7,
                color=SEVERITY_COLOUR[alert.severity],
                ha="left",
                va="top",
                rotation=90,
            )
    axes[1].axhline(0.2294, color="grey", lw=0.8, ls=":", label="noise level (β1 = 0.9)")
    axes[2].axhline(1.0, color="grey", lw=0.8, ls=":")
    axes[0].legend(fontsize=8, loc="upper right")
    axes[-1].set_xlabel("step")
    fig.suptitle(title or f"adam-monitor report: {logdir}", fontsize=11)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output
