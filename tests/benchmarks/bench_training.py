"""What the monitor adds to a whole training step of a small GPT-style decoder on the CPU.

Run as ``python tests/benchmarks/bench_training.py [--quick] [--rounds 7] [--steps 10]``.

The model: 6 pre-norm blocks of width 256 (4 heads, MLP 4×), a vocabulary of 4,096 tokens with tied
input and output embeddings, context 128: 5.8M parameters in 76 tensors; batches of 16 sequences of
random tokens; torch's fused AdamW. A training step is forward, backward, ``optimizer.step()`` and
``zero_grad``. Three variants are timed side by side, alternating round by round (the order reversed
every other round) so machine noise hits them alike, each round ``--steps`` steps after a warm-up
that compiles whatever the monitor compiles:

* the step alone;
* with a ``Monitor`` on the optimizer (default settings, no writer: every step measured and
  checked, which is what a run pays between log points);
* with a per-tensor gradient norm taken on the host at every step (one ``.item()`` per tensor),
  the usual hand-written monitor, for scale.

Printed: the median step time of each, and what the monitor and the hand-written one add to it.
The goal: the monitor adds at most 1% to the step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from adam_monitor import Monitor  # noqa: E402

GOAL = "the monitor adds ≤ 1% to the training step"


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).unbind(2)
        y = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class Decoder(nn.Module):
    def __init__(self, vocab: int = 4096, width: int = 256, layers: int = 6, heads: int = 4, context: int = 128):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T  # tied output embedding


def make(variant: str, batch: int, context: int):
    torch.manual_seed(0)
    model = Decoder(context=context)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)
    monitor = Monitor(opt, named_parameters=model.named_parameters()) if variant == "monitor" else None
    tokens = torch.randint(0, 4096, (batch, context + 1), generator=torch.Generator().manual_seed(1))

    def step() -> None:
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        if variant == "item per tensor":
            for p in model.parameters():
                p.grad.norm().item()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step, monitor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="steps per timed sample")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # alerts on random tokens are not what is measured
    rounds = args.rounds or (3 if args.quick else 9)
    steps = args.steps or (3 if args.quick else 10)
    variants = {name: make(name, args.batch, 128) for name in ("alone", "monitor", "item per tensor")}
    model = variants["alone"][0]
    count = sum(p.numel() for p in model.parameters())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {count / 1e6:.1f}M parameters in "
        f"{len(list(model.parameters()))} tensors, batch {args.batch}×128, fused AdamW"
    )
    for _, step, _ in variants.values():  # warm-up: the monitor compiles its statistics at its first step
        for _ in range(3):
            step()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            step = variants[name][1]
            start = time.perf_counter()
            for _ in range(steps):
                step()
            samples[name].append((time.perf_counter() - start) / steps * 1e3)
    alone = statistics.median(samples["alone"])
    print(f"median of {rounds} interleaved rounds of {steps} steps; goal: {GOAL}")
    print(f"    {'variant':<18s}{'ms/step':>9s}{'added ms':>10s}{'added':>9s}")
    for name in names:
        ms = statistics.median(samples[name])
        # the added time as the median of the per-round differences: rounds share the machine's state
        added = statistics.median(a - b for a, b in zip(samples[name], samples["alone"]))
        print(f"    {name:<18s}{ms:9.2f}{added:10.2f}{added / alone:9.1%}")
    for _, _, monitor in variants.values():
        if monitor is not None:
            monitor.close()


if __name__ == "__main__":
    main()
