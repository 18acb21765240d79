"""What ``AdamDiagnostics`` (the torchmetrics Metric) costs beside the engine's own ``Monitor``.

Run as ``python tests/benchmarks/bench_torchmetrics.py [--rounds 9] [--steps 40]``; one torch thread.
Every model is ``N`` float32 tensors of 256 elements with fixed gradients, stepped by a torch fused
AdamW. Variants are timed side by side in one process, alternating round by round (the order
reversed every other round) so machine noise hits them alike; each figure is the median over rounds.

(a) host µs per optimizer step: the step alone, with a ``Monitor`` (no log point among the timed
    steps), with ``AdamDiagnostics().attach(opt)`` and with ``AdamDiagnostics(per_parameter=True)``;
    the ratio of each to the step alone.
(b) one read-out: ``Monitor.compute()`` (per-parameter tags) against ``AdamDiagnostics.compute()``
    pooled and per parameter, each after one step, µs per call (no sync: one process).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench_host import make_params, per_call_us  # noqa: E402  (this folder: the same tensors and timer)

from adam_monitor import Monitor  # noqa: E402
from adam_monitor.metrics import AdamDiagnostics  # noqa: E402

COUNTS = (10, 100, 300)
NEVER = 10**9  # no log point among the timed steps


def fused_adamw(params: dict[str, torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(list(params.values()), lr=1e-3, weight_decay=0.1, fused=True)


def interleaved(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """The median sample of each variant, the variants alternating within a round."""
    samples: dict[str, list[float]] = {k: [] for k in variants}
    keys = list(variants)
    for r in range(rounds):
        for key in keys if r % 2 == 0 else keys[::-1]:
            samples[key].append(variants[key]())
    return {k: statistics.median(v) for k, v in samples.items()}


def variants(count: int) -> tuple[dict[str, tuple[torch.optim.Optimizer, object]], list]:
    """One optimizer per variant over its own copy of the parameters, so no two hooks share a step."""
    built, cleanup = {}, []
    opt = fused_adamw(make_params(count))
    built["step alone"] = (opt, None)
    params = make_params(count)
    opt = fused_adamw(params)
    monitor = Monitor(opt, named_parameters=params, log_every_n_steps=NEVER)
    built["+ Monitor"] = (opt, monitor)
    cleanup.append(monitor.close)
    opt = fused_adamw(make_params(count))
    metric = AdamDiagnostics()
    cleanup.append(metric.attach(opt).remove)
    built["+ AdamDiagnostics"] = (opt, metric)
    params = make_params(count)
    opt = fused_adamw(params)
    metric = AdamDiagnostics(per_parameter=True, names=list(params))
    cleanup.append(metric.attach(opt).remove)
    built["+ AdamDiagnostics per-parameter"] = (opt, metric)
    for opt, _ in built.values():
        for _ in range(3):  # state allocation, first-call paths
            opt.step()
    return built, cleanup


def bench_step(rounds: int, steps: int) -> None:
    print(f"(a) host µs per fused AdamW step; median of {rounds} interleaved rounds of {steps} steps")
    names = ["step alone", "+ Monitor", "+ AdamDiagnostics", "+ AdamDiagnostics per-parameter"]
    print(f"    {'tensors':>8s}" + "".join(f"{n:>34s}" for n in names))
    for count in COUNTS:
        built, cleanup = variants(count)
        medians = interleaved({k: partial(per_call_us, opt.step, steps) for k, (opt, _) in built.items()}, rounds)
        base = medians["step alone"]
        cells = [f"{medians[n]:9.1f} µs ({medians[n] / base:5.2f}×)" for n in names]
        print(f"    {count:8d}" + "".join(f"{c:>34s}" for c in cells))
        for done in cleanup:
            done()


def bench_compute(rounds: int) -> None:
    print(f"\n(b) µs per read-out after one step; median of {rounds} interleaved rounds")
    print(f"    {'tensors':>8s}{'Monitor.compute':>18s}{'Metric pooled':>16s}{'Metric per-parameter':>22s}")
    for count in COUNTS:
        built, cleanup = variants(count)
        monitor = built["+ Monitor"][1]
        pooled, per_parameter = built["+ AdamDiagnostics"][1], built["+ AdamDiagnostics per-parameter"][1]

        def after_step(key: str, read: Callable[[], object], built=built) -> Callable[[], float]:
            def sample() -> float:
                built[key][0].step()  # untimed: each read-out has a fresh step to pool
                start = time.perf_counter()
                read()
                return (time.perf_counter() - start) * 1e6

            return sample

        medians = interleaved(
            {
                "monitor": after_step("+ Monitor", monitor.compute),
                "pooled": after_step("+ AdamDiagnostics", pooled.compute),
                "per_parameter": after_step("+ AdamDiagnostics per-parameter", per_parameter.compute),
            },
            rounds,
        )
        print(f"    {count:8d}{medians['monitor']:18.1f}{medians['pooled']:16.1f}{medians['per_parameter']:22.1f}")
        for done in cleanup:
            done()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
    bench_step(args.rounds, args.steps)
    bench_compute(args.rounds)


if __name__ == "__main__":
    main()
