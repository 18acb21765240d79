"""Consecutive runs of tensors bounded in total size: what bounds the temporaries of a
multi-tensor pass, whose every operation allocates a result the size of its inputs."""

from __future__ import annotations

from collections.abc import Sequence


def bounded_runs(sizes: Sequence[int], limit: int) -> list[tuple[int, int]]:
    """``(start, stop)`` index ranges covering ``sizes`` in order, each summing to at most
    ``limit`` (an item larger than that alone)."""
    runs: list[tuple[int, int]] = []
    start, total = 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > limit:
            runs.append((start, i))
            start, total = i, 0
        total += size
    runs.append((start, len(sizes)))
    return runs
