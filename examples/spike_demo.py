"""A loss spike caught before it happens, and the fix that prevents it.

The same model is trained twice on the same data. Halfway, the loss weight drops 1000x for a long
stretch and then comes back, as when a curriculum or a loss-weight schedule turns a term down and
up again. Adam is invariant to the scale of the loss, but only when the scale moves slower than its
second moment can follow: about 1/(1-β2) steps, 1000 at PyTorch's default β2 = 0.999. When the
weight returns, v̂ still describes the small gradients, every update is inflated up to the
worst-case bound B_∞ = 7.27 of (0.9, 0.999), and the loss spikes a few steps later. AdamMonitor
raises `stale_second_moment` at the step the gradient returns, before the loss moves. With the fix
its message recommends, β2 = 0.95 (v̂ follows in ~20 steps, B_∞ = 1.165), nothing spikes and no
spike precursor fires (only `eps_dominance` may note that ε sets the step of converged weights
while the loss weight is low: true, and harmless here).

    python examples/spike_demo.py        # about a minute on 2 CPU cores; logs and report in runs/spike_demo
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from adam_monitor import AdamMonitor

WIDTH = 16
DROP, FALL, RETURN = 200, 200, 3000  # the weight falls over FALL steps from DROP, returns at RETURN
LOW_WEIGHT = 1e-3
REGIME_RULES = ("eps_dominance", "beta_order")


def loss_weight(step: int) -> float:
    """1, a geometric fall to LOW_WEIGHT, then back to 1 in one step.

    The fall is gradual (0.966 per step) so that momentum (β1 = 0.9 forgets in ~10 steps) keeps
    following the gradient; a cliff would leave the model coasting on stale momentum instead.
    """
    if step < DROP or step >= RETURN:
        return 1.0
    return LOW_WEIGHT ** min(1.0, (step - DROP) / FALL)


class TeacherData(torch.utils.data.IterableDataset):
    """An endless stream of (x, teacher(x)) batches from a fixed random teacher network."""

    def __init__(self, seed: int = 0, batch_size: int = 64):
        g = torch.Generator().manual_seed(seed)
        self.teacher = nn.Sequential(nn.Linear(WIDTH, 64), nn.Tanh(), nn.Linear(64, 1))
        for p in self.teacher.parameters():
            p.data = torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5
        self.seed, self.batch_size = seed, batch_size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + 1)
        while True:
            x = torch.randn(self.batch_size, WIDTH, generator=g)
            with torch.no_grad():  # not around the yield: that would leak into the caller
                y = self.teacher(x)
            yield x, y


class Student(L.LightningModule):
    def __init__(self, betas=(0.9, 0.999), lr: float = 1e-2):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(WIDTH, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 1))
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.item())
        self.log("train/loss", loss)
        # The weight scales the gradient only: the logged loss is the model's real error.
        return loss_weight(self.global_step + 1) * loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, betas=self.hparams.betas, weight_decay=0.0)


def loss_spikes(losses: list[float], factor: float = 3.0, window: int = 50) -> list[int]:
    """First steps (1-based) of episodes where the loss stays above factor x its rolling median."""
    starts, above = [], 0
    for i in range(window, len(losses)):
        high = losses[i] > factor * statistics.median(losses[i - window : i])
        above = above + 1 if high else 0
        if above == 2:  # two steps in a row: a spike, not a one-step wobble
            starts.append(i)  # the first high step, 1-based: (i - 1) + 1
    return starts


def train(name: str, betas, steps: int, root: Path):
    # The monitor checks its rules on every step whatever the logging interval; its scalars (one
    # per tensor and diagnostic) are written every 5 steps, the loss every step.
    monitor = AdamMonitor(log_every_n_steps=5)
    trainer = L.Trainer(
        max_steps=steps,
        callbacks=[monitor],
        logger=TensorBoardLogger(root, name=name, version=0),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    model = Student(betas=betas)
    trainer.fit(model, torch.utils.data.DataLoader(TeacherData(), batch_size=None))
    return model.losses, monitor.alerts, trainer.logger.log_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/spike_demo")
    parser.add_argument("--steps", type=int, default=RETURN + 200)
    args = parser.parse_args(argv)
    root = Path(args.root)
    torch.set_num_threads(1)  # a tiny model: threads only add contention
    runs = {}
    # main() returns the runs so that a test can check them.
    for name, betas in (("default_betas_0.9_0.999", (0.9, 0.999)), ("fixed_betas_0.9_0.95", (0.9, 0.95))):
        start = time.perf_counter()
        losses, alerts, log_dir = train(name, betas, args.steps, root)
        runs[name] = (betas, losses, alerts, log_dir, time.perf_counter() - start)

    print(f"\nLoss weight falls to {LOW_WEIGHT:g} over steps {DROP}..{DROP + FALL}, back to 1 at step {RETURN}.\n")
    rows = []
    for name, (_betas, losses, alerts, _log_dir, seconds) in runs.items():
        spikes = loss_spikes(losses)
        first = {}
        for a in alerts:
            first.setdefault(a.rule, a.step)
        listed = ", ".join(f"{rule} ({step})" for rule, step in first.items()) or "none"
        spike = spikes[0] if spikes else None
        # Regime notes are no forecast of a spike: the lead counts precursor alerts only.
        before = [a.step for a in alerts if spike is not None and a.step <= spike and a.rule not in REGIME_RULES]
        lead = f"{spike - before[0]}" if before else "-"
        before_return = statistics.median(losses[RETURN - 51 : RETURN - 1])
        after = losses[RETURN - 1 :]
        peak_at = max(range(len(after)), key=after.__getitem__) + RETURN
        peak = after[peak_at - RETURN]
        rows.append(
            (name, listed, spike if spike else "none", lead, f"{peak / before_return:.0f}x median ({peak_at})", seconds)
        )
    width = max(len("alerts (first step)"), *(len(r[1]) for r in rows)) + 2
    header = (
        f"{'run':<26}{'alerts (first step)':<{width}}{'loss spike':<12}{'lead':<6}{'peak loss (step)':<24}{'time':>6}"
    )
    print(header)
    print("-" * len(header))
    for name, listed, spike, lead, peak, seconds in rows:
        print(f"{name:<26}{listed:<{width}}{spike:<12}{lead:<6}{peak:<24}{seconds:>5.0f}s")
    try:
        from adam_monitor.cli.plot import write_report

        png = write_report(root, root / "report.png", title="spike demo: β2 = 0.999 vs 0.95 after a loss-scale return")
        print(f"\nReport: {png}")
    except ImportError:
        print("\n(matplotlib not installed: pip install 'adam-monitor[report]' for the PNG report)")
    print(f"TensorBoard: tensorboard --logdir {root}   (Custom Scalars tab)")
    print(f"CI gate:     adam-monitor check {root}")
    return {name: (losses, alerts, log_dir) for name, (_, losses, alerts, log_dir, _) in runs.items()}


if __name__ == "__main__":
    main()
