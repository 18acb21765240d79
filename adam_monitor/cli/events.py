"""Reading TensorBoard event files back (for the CLI and for tests), with tensorboard's own reader."""

from __future__ import annotations

from pathlib import Path

__all__ = ["event_dirs", "read_scalars"]


def event_dirs(logdir: str | Path) -> list[Path]:
    """Every folder under ``logdir`` (itself included) that holds TensorBoard event files."""
    root = Path(logdir)
    return sorted({f.parent for f in root.rglob("events.out.tfevents.*")})


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` from all event files in one run folder (not recursive)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={SCALARS: 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
