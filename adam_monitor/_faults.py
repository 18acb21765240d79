"""Writes that must never end the run they record: warnings, soft sinks, appends that survive kills.

Everything the monitor writes (alerts.jsonl, the run record, TensorBoard, the loggers) goes through
:class:`SoftWrites`: a failure is one warning naming the target and the error, training goes on,
and the caller keeps what it could not write to try again. A second warning comes only when the
target works again, or fails again after it had recovered.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

from ._runtime import is_rank_zero

try:  # POSIX: one writer at a time per file, across processes (two runs sharing a folder)
    import fcntl
except ImportError:  # pragma: no cover - Windows: appends are not serialised across processes
    fcntl = None

__all__ = ["SoftWrites", "append_lines", "replace_file", "warn"]

#: How much of a file's end is read to find (and repair) a torn last line.
TAIL_BYTES = 1 << 16


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """A warning on rank zero, pointing at no line: it is raised from inside ``optimizer.step``,
    where a line of ours or torch's would only distract. Filters by category and message still work."""
    if is_rank_zero():
        warnings.warn_explicit(message, category, filename="adam-monitor", lineno=0, module="adam_monitor")


class SoftWrites:
    """Runs writes that may fail; a failure warns once per target and returns ``False``."""

    def __init__(self):
        self._failing: set[str] = set()

    def attempt(self, target: str, write: Callable[[], object], *, kept: str) -> bool:
        """``write()``; on an exception warn (once while ``target`` keeps failing) and return ``False``.

        ``kept`` tells the user what is not lost (e.g. "alerts stay in Monitor.alerts").
        """
        try:
            write()
        except Exception as err:  # noqa: BLE001 - any sink may fail in its own way; none may end training
            if target not in self._failing:
                self._failing.add(target)
                warn(
                    f"adam-monitor could not write {target}: {type(err).__name__}: {err}. Training goes on; "
                    f"{kept}. Retried at the next log point and at close()."
                )
            return False
        if target in self._failing:
            self._failing.discard(target)
            warn(f"adam-monitor writes {target} again.")
        return True

    @property
    def failing(self) -> bool:
        return bool(self._failing)


def _locked(fd: int, lock: bool) -> None:
    if fcntl is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if lock else fcntl.LOCK_UN)
    except OSError:
        pass  # a file system without locks (some network mounts): append unserialised rather than not at all


def append_lines(path: Path, lines: list[str], repair: Callable[[str], str]) -> None:
    """Append ``lines`` (each one record, no newline) durably; all of them or none.

    A last line left without its newline by a process that died while writing is replaced by
    ``repair(fragment)`` (one complete record) in the same write, so a new record never joins it.
    A write that fails part-way is undone (the bytes it overwrote restored, the file cut back to
    its size), so no torn line of ours stays behind.
    """
    with open(path, "ab"):
        pass  # create it; appends below go through one read-write handle
    with open(path, "r+b", buffering=0) as f:  # unbuffered: what failed is known, nothing is left to flush
        _locked(f.fileno(), True)
        try:
            size = f.seek(0, os.SEEK_END)
            start, original, prefix = size, b"", b""
            if size:
                f.seek(max(0, size - TAIL_BYTES))
                tail = f.read()
                if not tail.endswith(b"\n"):
                    original = tail[tail.rfind(b"\n") + 1 :]  # the whole tail when it holds no newline
                    start = size - len(original)
                    prefix = (repair(original.decode("utf-8", errors="replace")) + "\n").encode()
            data = prefix + "".join(line + "\n" for line in lines).encode()
            try:
                _write_at(f, start, data)
                f.truncate()
                os.fsync(f.fileno())
            except OSError:
                _undo(f, start, original, size)
                raise
        finally:
            _locked(f.fileno(), False)


def _write_at(f, offset: int, data: bytes) -> None:
    f.seek(offset)
    view = memoryview(data)
    while view:
        view = view[f.write(view) :]


def _undo(f, start: int, original: bytes, size: int) -> None:
    try:
        _write_at(f, start, original)  # rewrites blocks the file already holds: no new space needed
        f.truncate(size)
    except OSError:
        pass  # the next append repairs what is left


def replace_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: a reader sees the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
