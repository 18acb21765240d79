"""The statistics kernel compiled ahead of time, in a child process, and kept on disk.

``torch.compile`` of the kernel in the training process blocks the first step for as long as the
compilation takes (seconds with a warm inductor cache, tens with a cold one) and loads dynamo and
inductor into that process for good (about 150 MiB). Here the kernel of
:mod:`adam_monitor.diagnostics.compiled` is exported and compiled by AOTInductor in a child
process into one shared library per configuration (the dtypes of a head's tensors), kept in
:func:`cache_dir`; a process that finds the library loads it with torch's AOTInductor runner
alone, in a millisecond, importing neither dynamo nor inductor. While the child builds it, the
statistics take the eager path: no step waits for a compiler. The library is built once per
machine kind (the CPU's vector extension), torch build and kernel source, and checked against the
kernel run eagerly before it is kept.

CPU only: on a GPU the in-process compilation stays (its kernels' binaries live beside the
library, which this loader does not handle).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import inspect
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .._runtime import BLOCK, HEADS_PER_CALL, is_rank_zero

__all__ = ["AHEAD_ENV", "CACHE_ENV", "KernelUnavailable", "available", "cache_dir", "kernel"]

#: Environment variable naming the folder of the built kernels.
CACHE_ENV = "ADAM_MONITOR_CACHE_DIR"
#: Environment variable that turns the ahead-of-time kernel off when false (``0``): the statistics
#: are then compiled in the training process, as ``torch.compile`` does.
AHEAD_ENV = "ADAM_MONITOR_AHEAD_OF_TIME"
#: A build marked as running for longer than this is taken for a dead one and started again.
BUILD_STALE_S = 1200.0


class KernelUnavailable(RuntimeError):
    """The kernel could not be built or loaded here; the message says why and where its log is."""


def available(device: torch.device) -> bool:
    """Whether the ahead-of-time kernel serves tensors on ``device`` in this process."""
    if os.environ.get(AHEAD_ENV, "1").lower() in ("0", "false", "no", "off"):
        return False
    aoti = getattr(torch._C, "_aoti", None)
    return device.type == "cpu" and hasattr(aoti, "AOTIModelContainerRunnerCpu")


def cache_dir() -> Path:
    """``$ADAM_MONITOR_CACHE_DIR``, else ``adam-monitor`` in ``$XDG_CACHE_HOME`` or ``~/.cache``,
    else (neither writable) in the temporary folder."""
    given = os.environ.get(CACHE_ENV)
    if given:
        return Path(given)
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adam-monitor"
    try:
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"adam-monitor-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


@functools.cache
def _source_digest() -> str:
    from . import compiled

    parts = [inspect.getsource(f) for f in (compiled._block_sums, compiled.block_sums, compiled.block_sums_heads)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _machine() -> str:
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()
    return f"{platform.machine()}-{capability}"


def _names(dtypes: Sequence[torch.dtype]) -> list[str]:
    """``float32`` for ``torch.float32``: how a dtype is spelt in a file name and the build's argv."""
    return [str(d).removeprefix("torch.") for d in dtypes]


def library_path(dtypes: Sequence[torch.dtype]) -> Path:
    """Where the kernel for heads of tensors of ``dtypes`` (g, m, v[, v_den]) is kept."""
    names = _names(dtypes)
    key = [*names, str(BLOCK), str(HEADS_PER_CALL), torch.__version__, str(torch.version.git_version), _machine()]
    digest = hashlib.sha256((" ".join(key) + _source_digest()).encode()).hexdigest()[:20]
    return cache_dir() / f"block_sums-{'-'.join(names)}-{digest}.so"


class _Runner:
    """A loaded library called as the compiled function is: ``runner(*tensors, scalars)``."""

    __slots__ = ("_runner",)

    def __init__(self, path: Path):
        self._runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(path), 1)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        return self._runner.run(list(args))[0]


class _Build:
    """A child process building one library, or the mark of another process's build."""

    __slots__ = ("process", "started", "log")

    def __init__(self, path: Path, dtypes: Sequence[torch.dtype]):
        self.started, self.log = time.monotonic(), path.with_suffix(".log")
        self.process: subprocess.Popen | None = None
        mark = path.with_suffix(".building")
        try:
            if mark.exists() and time.time() - mark.stat().st_mtime < BUILD_STALE_S:
                return  # another process is building it: wait for the library to appear
            mark.write_text(str(os.getpid()))
            with open(self.log, "w") as log:
                self.process = subprocess.Popen(
                    _command(path, dtypes),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    **_OWN_PROCESS_GROUP,
                )
            _lower_priority(self.process.pid)
        except OSError as error:
            raise KernelUnavailable(f"cannot start building {path.name} in {path.parent}: {error}") from error

    def finished(self, path: Path) -> bool:
        if self.process is None:  # another process's build: done once its library is there
            if path.exists():
                return True
            mark = path.with_suffix(".building")
            if not mark.exists() or time.time() - mark.stat().st_mtime >= BUILD_STALE_S:
                raise KernelUnavailable(f"another process's build of {path.name} ended without it ({self.log})")
            return False
        code = self.process.poll()
        if code is None:
            return False
        path.with_suffix(".building").unlink(missing_ok=True)
        if code != 0 or not path.exists():
            tail = self.log.read_text(errors="replace").strip().splitlines()[-3:] if self.log.exists() else []
            raise KernelUnavailable(f"building {path.name} failed (exit code {code}; {self.log}): " + " | ".join(tail))
        self.log.unlink(missing_ok=True)
        return True

    def wait(self, path: Path) -> None:
        if self.process is not None:
            self.process.wait()
        while not self.finished(path):
            time.sleep(0.5)


# A Ctrl-C meant for training (a signal to the terminal's foreground process group) does not kill
# the build half way. A process group of its own, not a session: Linux's autogroup schedules each
# session as one unit against the others, which would void the nice level below.
if sys.platform == "win32":  # a console's Ctrl-C skips a new process group
    _OWN_PROCESS_GROUP: dict = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
elif sys.version_info >= (3, 11):
    _OWN_PROCESS_GROUP = {"process_group": 0}
else:
    _OWN_PROCESS_GROUP = {"preexec_fn": os.setpgrp}

#: The build's nice level. Until the kernel serves, every step runs the eager statistics, several
#: times slower than the kernel, so the build is not starved: at the idle policy or nice 19 a
#: training loop that keeps the cores busy delays it by minutes, each step eager meanwhile; at
#: nice 0 the build's share of the cores makes those steps several times slower still. Between
#: the two, the steps slow by less than the build's wait costs.
BUILD_NICE = 10


def _lower_priority(pid: int) -> None:
    """Set from here as soon as the child exists (its torch import has only begun); the
    compiler's processes it starts inherit it. Never above this process's own level."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, max(BUILD_NICE, os.getpriority(os.PRIO_PROCESS, 0)))
    except (AttributeError, OSError):
        pass


def _command(path: Path, dtypes: Sequence[torch.dtype]) -> list[str]:
    return [sys.executable, "-m", __name__, str(path), *_names(dtypes)]


_PATHS: dict[tuple, Path] = {}  # (dtypes, the cache's environment) -> library_path
_LOADED: dict[Path, _Runner] = {}
_BUILDS: dict[Path, _Build] = {}
_FAILED: dict[Path, str] = {}


def kernel(dtypes: Sequence[torch.dtype], *, wait: bool = False) -> Callable | None:
    """The kernel for heads of tensors of ``dtypes`` (g, m, v[, v_den]), or ``None`` while it is
    being built (``wait=True`` blocks until it is). Raises :class:`KernelUnavailable` where it
    cannot be built or loaded (the same error at every later call)."""
    where = (tuple(dtypes), os.environ.get(CACHE_ENV), os.environ.get("XDG_CACHE_HOME"))
    path = _PATHS.get(where)
    if path is None:
        path = _PATHS[where] = library_path(dtypes)
    runner = _LOADED.get(path)
    if runner is not None:
        return runner
    if path in _FAILED:
        raise KernelUnavailable(_FAILED[path])
    try:
        build = _BUILDS.get(path)
        if build is not None or not path.exists():
            if build is None:
                path.parent.mkdir(parents=True, exist_ok=True)
                build = _BUILDS[path] = _Build(path, dtypes)
                _announce(
                    f"building the statistics kernel {path.name} in a child process (once per machine and torch version, kept in {path.parent}); the eager statistics serve until it is ready"
                )
            if wait:
                build.wait(path)
            elif not build.finished(path):
                return None
        runner = _LOADED[path] = _Runner(path)
    except (OSError, RuntimeError) as error:
        _FAILED[path] = (
            str(error) if isinstance(error, KernelUnavailable) else f"{path}: {type(error).__name__}: {error}"
        )
        raise KernelUnavailable(_FAILED[path]) from error
    build = _BUILDS.pop(path, None)
    if build is not None:
        _announce(f"statistics kernel {path.name} ready after {time.monotonic() - build.started:.0f} s")
    return runner


def _announce(message: str) -> None:
    if is_rank_zero():
        print(f"adam-monitor: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- the child process
def _example(dtypes: Sequence[torch.dtype], generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Heads of distinct sizes (each its own symbol) and the scalars: the export's inputs."""
    from .compiled import _scalars

    tensors = []
    for head in range(HEADS_PER_CALL):
        n = (2 + head) * BLOCK
        g = torch.randn(n, generator=generator, dtype=torch.float64)
        values = [g, 0.1 * g, 1e-3 * g * g + torch.rand(n, generator=generator, dtype=torch.float64)]
        values += [values[2] * 1.5] * (len(dtypes) - 3)
        tensors += [x.to(dtype) for x, dtype in zip(values, dtypes)]
    compute = torch.float64 if dtypes[0] == torch.float64 else torch.float32
    return tensors + [_scalars(0.999, 1e-8, 3, compute, "cpu")]


def build(path: Path, dtypes: Sequence[torch.dtype]) -> None:
    """Export the kernel for ``dtypes``, compile it with AOTInductor, check it against the kernel
    run eagerly, and move the library into place (atomically: a reader sees all of it or none)."""
    import zipfile

    from torch.export import Dim

    from .compiled import block_sums_heads

    class Heads(torch.nn.Module):
        def forward(self, *args):
            return block_sums_heads(*args)

    example = _example(dtypes)
    shapes = [{0: BLOCK * Dim(f"blocks{i}", min=2, max=1 << 40)} for i in range(len(example) - 1)] + [None]
    program = torch.export.export(Heads(), tuple(example), dynamic_shapes=(tuple(shapes),))
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        package = torch._inductor.aoti_compile_and_package(program, package_path=os.path.join(work, "kernel.pt2"))
        with zipfile.ZipFile(package) as archive:
            (member,) = [name for name in archive.namelist() if name.endswith(".so")]
            staged = Path(work) / "kernel.so"
            staged.write_bytes(archive.read(member))
        checked = _Runner(staged)
        probe = _example(dtypes, torch.Generator().manual_seed(0))
        expected, got = block_sums_heads(*probe), checked(*probe)
        tolerance = 1e-12 if dtypes[0] == torch.float64 else 1e-5
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=0)
        os.replace(staged, path)


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build one statistics kernel ahead of time.")
    parser.add_argument("path", type=Path)
    parser.add_argument("dtypes", nargs="+")
    args = parser.parse_args(argv)
    try:
        build(args.path, [getattr(torch, name) for name in args.dtypes])
    finally:
        args.path.with_suffix(".building").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
