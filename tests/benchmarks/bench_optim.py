"""Step time of every ``adam_monitor.optim`` variant against torch's fused and foreach AdamW.

Run as ``python tests/benchmarks/bench_optim.py [--scale 1.0] [--rounds 7] [--threads N]
[--device cuda] [--only NAME ...]``. About
20M float32 parameters in about 50 transformer-shaped tensors; all optimizers step the same
parameters and gradients (each keeps its own moments), interleaved round by round so that machine
noise hits them alike; the median over rounds is reported. The first step of each variant, which
compiles its graphs (from inductor's disk cache after the first run), is reported apart.
``--threads 1`` gives steadier numbers on a machine shared with other jobs: an OpenMP loop of
2 threads waits for the slower one.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from shapes import transformer_shapes  # noqa: E402  (run as a script, this folder is on sys.path)

from adam_monitor.optim import Adam, AdamAtan2, AdamD, LaProp, StableAdamW


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="width multiplier of the model")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="where the parameters live (cpu, cuda)")
    parser.add_argument("--only", nargs="+", default=None, help="time only the variants whose names start so")
    parser.add_argument(
        "--compiled", action="store_true", help="our variants with compiled=True (the torch.compile'd step)"
    )
    parser.add_argument(
        "--heads-per-call", type=int, default=None, help="tensors per compiled call (default: the library's)"
    )
    args = parser.parse_args()
    if args.heads_per_call is not None:
        from adam_monitor.optim import compiled

        compiled.STEP_HEADS_PER_CALL = args.heads_per_call
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    device = torch.device(args.device)
    # a step is timed to its end: on CUDA the host waits for the device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    params = [
        torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in transformer_shapes(args.scale, blocks=4)
    ]
    for p in params:
        p.grad = torch.randn_like(p)
    numel = sum(p.numel() for p in params)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"{numel / 1e6:.1f}M float32 parameters in {len(params)} tensors, {where}, torch {torch.__version__}")

    kw = dict(lr=1e-4, weight_decay=0.1)
    variants = {
        "torch AdamW fused": lambda: torch.optim.AdamW(params, fused=True, **kw),
        "torch AdamW foreach": lambda: torch.optim.AdamW(params, foreach=True, **kw),
    }
    ours = dict(kw, compiled=True) if args.compiled else kw
    variants |= {
        "Adam (bias-corrected)": lambda: Adam(params, momentum_bias_correction=True, **ours),
        "AdamD": lambda: AdamD(params, **ours),
        "LaProp": lambda: LaProp(params, **ours),
        "AdamAtan2": lambda: AdamAtan2(params, **ours),
        "StableAdamW": lambda: StableAdamW(params, **ours),
    }
    for name in list(variants)[2:]:
        variants[f"{name} +stats"] = variants[name]
    if args.only:  # the two torch references always run: the ratios are against them
        variants = {n: make for k, (n, make) in enumerate(variants.items()) if k < 2 or n.startswith(tuple(args.only))}
    optimizers = {}
    for name, make in variants.items():
        optimizer = make()
        optimizer.record_statistics = name.endswith("+stats")
        start = time.perf_counter()
        optimizer.step()
        sync()
        first = time.perf_counter() - start
        for _ in range(args.warmup - 1):
            optimizer.step()
        sync()
        optimizers[name] = optimizer
        print(f"  first step {name:<30} {first:6.1f} s (compiles on first use)")

    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(args.rounds):
        for name, optimizer in optimizers.items():
            sync()
            start = time.perf_counter()
            optimizer.step()
            sync()
            times[name].append(time.perf_counter() - start)

    median = {name: statistics.median(ts) for name, ts in times.items()}
    fused, foreach = median["torch AdamW fused"], median["torch AdamW foreach"]
    print(f"\n| variant | step ms (median of {args.rounds}) | vs fused | vs foreach |")
    print("|---|---:|---:|---:|")
    for name, t in median.items():
        print(f"| {name} | {t * 1e3:.1f} | {t / fused:.2f} | {t / foreach:.2f} |")


if __name__ == "__main__":
    main()
