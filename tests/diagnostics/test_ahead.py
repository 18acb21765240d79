"""The statistics kernel built ahead of time: its cache, its build in a child process, and what a
step does while it is being built or when it cannot be."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from reference import specification
from support import no_warnings
from test_compiled_statistics import adam_state, assert_rows_close

import adam_monitor.diagnostics.ahead as ahead
import adam_monitor.diagnostics.compiled as kernels
from adam_monitor.diagnostics import adam_statistics
from adam_monitor.diagnostics.compiled import BLOCK, fast_adam_statistics

FLOAT32 = (torch.float32,) * 3

pytestmark = pytest.mark.skipif(not ahead.available(torch.device("cpu")), reason="no AOTInductor runner")


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """An empty cache, small shapes compiled, and no earlier build or failure of this process."""
    monkeypatch.setenv(ahead.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(ahead.AHEAD_ENV, raising=False)
    monkeypatch.delenv(kernels.EAGER_ENV, raising=False)
    monkeypatch.setattr(kernels, "MIN_COMPILED_NUMEL", 2 * BLOCK)
    monkeypatch.setattr(kernels, "_disabled_reason", None)
    for table in ("_PATHS", "_LOADED", "_BUILDS", "_FAILED"):
        monkeypatch.setattr(ahead, table, {})
    monkeypatch.setattr(kernels, "_WARNED", set())
    return tmp_path


def fake_build(monkeypatch, script: str):
    """Builds run ``script`` (Python, with ``path`` the library to write) instead of the compiler."""
    code = "import sys, time; from pathlib import Path; path = Path(sys.argv[1])\n" + textwrap.dedent(script)
    monkeypatch.setattr(ahead, "_command", lambda path, dtypes: [sys.executable, "-c", code, str(path)])


def wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_the_cache_key_holds_dtypes_machine_and_kernel_source(cache, monkeypatch):
    path = ahead.library_path(FLOAT32)
    assert path.parent == cache and path.suffix == ".so" and "float32" in path.name
    assert ahead.library_path((torch.bfloat16,) * 3) != path
    assert ahead.library_path(FLOAT32 + (torch.float32,)) != path  # amsgrad's fourth tensor
    monkeypatch.setattr(ahead, "_machine", lambda: "x86_64-another-vector-extension")
    assert ahead.library_path(FLOAT32) != path
    monkeypatch.undo()
    monkeypatch.setenv(ahead.CACHE_ENV, str(cache))
    monkeypatch.setattr(ahead, "_source_digest", lambda: "an edited kernel")
    assert ahead.library_path(FLOAT32) != path


def test_an_unwritable_cache_falls_back_to_the_temporary_folder(monkeypatch, tmp_path):
    monkeypatch.delenv(ahead.CACHE_ENV, raising=False)
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    assert ahead.cache_dir().parent == Path(__import__("tempfile").gettempdir())


def test_steps_take_the_eager_rows_while_the_kernel_is_built(cache, monkeypatch):
    release = cache / "release"
    fake_build(monkeypatch, f"while not Path({str(release)!r}).exists(): time.sleep(0.02)\nsys.exit(0)")
    monkeypatch.setattr(kernels, "_compiled", lambda amsgrad, dtype: pytest.fail("compiled in the training process"))
    lists, kw = adam_state(torch.float32, steps=3)
    eager = fast_adam_statistics(*lists, **kw, compiled=False)
    for _ in range(3):  # no step waits for the build
        assert_rows_close(fast_adam_statistics(*lists, **kw), eager, 0)
    (build,) = ahead._BUILDS.values()
    assert build.process.poll() is None
    # At a lower priority, in this process's session (where Linux's autogroup weighs the two).
    nice = max(ahead.BUILD_NICE, os.getpriority(os.PRIO_PROCESS, 0))
    assert os.getpriority(os.PRIO_PROCESS, build.process.pid) == nice
    assert os.getsid(build.process.pid) == os.getsid(0) and os.getpgid(build.process.pid) != os.getpgid(0)
    release.touch()
    build.process.wait(timeout=30)
    # The build exited without a library: one warning, then the kernel compiled in this process.
    monkeypatch.setattr(kernels, "_compiled", lambda amsgrad, dtype: kernels.block_sums_heads)
    with pytest.warns(RuntimeWarning, match="exit code 0"):
        rows = fast_adam_statistics(*lists, **kw)
    assert_rows_close(rows, specification(lists, kw), 2e-6)
    with no_warnings():
        fast_adam_statistics(*lists, **kw)
    with pytest.raises(ahead.KernelUnavailable, match="exit code 0"):
        fast_adam_statistics(*lists, **kw, compiled=True)


def test_a_failed_build_names_its_log_and_its_last_words(cache, monkeypatch):
    fake_build(monkeypatch, "print('error: no C++ compiler found', flush=True); sys.exit(3)")
    with pytest.raises(ahead.KernelUnavailable, match=r"exit code 3.*\.log.*no C\+\+ compiler") as error:
        ahead.kernel(FLOAT32, wait=True)
    log = Path(str(error.value).split("; ")[1].split(")")[0])
    assert log.exists() and log.parent == cache
    assert not ahead.library_path(FLOAT32).with_suffix(".building").exists()
    with pytest.raises(ahead.KernelUnavailable, match="exit code 3"):  # remembered, not rebuilt
        ahead.kernel(FLOAT32)


def test_a_build_by_another_process_is_waited_for_not_repeated(cache, monkeypatch):
    fake_build(monkeypatch, "sys.exit('a second build started')")
    path = ahead.library_path(FLOAT32)
    mark = path.with_suffix(".building")
    mark.write_text("12345")
    assert ahead.kernel(FLOAT32) is None and ahead._BUILDS[path].process is None
    mark.unlink()  # it ended without a library
    with pytest.raises(ahead.KernelUnavailable, match="another process"):
        ahead.kernel(FLOAT32)


def test_a_stale_mark_does_not_hold_a_build_back(cache, monkeypatch):
    fake_build(monkeypatch, "sys.exit(5)")
    mark = ahead.library_path(FLOAT32).with_suffix(".building")
    mark.write_text("12345")
    old = time.time() - 2 * ahead.BUILD_STALE_S
    os.utime(mark, (old, old))
    with pytest.raises(ahead.KernelUnavailable, match="exit code 5"):
        ahead.kernel(FLOAT32, wait=True)


def test_a_library_that_does_not_load_is_reported(cache):
    ahead.library_path(FLOAT32).write_bytes(b"not a shared library")
    with pytest.raises(ahead.KernelUnavailable, match="block_sums"):
        ahead.kernel(FLOAT32)


def test_the_built_kernel_matches_the_specification(monkeypatch):
    # The real build, into the default cache (built once per machine, kept between runs).
    monkeypatch.setattr(kernels, "MIN_COMPILED_NUMEL", 2 * BLOCK)
    monkeypatch.delenv(ahead.AHEAD_ENV, raising=False)
    monkeypatch.setattr(kernels, "_compiled", lambda amsgrad, dtype: pytest.fail("compiled in the training process"))
    for steps, eps in ((1, 1e-8), (4, 1e-8), (5, 0.0)):
        lists, kw = adam_state(torch.float32, steps=steps, eps=eps)
        fast = fast_adam_statistics(*lists, **kw, compiled=True)
        assert_rows_close(fast, specification(lists, kw), 2e-6)
        assert_rows_close(fast, adam_statistics(*lists, **kw), 2e-5)
    # Views at odd offsets (a flat parameter's slice): the kernel assumes no alignment.
    n = 70 * BLOCK + 3
    g, m, v = torch.randn(n + 1)[1:], (0.1 * torch.randn(n + 3))[3:], (torch.randn(n + 5) ** 2 + 0.1)[5:]
    assert [t.storage_offset() for t in (g, m, v)] == [1, 3, 5]
    lists, kw = ([g], [m], [v]), dict(beta1=0.9, beta2=0.999, eps=1e-8, step=4)
    assert_rows_close(fast_adam_statistics(*lists, **kw, compiled=True), specification(lists, kw), 2e-6)
    assert ahead.library_path(FLOAT32) in ahead._LOADED


COLD_START = """
import sys, time, torch
import adam_monitor.diagnostics.ahead as ahead
from adam_monitor import Monitor

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(512, 256), torch.nn.Tanh(), torch.nn.Linear(256, 1))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
monitor = Monitor(optimizer, named_parameters=model.named_parameters(), log_dir=sys.argv[1])
x = torch.randn(64, 512)
first = None
for step in range(100000):
    optimizer.zero_grad()
    model(x).square().mean().backward()
    start = time.perf_counter()
    optimizer.step()
    first = first or time.perf_counter() - start
    if ahead._LOADED and step % 10 == 9:
        break
monitor.close()
from torch._dynamo.utils import counters  # torch's optimizers import dynamo: did it compile anything?

print(first, step, counters["stats"]["unique_graphs"])
"""


@pytest.mark.slow
def test_a_cold_start_builds_in_the_background_and_compiles_nothing_in_process(tmp_path):
    env = {**os.environ, ahead.CACHE_ENV: str(tmp_path / "cache")}
    env.pop(kernels.EAGER_ENV, None)
    env.pop(ahead.AHEAD_ENV, None)
    out = subprocess.run(
        [sys.executable, "-c", COLD_START, str(tmp_path / "logs")], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    first, steps, graphs = out.stdout.split()
    assert int(steps) > 10  # the run went on while the kernel was built
    assert int(graphs) == 0  # nothing compiled in the training process
    assert "building the statistics kernel" in out.stderr and "ready after" in out.stderr
    assert list((tmp_path / "cache").glob("block_sums-float32-float32-float32-*.so"))
    assert not list((tmp_path / "cache").glob("*.log")) and not list((tmp_path / "cache").glob("*.building"))
