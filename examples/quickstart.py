"""Train a small regression model with AdamMonitor and write TensorBoard logs under runs/quickstart.

python examples/quickstart.py            # then: tensorboard --logdir runs
"""

import argparse

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from adam_monitor import AdamMonitor


class Regressor(L.LightningModule):
    def __init__(self, betas=(0.9, 0.95), lr=3e-3):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, betas=self.hparams.betas)


def data(n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g)
    w = torch.randn(32, 1, generator=g)
    y = torch.sin(x @ w) + 0.1 * torch.randn(n, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True)


class RegressionData(L.LightningDataModule):
    """``data()`` as a datamodule, for LightningCLI."""

    def __init__(self, n: int = 4096, seed: int = 0):
        super().__init__()
        self.n, self.seed = n, seed

    def train_dataloader(self):
        return data(self.n, self.seed)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--logdir", default="runs")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    monitor = AdamMonitor(log_every_n_steps=10)
    trainer = L.Trainer(
        max_steps=args.steps,
        callbacks=[monitor],
        logger=TensorBoardLogger(args.logdir, name="quickstart"),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Regressor(), data())
    print(f"TensorBoard logs in {trainer.logger.log_dir}; view them with: tensorboard --logdir {args.logdir}")
    return trainer.logger.log_dir


if __name__ == "__main__":
    main()
