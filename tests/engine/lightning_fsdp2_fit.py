"""A Lightning fit with AdamMonitor, on one process or FSDP2 over 2 CPU processes.

    python tests/engine/lightning_fsdp2_fit.py fsdp2|single LOGDIR

Lightning's ModelParallelStrategy launches this script again in each process, so it is a file
of its own rather than a test function.
"""

import sys

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from adam_monitor import AdamMonitor


class Model(L.LightningModule):
    def __init__(self, shard):
        super().__init__()
        self.shard = shard
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(13, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 1))

    def configure_model(self):
        if self.shard:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, i):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, betas=(0.9, 0.95))

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        data = [(torch.randn(16, 13, generator=g), torch.randn(16, 1, generator=g)) for _ in range(20)]
        return torch.utils.data.DataLoader(data, batch_size=None)


if __name__ == "__main__":
    shard, root = sys.argv[1] == "fsdp2", sys.argv[2]
    kwargs = {}
    if shard:
        from lightning.pytorch.strategies import ModelParallelStrategy

        kwargs = dict(strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), devices=2)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=20,
        log_every_n_steps=5,
        callbacks=[AdamMonitor()],
        logger=TensorBoardLogger(root, name="run", version=0),
        use_distributed_sampler=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kwargs,
    )
    trainer.fit(Model(shard))
