"""What the monitor costs the host: per optimizer step, per log point, and at log_every_n_steps=1.

Run as ``python tests/benchmarks/bench_host.py [--quick] [--rounds 15] [--threads 1] [--profile]``;
one torch thread unless ``--threads`` says otherwise (``0``: torch's choice): kernels on tensors
this small gain nothing from more, and on a loaded machine each one's OpenMP spin-wait would
dwarf the host costs this measures.
Every model is ``N`` float32 tensors of 256 elements (the per-tensor costs dominate: a tensor's
statistics cost far less than the Python and dispatch around them). Variants are timed side by
side in one process, alternating round by round so machine noise hits them alike; each figure is
the median over rounds (of the per-round differences where a difference is reported).

(a) an optimizer step with and without the monitor (torch fused AdamW, foreach AdamW), no log
    point among the timed steps: the added µs per step at each N, and a least-squares fit
    "fixed µs + µs per tensor".
(b) one log point (``Monitor.flush``) into a ``SummaryWriter`` in a temporary folder, with
    ``per_parameter`` on and off: µs per log point and per tensor.
(c) the monitor's cost per step at ``log_every_n_steps=1`` against the default (50), both with
    per-parameter scalars into a ``SummaryWriter``.
(d) the scalars of one log point written with one ``add_scalar`` per tag (as before
    ``write_scalars``) and with ``write_scalars`` (one event), at about 300 and 1,200 tags: the
    writes alone, and whole log points.
(e) the preconditioned sharpness (``sharpness_every``): a sampled step against an unsampled one,
    as a multiple of the fused step, and what sampling every 500 steps adds to a step on average.
``--profile``: cProfile of one optimizer step with the monitor attached and of one log point
(300 tensors, fused AdamW), the top 25 functions by cumulative and by own time; of 7 profiled
calls, the one of median total time.

Which statistics path is measured is printed first: the default a user gets (no environment
variable set). Tensors below ``MIN_COMPILED_NUMEL`` elements never go through the compiled loop,
so at 256 elements each the default is the eager batched ``adam_statistics`` path, whatever
``ADAM_MONITOR_EAGER`` says.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from adam_monitor import Monitor  # noqa: E402
from adam_monitor._runtime import EAGER_ENV, MIN_COMPILED_NUMEL  # noqa: E402
from adam_monitor.diagnostics.compiled import compiled_available  # noqa: E402
from adam_monitor.engine.tensorboard import write_scalars  # noqa: E402

NUMEL = 256
COUNTS = (10, 30, 100, 300, 1000)
#: Never a log point among the timed steps of (a).
NEVER = 10**9
GOAL_STEP = "≤ 300 µs fixed + ≤ 3 µs per tensor per step"
GOAL_LOG_POINT = "≤ 20 µs per tensor per log point"
GOAL_EVERY_STEP = "log_every_n_steps=1 ≤ 2× default"
OPTIMIZERS = {
    "fused AdamW": lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, fused=True),
    "foreach AdamW": lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, foreach=True),
}


def make_params(count: int) -> dict[str, torch.nn.Parameter]:
    """``count`` named tensors of ``NUMEL`` elements with fixed gradients, named like a model's."""
    torch.manual_seed(0)
    params = {}
    for i in range(count):
        p = torch.nn.Parameter(torch.randn(NUMEL) * 0.02)
        p.grad = torch.randn_like(p)
        params[f"blocks.{i // 8}.layer{i % 8}.weight"] = p
    return params


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def interleaved(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each variant's samples, the variants alternating within a round and their order reversed
    every other round (what runs right after what differs in cache and scheduler state)."""
    samples: dict[str, list[float]] = {k: [] for k in variants}
    keys = list(variants)
    for r in range(rounds):
        for key in keys if r % 2 == 0 else keys[::-1]:
            samples[key].append(variants[key]())
    return samples


def median_difference(a: list[float], b: list[float]) -> float:
    return statistics.median(x - y for x, y in zip(a, b))


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares ``y = fixed + per_x · x``: ``(fixed, per_x)``."""
    n, mx, my = len(xs), statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    per_x = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if n > 1 and sxx else 0.0
    return my - per_x * mx, per_x


def monitored(make_opt, params, **options) -> tuple[torch.optim.Optimizer, Monitor]:
    opt = make_opt(list(params.values()))
    return opt, Monitor(opt, named_parameters=params, **options)


def describe_path() -> str:
    compiled = compiled_available()
    small = NUMEL < MIN_COMPILED_NUMEL
    path = "eager batched adam_statistics (foreach / flat buffer)" if small or not compiled else "compiled block sums"
    env = os.environ.get(EAGER_ENV)
    return (
        f"statistics path measured: {path}; {EAGER_ENV}={env!r}, compiled path available: {compiled}, "
        f"tensors of {NUMEL} < MIN_COMPILED_NUMEL={MIN_COMPILED_NUMEL} elements: {small}"
    )


# ---------------------------------------------------------------------------------------- (a)
def bench_step(counts, rounds: int, steps: int) -> None:
    print(f"\n(a) host time per optimizer step, no log point; median of {rounds} interleaved rounds of {steps} steps")
    print(f"    goal: {GOAL_STEP}")
    for label, make_opt in OPTIMIZERS.items():
        print(f"    {label}")
        print(f"    {'tensors':>9s}{'step µs':>11s}{'+ monitor µs':>14s}{'added µs':>11s}{'added/tensor':>14s}")
        added = []
        for count in counts:
            params = make_params(count)
            plain = make_opt(list(params.values()))
            hooked, monitor = monitored(make_opt, params, log_every_n_steps=NEVER)
            for _ in range(3):  # state allocation, first-call paths
                plain.step()
                hooked.step()
            samples = interleaved(
                {"plain": partial(per_call_us, plain.step, steps), "hooked": partial(per_call_us, hooked.step, steps)},
                rounds,
            )
            monitor.close()
            base, with_monitor = statistics.median(samples["plain"]), statistics.median(samples["hooked"])
            extra = median_difference(samples["hooked"], samples["plain"])
            added.append(extra)
            print(f"    {count:9d}{base:11.1f}{with_monitor:14.1f}{extra:11.1f}{extra / count:14.2f}")
        fixed, per_tensor = fit_line(list(counts), added)
        print(f"    fit: {fixed:.0f} µs fixed + {per_tensor:.2f} µs per tensor per step   (goal: {GOAL_STEP})")


# ---------------------------------------------------------------------------------------- (b)
def log_point_us(monitor: Monitor, opt: torch.optim.Optimizer, step: list[int], drained: list[float] | None = None):
    """A sample: one step (untimed, so the log point has something to pool), then one timed flush;
    its µs. With ``drained``, the writer is flushed too and the µs to its end are appended there:
    the event file's thread serialises, checksums and writes what ``flush`` handed it while
    holding the GIL, a cost ``flush`` returns before."""

    def sample() -> float:
        opt.step()
        step[0] += 1
        start = time.perf_counter()
        monitor.flush(step[0])
        returned = time.perf_counter()
        if drained is not None:
            monitor.writer.flush()
            drained.append((time.perf_counter() - start) * 1e6)
        return (returned - start) * 1e6

    return sample


def bench_log_point(counts, rounds: int, root: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    print(
        f"\n(b) one log point (Monitor.flush) into a SummaryWriter, fused AdamW, per_parameter on and off "
        f"interleaved; median of {rounds} rounds; 'drained': until the writer's thread has written it"
    )
    print(f"    goal: {GOAL_LOG_POINT}")
    print(
        f"    {'tensors':>9s}{'per_parameter':>15s}{'tags':>7s}{'µs':>9s}{'µs/tensor':>11s}{'drained µs':>12s}{'/tensor':>9s}"
    )
    totals: dict[bool, list[float]] = {True: [], False: []}
    for count in counts:
        runs, samples, drained = {}, {}, {}
        for per_parameter in (True, False):
            params = make_params(count)
            writer = SummaryWriter(tempfile.mkdtemp(dir=root))
            opt, monitor = monitored(
                OPTIMIZERS["fused AdamW"], params, writer=writer, log_every_n_steps=NEVER, per_parameter=per_parameter
            )
            runs[per_parameter] = (opt, monitor, [0])
            drained[per_parameter] = []
            samples[per_parameter] = log_point_us(monitor, opt, runs[per_parameter][2], drained[per_parameter])
            samples[per_parameter]()  # the first log point also writes the custom-scalars layout
            drained[per_parameter].clear()
        measured = interleaved(samples, rounds)
        for per_parameter, (opt, monitor, step) in runs.items():
            tags = written_tags(monitor, opt, step)
            writer = monitor.writer
            monitor.close()
            writer.close()
            us, full = statistics.median(measured[per_parameter]), statistics.median(drained[per_parameter])
            totals[per_parameter].append(full)
            print(
                f"    {count:9d}{per_parameter!s:>15s}{tags:7d}{us:9.0f}{us / count:11.1f}{full:12.0f}{full / count:9.1f}"
            )
    for per_parameter, drained_us in totals.items():
        fixed, per_tensor = fit_line(list(counts), drained_us)
        print(
            f"    per_parameter={per_parameter!s:5s} fit, drained: {fixed:.0f} µs + {per_tensor:.1f} µs per tensor"
            f"   (goal: {GOAL_LOG_POINT})"
        )


def written_tags(monitor: Monitor, opt: torch.optim.Optimizer, step: list[int]) -> int:
    """The number of scalars one more log point writes."""
    opt.step()
    step[0] += 1
    return len(monitor.flush(step[0]))


# ---------------------------------------------------------------------------------------- (c)
def bench_every_step(counts, rounds: int, root: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    steps = 50  # one sample: one log point at the default
    print(
        f"\n(c) the monitor's cost per step at log_every_n_steps=1 vs the default 50, per-parameter scalars to a "
        f"SummaryWriter, fused AdamW; samples of {steps} steps, median of {rounds} interleaved rounds"
    )
    print(f"    goal: {GOAL_EVERY_STEP}")
    print(f"    {'tensors':>9s}{'step µs':>10s}{'+ every 50':>12s}{'+ every 1':>11s}{'ratio':>8s}")
    for count in counts:
        params = make_params(count)
        plain = OPTIMIZERS["fused AdamW"](list(params.values()))
        runs = {}
        for every in (50, 1):
            writer = SummaryWriter(tempfile.mkdtemp(dir=root))
            runs[every] = (
                writer,
                *monitored(OPTIMIZERS["fused AdamW"], params, writer=writer, log_every_n_steps=every),
            )
        for _ in range(steps):  # past the first log points (layout, first tables)
            plain.step()
            runs[50][1].step()
            runs[1][1].step()
        samples = interleaved(
            {
                "plain": partial(per_call_us, plain.step, steps),
                "every 50": partial(per_call_us, runs[50][1].step, steps),
                "every 1": partial(per_call_us, runs[1][1].step, steps),
            },
            rounds,
        )
        for writer, _, monitor in runs.values():
            monitor.close()
            writer.close()
        at_50 = median_difference(samples["every 50"], samples["plain"])
        at_1 = median_difference(samples["every 1"], samples["plain"])
        base = statistics.median(samples["plain"])
        print(f"    {count:9d}{base:10.1f}{at_50:12.1f}{at_1:11.1f}{at_1 / at_50:8.1f}")


# ---------------------------------------------------------------------------------------- (d)
def per_tag_add_scalar(writer, metrics: dict[str, float], step: int) -> None:
    """How the scalars were written before ``write_scalars``."""
    for tag, value in metrics.items():
        writer.add_scalar(tag, value, step)


def write_ms(write, writer, metrics: dict[str, float], step: list[int]) -> float:
    step[0] += 1
    start = time.perf_counter()
    write(writer, metrics, step[0])
    return (time.perf_counter() - start) * 1e3


def bench_before_after(rounds: int, root: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    print(f"\n(d) a log point's scalars: one add_scalar per tag (before) vs write_scalars (after); median of {rounds}")
    print(f"    {'':34s}{'tags':>6s}{'before ms':>11s}{'after ms':>10s}{'× faster':>10s}")
    for tags in (300, 1200):
        metrics = {
            f"adam_per_parameter/update_rms/blocks.{i // 8}.layer{i % 8}.weight": 1e-3 * (i + 1) for i in range(tags)
        }
        writers = {k: SummaryWriter(tempfile.mkdtemp(dir=root)) for k in ("before", "after")}
        write = {"before": per_tag_add_scalar, "after": write_scalars}
        step = [0]
        samples = interleaved({k: partial(write_ms, write[k], writers[k], metrics, step) for k in write}, rounds)
        for w in writers.values():
            w.close()
        before, after = statistics.median(samples["before"]), statistics.median(samples["after"])
        print(f"    {'the writes alone':34s}{tags:6d}{before:11.2f}{after:10.2f}{before / after:10.1f}")
    for count in (74, 299):  # 4 tags per tensor and 10 more: about 300 and 1,200 tags
        runs, samples, drained = {}, {}, {}
        for key in ("before", "after"):
            params = make_params(count)
            writer = SummaryWriter(tempfile.mkdtemp(dir=root))
            opt, monitor = monitored(OPTIMIZERS["fused AdamW"], params, writer=writer, log_every_n_steps=NEVER)
            if key == "before":
                sink = monitor._sink  # private: the bench swaps in the old per-tag writes
                sink._scalars = lambda metrics, x, w=writer: per_tag_add_scalar(w, metrics, x)
            runs[key], drained[key] = (opt, monitor, [0]), []
            samples[key] = log_point_us(monitor, opt, runs[key][2], drained[key])
            samples[key]()  # layout
            drained[key].clear()
        measured = interleaved(samples, rounds)
        opt, monitor, step = runs["after"]
        tags = written_tags(monitor, opt, step)
        for _, monitor, _ in runs.values():
            writer = monitor.writer
            monitor.close()
            writer.close()
        for label, figures in (("whole log point", measured), ("  the same, writer drained", drained)):
            before, after = statistics.median(figures["before"]) / 1e3, statistics.median(figures["after"]) / 1e3
            label = f"{label}, {count} tensors" if figures is measured else label
            print(f"    {label:34s}{tags:6d}{before:11.2f}{after:10.2f}{before / after:10.1f}")
    crc_cost()


# ---------------------------------------------------------------------------------------- (e)
def bench_sharpness(counts, rounds: int, steps: int) -> None:
    """A step on which the preconditioned sharpness is sampled (``sharpness_every=1``: every step)
    against one on which it is not, as a multiple of the fused AdamW step itself."""
    print(
        f"\n(e) a sharpness-sampled step (sharpness_every=1) vs an unsampled one, fused AdamW; median of {rounds} rounds"
    )
    print(
        f"    {'tensors':>9s}{'elements':>10s}{'step µs':>11s}{'sampling µs':>13s}{'× step':>8s}{'every 500: % of a step':>25s}"
    )
    make_opt = OPTIMIZERS["fused AdamW"]
    for count, numel in counts:
        torch.manual_seed(0)
        params = {f"blocks.{i}.weight": torch.nn.Parameter(torch.randn(numel) * 0.02) for i in range(count)}
        for p in params.values():
            p.grad = torch.randn_like(p)
        plain = make_opt(list(params.values()))
        off, off_monitor = monitored(make_opt, params, log_every_n_steps=NEVER)
        on, on_monitor = monitored(make_opt, params, log_every_n_steps=NEVER, sharpness_every=1)
        for opt in (plain, off, on):
            for _ in range(3):
                opt.step()
        samples = interleaved(
            {k: partial(per_call_us, o.step, steps) for k, o in (("plain", plain), ("off", off), ("on", on))}, rounds
        )
        step, added = statistics.median(samples["plain"]), median_difference(samples["on"], samples["off"])
        print(
            f"    {count:>9d}{numel:>10d}{step:>11.1f}{added:>13.1f}{added / step:>8.2f}{200 * added / 500 / step:>25.2f}"
        )
        off_monitor.close()
        on_monitor.close()


def crc_cost() -> None:
    """The checksum of the event of a 1,200-tag log point: tensorboard's pure-Python CRC32C against
    the one the record writer uses now (``fast_record_checksums``: google-crc32c's C code)."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as pure_python
    from tensorboard.summary.writer import record_writer

    summary = Summary()
    for i in range(1200):
        summary.value.add(
            tag=f"adam_per_parameter/update_rms/blocks.{i // 8}.layer{i % 8}.weight", simple_value=1e-3 * i
        )
    data = Event(step=1, wall_time=time.time(), summary=summary).SerializeToString()
    for label, crc in (("pure Python", pure_python), ("in use", record_writer.masked_crc32c)):
        us = statistics.median(per_call_us(lambda crc=crc: crc(data), 1) for _ in range(5))
        print(
            f"    the event's CRC32C, {label} ({crc.__module__}): {us / 1e3:.2f} ms "
            f"for the {len(data) / 1024:.0f} KiB event of 1,200 tags ({us / len(data) * 1e3:.1f} ns per byte)"
        )


# ---------------------------------------------------------------------------------------- profiles
def print_profile(stats: pstats.Stats, title: str, top: int = 25) -> None:
    """The ``top`` functions by cumulative and by own time, in µs (pstats prints whole ms)."""
    rows = []
    for (path, line, name), (_, ncalls, tottime, cumtime, _) in stats.stats.items():
        where = f"{Path(path).name}:{line}({name})" if line else name  # line 0: a built-in
        rows.append((ncalls, tottime * 1e6, cumtime * 1e6, where))
    print(f"\n--- {title}: {stats.total_calls} calls, {stats.total_tt * 1e6:.0f} µs under the profiler")
    for key, label in ((2, "cumulative"), (1, "own time (tottime)")):
        print(f"    sorted by {label}\n    {'ncalls':>7s}{'own µs':>9s}{'cum µs':>9s}  function")
        for ncalls, own, cum, where in sorted(rows, key=lambda r: -r[key])[:top]:
            print(f"    {ncalls:7d}{own:9.0f}{cum:9.0f}  {where}")


def median_profile(fn: Callable[[], object], repeats: int) -> pstats.Stats:
    """The profile of one call of ``fn``, the one of median total time among ``repeats``: on a
    busy machine a single call may be the one the scheduler interrupted."""
    profiles = []
    for _ in range(repeats):
        profile = cProfile.Profile()
        profile.runcall(fn)
        profiles.append(pstats.Stats(profile))
    return sorted(profiles, key=lambda p: p.total_tt)[repeats // 2]


def profile(count: int, root: str, repeats: int = 7) -> None:
    from torch.utils.tensorboard import SummaryWriter

    params = make_params(count)
    writer = SummaryWriter(tempfile.mkdtemp(dir=root))
    opt, monitor = monitored(OPTIMIZERS["fused AdamW"], params, writer=writer, log_every_n_steps=NEVER)
    step = [0]
    log_point_us(monitor, opt, step)()  # the first log point's layout and table are not what later ones cost
    print_profile(median_profile(opt.step, repeats), f"one fused AdamW step of {count} tensors, monitor attached")

    def log_point() -> None:
        monitor.flush(step[0])

    stats = []
    for _ in range(repeats):  # a step before each log point, unprofiled, so each has a step to pool
        opt.step()
        step[0] += 1
        stats.append(median_profile(log_point, 1))
    median = sorted(stats, key=lambda p: p.total_tt)[repeats // 2]
    print_profile(median, f"one log point of {count} tensors, per_parameter=True, into a SummaryWriter")
    monitor.close()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (about half a minute)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a busy machine OpenMP's spin-waits swamp the host costs measured; 0: torch's choice)",
    )
    parser.add_argument("--only", default="abcde", help="which parts to run, e.g. 'ab'")
    parser.add_argument("--profile", action="store_true", help="also print the cProfile of a step and a log point")
    parser.add_argument("--profile-tensors", type=int, default=300)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # alerts on random gradients are not what is measured
    rounds = args.rounds or (5 if args.quick else 15)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    print(describe_path())
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        if "a" in args.only:
            bench_step((10, 100, 300) if args.quick else COUNTS, rounds, steps=5 if args.quick else 30)
        if "b" in args.only:
            bench_log_point((30, 300) if args.quick else (10, 100, 300, 1000), rounds, root)
        if "c" in args.only:
            bench_every_step((100,) if args.quick else (30, 300, 1000), 3 if args.quick else 7, root)
        if "d" in args.only:
            bench_before_after(3 if args.quick else rounds, root)
        if "e" in args.only:
            bench_sharpness(((300, NUMEL), (16, 1 << 18)), 3 if args.quick else rounds, steps=3 if args.quick else 10)
        if args.profile:
            profile(args.profile_tensors, root)
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
