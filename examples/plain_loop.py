"""Monitor in a plain PyTorch loop: no Lightning, a SummaryWriter, alerts to runs/plain_loop.

python examples/plain_loop.py --steps 200
"""

import argparse

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from adam_monitor import Monitor


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--logdir", default="runs/plain_loop")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    writer = SummaryWriter(args.logdir)
    monitor = Monitor(optimizer, named_parameters=model.named_parameters(), writer=writer, log_every_n_steps=10)
    w = torch.randn(16, 1)
    for step in range(1, args.steps + 1):
        x = torch.randn(64, 16)
        loss = nn.functional.mse_loss(model(x), torch.sin(x @ w))
        loss.backward()
        optimizer.step()  # the monitor's hook measures this step
        optimizer.zero_grad()
        if step % 10 == 0:
            writer.add_scalar("train/loss", loss.item(), step)
        if monitor.should_stop:  # only with on_alert="stop"
            break
    monitor.close()  # writes what is pending; under on_alert="stop" raises InstabilityError if told to stop
    writer.close()
    print(monitor.summary())
    return args.logdir


if __name__ == "__main__":
    main()
