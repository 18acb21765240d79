"""What monitoring costs: per-step statistics against a fused AdamW step, training overhead, memory.

Run as ``python tests/benchmarks/bench_monitor.py [--quick] [--rounds 7] [--device cuda --repeat 10]``; threads
are torch's default unless ``--threads`` is given; ``--device`` moves (a) and (d) to that device. Variants are interleaved round by round, so machine noise
hits them alike, and the median over rounds is reported.

(a) about 20M float32 parameters in about 50 transformer-shaped tensors: a torch fused AdamW step,
    and what each way of computing the statistics adds to it: the eager foreach
    ``adam_statistics``, ``fast_adam_statistics``, and the whole ``Monitor`` post-step hook
    (``StepReader`` + ``AlertRules`` + accumulation) with eager and with compiled statistics.
    The floor is about 3/7 of the step in memory traffic (the statistics read g, m, v; the step reads
    p, g, m, v and writes p, m, v); the row "reading g, m, v once" measures it on the machine at hand.
    On CUDA, ``--load-ms L`` queues L ms of matrix products before each step, as a training step's
    forward and backward passes would: the monitor's host work then overlaps the device's, and what
    it adds is its device time (without a load a small model's step times the host alone).
(b) ``AdamMonitor()`` with default settings on ``examples/quickstart.py``: Lightning step time with
    and without the callback.
(c) peak and resident memory of (a) with and without the monitor, in fresh processes, and whether
    the resident size grows with the step count.
(d) ``adam_monitor.optim.Adam`` with ``record_statistics`` on and off, if it exists.
(e) time to the first step, in fresh processes: the monitor with its statistics kernel on disk,
    with an empty kernel cache (built in a child process meanwhile: how long the first step takes,
    how long until the kernel serves, and how many steps ran before), and compiled in the training
    process as ``torch.compile`` does (``ADAM_MONITOR_AHEAD_OF_TIME=0``), with inductor's cache warm
    and empty.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

from shapes import transformer_shapes  # noqa: E402  (run as a script, this folder is on sys.path)

from adam_monitor import Monitor  # noqa: E402
from adam_monitor.diagnostics import adam_statistics, ahead  # noqa: E402
from adam_monitor.diagnostics.ahead import AHEAD_ENV, CACHE_ENV  # noqa: E402
from adam_monitor.diagnostics.compiled import fast_adam_statistics  # noqa: E402
from adam_monitor.engine import reader as state_module  # noqa: E402

DEVICE = torch.device("cpu")  # of (a) and (d): --device
REPEAT = 1  # calls per timed sample: --repeat


def sync() -> None:
    """A step is timed to its end: on CUDA the host waits for the device."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def make_params(scale: float) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=DEVICE) * 0.02) for s in transformer_shapes(scale, blocks=5)]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def state_lists(opt: torch.optim.Optimizer, params) -> tuple[list, list, list]:
    states = [opt.state[p] for p in params]
    return [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]


@contextlib.contextmanager
def reader_uses(fn):
    """Swap the function ``StepReader`` computes its rows with (the fast-path switch)."""
    # StepReader calls ``fast_adam_statistics``; "eager" means its foreach fallback.
    target = fn if fn is fast_adam_statistics else (lambda *a, **k: fast_adam_statistics(*a, **k, compiled=False))
    saved = state_module.fast_adam_statistics
    state_module.fast_adam_statistics = target
    try:
        yield
    finally:
        state_module.fast_adam_statistics = saved


def timed(fn) -> float:
    """Seconds per call of ``fn``, over ``REPEAT`` calls in a row: on a GPU, one call with a sync
    on each side would time the launch latency rather than the work of a step in a loop."""
    sync()
    start = time.perf_counter()
    for _ in range(REPEAT):
        fn()
    sync()
    return (time.perf_counter() - start) / REPEAT


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


# ---------------------------------------------------------------------------------------- (a)
def device_load(load_ms: float):
    """A callable that queues about ``load_ms`` of matrix products on the device: a stand-in for a
    training step's forward and backward passes, which the host's work can then overlap (CUDA)."""
    if not load_ms:
        return lambda: None
    a = torch.randn(4096, 4096, device=DEVICE, dtype=torch.bfloat16)
    a @ a  # the first product sets up the BLAS library: not part of the rate
    sync()
    start = time.perf_counter()
    for _ in range(20):
        a @ a
    sync()
    count = max(1, round(load_ms / ((time.perf_counter() - start) / 20 * 1e3)))

    def load():
        for _ in range(count):
            a @ a

    return load


def bench_statistics(scale: float, rounds: int, load_ms: float = 0.0) -> dict[str, float]:
    params = make_params(scale)
    numel = sum(p.numel() for p in params)
    kw = dict(lr=1e-4, weight_decay=0.1)
    on_cuda = DEVICE.type == "cuda"
    plain = torch.optim.AdamW(params, fused=True, **kw)
    # Each monitor on its own optimizer (own state) over the same parameters.
    hooked = torch.optim.AdamW(params, fused=True, **kw)
    hooked_eager = torch.optim.AdamW(params, fused=True, **kw)
    monitor = Monitor(hooked, log_every_n_steps=None)
    monitor_eager = Monitor(hooked_eager, log_every_n_steps=None)
    monitors = [monitor, monitor_eager]
    if on_cuda:  # there alerts do not wait for the device unless asked to: time that too
        blocking = torch.optim.AdamW(params, fused=True, **kw)
        monitors.append(Monitor(blocking, log_every_n_steps=None, blocking_alerts=True))
    plain.step()
    start = time.perf_counter()
    hooked.step()  # compiles the statistics here (first use)
    compile_s = time.perf_counter() - start
    with reader_uses(adam_statistics):
        hooked_eager.step()
    if on_cuda:
        blocking.step()
    step = int(plain.state[params[0]]["step"])
    stat_kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, step=step)
    lists = state_lists(plain, params)
    load = device_load(load_ms)

    def under_load(fn):
        return lambda: (load(), fn())

    def read_once():
        # What any pass over g, m and v costs here: the floor of a separate statistics pass. On
        # CUDA one multi-tensor reduction per list; a kernel per tensor would time the launches.
        if on_cuda:
            return [torch._foreach_norm(ts, 1) for ts in lists]
        return [t.sum() for ts in lists for t in ts]

    def eager_hook():
        with reader_uses(adam_statistics):
            hooked_eager.step()

    variants = ({"load": load} if load_ms else {}) | {
        "step": plain.step,
        "read": read_once,
        "eager": lambda: adam_statistics(*lists, **stat_kw),
        "fast": lambda: fast_adam_statistics(*lists, **stat_kw),
        "monitor_eager": eager_hook,
        "monitor": hooked.step,
    }
    if on_cuda:
        variants["monitor_blocking"] = blocking.step
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for key, fn in variants.items():
            samples[key].append(timed(fn if key == "load" else under_load(fn)))
    for m in monitors:
        m.close()
    ms = {k: median_ms(v) for k, v in samples.items()}
    loaded = ms.pop("load", 0.0)
    for key in ms:  # what each adds: to the load alone, the monitors to the load and the step
        ms[key] -= loaded
        if key.startswith("monitor"):
            ms[key] -= ms["step"]
    where = f"on {torch.cuda.get_device_name(DEVICE)}" if on_cuda else f"{torch.get_num_threads()} threads"
    print(
        f"\n(a) {numel / 1e6:.1f}M float32 parameters in {len(params)} tensors, {where}, "
        f"median of {rounds} interleaved rounds (statistics compiled in {compile_s:.1f} s)"
    )
    if load_ms:
        print(f"    each step after {loaded:.1f} ms of matrix products on the device (forward and backward stand-in)")
    print(f"    {'':46s}{'ms/step':>9s}{'× fused step':>14s}")
    rows = [
        ("fused AdamW step alone", "step"),
        ("+ reading g, m, v once: floor of a pass", "read"),
        ("+ adam_statistics (eager foreach passes)", "eager"),
        ("+ fast_adam_statistics (compiled)", "fast"),
        ("+ Monitor hook, eager statistics", "monitor_eager"),
        ("+ Monitor hook (default)", "monitor"),
        ("+ Monitor hook, alerts checked every step", "monitor_blocking"),
    ]
    for label, key in rows:
        if key in ms:
            print(f"    {label:46s}{ms[key]:9.2f}{ms[key] / ms['step']:14.2f}")
    return ms


# ---------------------------------------------------------------------------------------- (b)
def bench_lightning(steps: int, rounds: int) -> dict[str, float]:
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import TensorBoardLogger
    from quickstart import Regressor, data

    from adam_monitor import AdamMonitor

    class StepClock(Callback):
        """Wall time per batch after a warm-up, so start-up and compilation do not count."""

        def __init__(self, warmup: int):
            self.warmup, self.start, self.per_step = warmup, None, None

        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == self.warmup:
                self.start = time.perf_counter()

        def on_train_end(self, trainer, *args):
            self.per_step = (time.perf_counter() - self.start) / (trainer.global_step - self.warmup)

    import logging
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    def run(with_monitor: bool, root: str) -> float:
        torch.manual_seed(0)
        clock = StepClock(warmup=20)
        callbacks = [clock] + ([AdamMonitor()] if with_monitor else [])
        trainer = L.Trainer(
            max_steps=steps,
            callbacks=callbacks,
            logger=TensorBoardLogger(root, name="bench"),
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        trainer.fit(Regressor(), data())
        return clock.per_step

    samples: dict[str, list[float]] = {"without": [], "with": []}
    with tempfile.TemporaryDirectory() as root:
        for _ in range(rounds):
            samples["without"].append(run(False, root))
            samples["with"].append(run(True, root))
    ms = {k: median_ms(v) for k, v in samples.items()}
    print(
        f"\n(b) Lightning, examples/quickstart.py Regressor, {steps} steps a run, median of {rounds} interleaved runs"
    )
    print(
        f"    without AdamMonitor {ms['without']:.3f} ms/step, with {ms['with']:.3f} ms/step: "
        f"overhead {ms['with'] - ms['without']:+.3f} ms ({(ms['with'] / ms['without'] - 1) * 100:+.1f}%)"
    )
    return ms


# ---------------------------------------------------------------------------------------- (c)
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def memory_child(mode: str, scale: float, steps: int) -> None:
    """Run in a fresh process: peak (VmHWM) and resident (VmRSS) sizes after each half of the run."""
    params = make_params(scale)
    opt = torch.optim.AdamW(params, fused=True, lr=1e-4)
    monitor = Monitor(opt, log_every_n_steps=None) if mode != "none" else None
    with reader_uses(fast_adam_statistics if mode == "fast" else adam_statistics):
        opt.step()
        base = _status_kib("VmRSS")
        rss = []
        for _half in range(2):
            for _ in range(steps // 2):
                opt.step()
            rss.append(_status_kib("VmRSS"))
    if monitor is not None:
        monitor.close()
    print(
        json.dumps(
            {
                "hwm_mib": _status_kib("VmHWM") / 1024,
                "after_first_step_mib": base / 1024,
                "rss_mib": [r / 1024 for r in rss],
            }
        )
    )


def bench_memory(scale: float, steps: int) -> None:
    print(f"\n(c) memory, fresh process per variant, {steps} steps (VmHWM: peak resident size)")
    state_mib = 4 * sum(torch.Size(s).numel() for s in transformer_shapes(scale, blocks=5)) / 2**20
    print(f"    one copy of the parameters: {state_mib:.0f} MiB")
    print(f"    {'':30s}{'peak MiB':>10s}{'after 1 step':>14s}{'half-way':>10s}{'end':>8s}")
    variants = (
        ("none", "no monitor", {}),
        ("eager", "Monitor, eager reader", {}),
        ("fast", "Monitor, fast reader", {}),
        ("fast", "  the same, compiled in-process", {AHEAD_ENV: "0"}),
    )
    for mode, label, env in variants:
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", mode, "--scale", str(scale), "--steps", str(steps)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, **env},
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"    {label:30s}{r['hwm_mib']:10.0f}{r['after_first_step_mib']:14.0f}{r['rss_mib'][0]:10.0f}{r['rss_mib'][1]:8.0f}"
        )


# ---------------------------------------------------------------------------------------- (e)
def first_step_child(scale: float) -> None:
    """Run in a fresh process: the first step's time, then steps until the statistics kernel serves
    (at most 60 s of them), and the peak resident size over them (VmHWM)."""
    params = make_params(scale)
    opt = torch.optim.AdamW(params, fused=True, lr=1e-4)
    Monitor(opt, log_every_n_steps=None)
    start = time.perf_counter()
    opt.step()
    first = time.perf_counter() - start
    steps = 1
    while not ahead._LOADED and os.environ.get(AHEAD_ENV) != "0" and time.perf_counter() - start < 60:
        opt.step()
        steps += 1
    ready = time.perf_counter() - start
    print(json.dumps({"first_s": first, "ready_s": ready, "steps": steps, "hwm_mib": _status_kib("VmHWM") / 1024}))


def bench_first_step(scale: float) -> None:
    print("\n(e) time to the first step, fresh process per variant")
    print(f"    {'':44s}{'first step':>11s}{'kernel serves after':>21s}{'steps by then':>15s}{'peak MiB':>10s}")
    with tempfile.TemporaryDirectory() as empty:
        variants = (
            ("no monitor", None),
            ("kernel on disk", {}),
            ("empty kernel cache (built meanwhile)", {CACHE_ENV: os.path.join(empty, "kernels")}),
            ("compiled in-process, inductor cache warm", {AHEAD_ENV: "0"}),
            ("compiled in-process, inductor cache empty", {AHEAD_ENV: "0", "TORCHINDUCTOR_CACHE_DIR": empty}),
        )
        for label, env in variants:
            if env is None:
                params = make_params(scale)
                opt = torch.optim.AdamW(params, fused=True, lr=1e-4)
                start = time.perf_counter()
                opt.step()
                print(f"    {label:44s}{time.perf_counter() - start:10.3f}s")
                continue
            out = subprocess.run(
                [sys.executable, __file__, "--first-step-child", "--scale", str(scale)],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, **env},
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"    {label:44s}{r['first_s']:10.3f}s{r['ready_s']:20.1f}s{r['steps']:15d}{r['hwm_mib']:10.0f}")


# ---------------------------------------------------------------------------------------- (d)
def bench_own_optimizer(scale: float, rounds: int) -> None:
    try:
        from adam_monitor.optim import Adam
    except ImportError as error:
        print(f"\n(d) skipped: adam_monitor.optim.Adam is not importable ({error})")
        return
    if not hasattr(Adam([torch.nn.Parameter(torch.zeros(1))]), "record_statistics"):
        print("\n(d) skipped: adam_monitor.optim.Adam has no record_statistics")
        return
    params = make_params(scale)
    kw = dict(lr=1e-4, weight_decay=0.1)
    fused = torch.optim.AdamW(params, fused=True, **kw)
    off = Adam(params, momentum_bias_correction=True, **kw)
    on = Adam(params, momentum_bias_correction=True, **kw)
    on.record_statistics = True
    monitored = Adam(params, momentum_bias_correction=True, **kw)
    monitor = Monitor(monitored, log_every_n_steps=None)
    start = time.perf_counter()
    for opt in (fused, off, on, monitored):
        opt.step()
    compile_s = time.perf_counter() - start
    samples: dict[str, list[float]] = {k: [] for k in ("fused", "off", "on", "monitor")}
    for _ in range(rounds):
        samples["fused"].append(timed(fused.step))
        samples["off"].append(timed(off.step))
        samples["on"].append(timed(on.step))
        samples["monitor"].append(timed(monitored.step))
    monitor.close()
    ms = {k: median_ms(v) for k, v in samples.items()}
    print(
        f"\n(d) adam_monitor.optim.Adam (bias-corrected), same parameters, median of {rounds} rounds "
        f"(first steps incl. compilation: {compile_s:.1f} s)"
    )
    print(f"    {'':44s}{'ms/step':>9s}{'× fused step':>14s}")
    for label, key in (
        ("torch fused AdamW", "fused"),
        ("Adam, record_statistics off", "off"),
        ("Adam, record_statistics on", "on"),
        ("Adam + Monitor hook", "monitor"),
    ):
        print(f"    {label:44s}{ms[key]:9.1f}{ms[key] / ms['fused']:14.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a reduced run (under a minute once compiled)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--scale", type=float, default=None, help="width multiplier of the model in (a), (c), (d)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--only", default="abcde", help="which parts to run, e.g. 'ab'")
    parser.add_argument("--device", default="cpu", help="where (a) and (d) run (cpu, cuda)")
    parser.add_argument(
        "--repeat", type=int, default=1, help="calls per timed sample in (a) and (d) (10 or so on a GPU)"
    )
    parser.add_argument(
        "--load-ms",
        type=float,
        default=0.0,
        help="CUDA: precede each step of (a) with this many ms of matrix products on the device",
    )
    parser.add_argument("--memory-child", choices=("none", "eager", "fast"), help=argparse.SUPPRESS)
    parser.add_argument("--first-step-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global DEVICE, REPEAT
    DEVICE, REPEAT = torch.device(args.device), args.repeat
    if args.load_ms and DEVICE.type != "cuda":
        parser.error("--load-ms needs --device cuda: on the CPU the load and the monitor share the same cores")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    scale = args.scale if args.scale is not None else (0.5 if args.quick else 1.0)
    if args.memory_child:
        memory_child(args.memory_child, scale, args.steps or 20)
        return
    if args.first_step_child:
        first_step_child(scale)
        return
    rounds = args.rounds or (3 if args.quick else 9)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
        + (f", (a) and (d) on {torch.cuda.get_device_name(DEVICE)}" if DEVICE.type == "cuda" else "")
    )
    if "a" in args.only:
        bench_statistics(scale, rounds, args.load_ms)
    if "b" in args.only:
        bench_lightning(steps=args.steps or (60 if args.quick else 300), rounds=min(rounds, 2 if args.quick else 5))
    if "c" in args.only:
        bench_memory(scale, steps=args.steps or (10 if args.quick else 40))
    if "d" in args.only:
        bench_own_optimizer(scale, rounds)
    if "e" in args.only:
        bench_first_step(scale)


if __name__ == "__main__":
    main()
