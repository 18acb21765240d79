"""Monitor with Lightning Fabric: hook the optimizer Fabric returns.

python examples/fabric_loop.py --steps 100
"""

import argparse

import lightning as L
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from adam_monitor import Monitor


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--logdir", default="runs/fabric")
    args = parser.parse_args(argv)

    fabric = L.Fabric(accelerator="cpu", devices=1)
    fabric.seed_everything(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    model, optimizer = fabric.setup(model, optimizer)
    writer = SummaryWriter(args.logdir) if fabric.is_global_zero else None
    monitor = Monitor(optimizer, named_parameters=model.named_parameters(), writer=writer, log_every_n_steps=10)
    w = torch.randn(16, 1)
    for _ in range(args.steps):
        x = torch.randn(64, 16)
        loss = nn.functional.mse_loss(model(x), torch.sin(x @ w))
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    monitor.close()
    if writer is not None:
        writer.close()
    return args.logdir


if __name__ == "__main__":
    main()
