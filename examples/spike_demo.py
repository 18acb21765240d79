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
import logging
import shutil
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


RUNS = (("default_betas_0.9_0.999", (0.9, 0.999)), ("fixed_betas_0.9_0.95", (0.9, 0.95)))
PHASES = {
    DROP: "the loss weight starts to fall",
    DROP + FALL: f"the loss weight is {LOW_WEIGHT:g}",
    RETURN: "the weight returns",
}


class Progress(L.Callback):
    """One line per phase of the loss weight, so a run of half a minute is not silent."""

    def __init__(self, label: str):
        self.label, self.start = label, time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step in PHASES or step == trainer.max_steps:
            what = PHASES.get(step, "done")
            print(f"  {self.label} step {step:>5}: {what} ({time.perf_counter() - self.start:.0f} s)", flush=True)


def train(name: str, betas, steps: int, root: Path, label: str):
    # The monitor checks its rules on every step whatever the logging interval; its scalars (one
    # per tensor and diagnostic) are written every 5 steps, the loss every step.
    monitor = AdamMonitor(log_every_n_steps=5)
    trainer = L.Trainer(
        max_steps=steps,
        callbacks=[monitor, Progress(label)],
        logger=TensorBoardLogger(root, name=name, version=0),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    model = Student(betas=betas)
    trainer.fit(model, torch.utils.data.DataLoader(TeacherData(), batch_size=None))
    return model.losses, monitor.alerts, trainer.logger.log_dir


def clear_previous(root: Path) -> None:
    """A rerun starts from empty run folders: alerts.jsonl appends, and TensorBoard would draw the
    old run and the new one as one line. Only what this script writes is removed."""
    for name, _ in RUNS:
        if (root / name).is_dir():
            shutil.rmtree(root / name)
    (root / "report.png").unlink(missing_ok=True)


def comparison(runs: dict) -> str:
    """The titled table: what changed, when the precursor fired, when the loss moved, the lead."""
    lines = [
        "Spike demo: the same model, data and seed twice; only beta2 differs.",
        f"The loss weight falls to {LOW_WEIGHT:g} over steps {DROP}..{DROP + FALL} and returns to 1 at step {RETURN}.",
        "A loss spike: the loss above 3x its median of the previous 50 steps, two steps in a row.",
        "",
        f"{'betas':<13}{'first precursor alert':<33}{'loss spike':<13}{'lead':<10}{'peak loss / median before'}",
    ]
    lines.append("-" * len(lines[-1]))
    for betas, losses, alerts, _log_dir, _seconds in runs.values():
        spike = next(iter(loss_spikes(losses)), None)
        # Regime notes (info) are no forecast: the lead counts precursor alerts only.
        precursors = [a for a in alerts if a.severity != "info"]
        first = f"{precursors[0].rule} at step {precursors[0].step}" if precursors else "none"
        lead = spike - precursors[0].step if spike and precursors and precursors[0].step <= spike else None
        lead = "-" if lead is None else f"{lead} step{'s' * (lead != 1)}"
        before = statistics.median(losses[RETURN - 51 : RETURN - 1])
        after = losses[RETURN - 1 :]
        peak_at = max(range(len(after)), key=after.__getitem__)
        peak = f"{after[peak_at] / before:.0f}x (step {peak_at + RETURN})"
        spiked = f"step {spike}" if spike else "none"
        lines.append(f"{str(betas):<13}{first:<33}{spiked:<13}{lead:<10}{peak}")
    return "\n".join(lines)


def alert_counts(runs: dict) -> str:
    lines = []
    for name, (_betas, _losses, alerts, log_dir, _seconds) in runs.items():
        counts: dict[tuple[str, str], int] = {}
        for a in alerts:
            counts[(a.severity, a.rule)] = counts.get((a.severity, a.rule), 0) + 1
        lines.append(f"  {name}: {sum(counts.values()) or 'no'} alert(s), in {Path(log_dir) / 'adam_monitor'}")
        lines += [f"    {severity:<8} {rule:<20} x{n}" for (severity, rule), n in counts.items()]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/spike_demo", help="folder for both runs' logs and the report")
    parser.add_argument("--steps", type=int, default=RETURN + 200, help="optimizer steps per run")
    args = parser.parse_args(argv)
    root = Path(args.root)
    clear_previous(root)
    # Lightning's banners (accelerators, tips, "fit stopped") would bury the demo's own lines.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(1)  # a tiny model: threads only add contention
    runs = {}
    # main() returns the runs so that a test can check them.
    for i, (name, betas) in enumerate(RUNS, 1):
        print(f"run {i} of {len(RUNS)}: AdamW betas={betas}, {args.steps} steps -> {root / name}", flush=True)
        start = time.perf_counter()
        losses, alerts, log_dir = train(name, betas, args.steps, root, label=f"run {i}")
        runs[name] = (betas, losses, alerts, log_dir, time.perf_counter() - start)

    print()
    print(comparison(runs))
    print("\nAlerts per run (info notes a regime and never fails `adam-monitor check`):")
    print(alert_counts(runs))
    try:
        from adam_monitor.cli.plot import write_report

        png = write_report(root, root / "report.png", title="spike demo: β2 = 0.999 vs 0.95 after a loss-scale return")
        print(f"\nReport:      {png}")
    except ImportError:
        print("\n(matplotlib is not installed: `pip install matplotlib` for the PNG report)")
    print(f"TensorBoard: .venv/bin/tensorboard --logdir {root}   (Custom Scalars tab)")
    print(f"CI gate:     .venv/bin/adam-monitor check {root}   (exit 1: the default-betas run alerts)")
    return {name: (losses, alerts, log_dir) for name, (_, losses, alerts, log_dir, _) in runs.items()}


if __name__ == "__main__":
    main()
