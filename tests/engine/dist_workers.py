"""Worker functions for the multi-process tests (importable by spawned processes)."""

import datetime
import faulthandler
import gc
import os
import signal

import torch
import torch.distributed as dist
from torch import nn


def make_model(seed=0):
    torch.manual_seed(seed)
    # Odd sizes: FSDP2 shards dim 0 unevenly over 2 ranks (7 rows → 4 + 3, 5 → 3 + 2, 1 → 1 + 0).
    return nn.Sequential(nn.Linear(13, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 1))


def batches(steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 13, generator=g), torch.randn(16, 1, generator=g)) for _ in range(steps)]


def train(model, steps, *, log_every, betas=(0.9, 0.95)):
    """The same data on every rank: a sharded or replicated run must match one process."""
    from adam_monitor import Monitor

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=betas)
    monitor = Monitor(opt, named_parameters=model.named_parameters(), log_every_n_steps=None)
    logged = {}
    for t, (x, y) in enumerate(batches(steps), 1):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if t % log_every == 0:
            logged[t] = monitor.flush()
    monitor.close()
    return logged


def with_stack_dump(rank, fn, stacks_dir, *args):
    """Run ``fn(rank, *args)``; on SIGUSR1 the rank writes every thread's Python stack to
    ``stacks_dir/rank<r>.txt``, so a test that times out can say where each rank hung. The handler
    stays registered after ``fn`` returns: a hang in the interpreter's exit is reported too."""
    stacks = open(os.path.join(stacks_dir, f"rank{rank}.txt"), "w", buffering=1)  # open until exit
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    fn(rank, *args)
    stacks.write(f"rank {rank} returned from {fn.__name__}; still alive after it\n")


def _init(rank, world, port):
    # Loopback for gloo's pairs too: on a host whose name resolves to an external interface,
    # gloo would otherwise connect the ranks through it.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A rank that never joins fails the others' first collective in 2 minutes, not torch's 30.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)


def distributed_worker(rank, world, port, kind, steps, log_every, out_dir):
    import adam_monitor.engine.reader as state

    _init(rank, world, port)
    calls = []
    real = state.all_reduce

    def counting(tensor, group):
        calls.append(tensor.numel())
        real(tensor, group)

    state.all_reduce = counting
    model = make_model()
    if kind == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    elif kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    logged = train(model, steps, log_every=log_every)
    torch.save({"logged": logged, "collectives": calls}, os.path.join(out_dir, f"rank{rank}.pt"))
    # The DDP wrapper goes first, while the process group is still registered: its Reducer would
    # otherwise drop the group's last reference holding the GIL, and the group's destructor waits
    # for a gloo thread that needs the GIL to free its last work (a deadlock in torch's teardown).
    del model
    gc.collect()
    dist.destroy_process_group()


import lightning as L  # noqa: E402


class NanModel(L.LightningModule):
    """Gradients turn NaN at one optimizer step, identically on every rank."""

    def __init__(self, nan_at, rank=None):
        super().__init__()
        self.nan_at, self.nan_rank = nan_at, rank  # rank: only that rank's loss turns NaN
        self.net = make_model()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if self.global_step + 1 == self.nan_at and self.nan_rank in (None, self.global_rank):
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, betas=(0.9, 0.95))

    def train_dataloader(self):
        return torch.utils.data.DataLoader(batches(30), batch_size=None)


def hang_on_rank(rank, hung_rank):
    import time

    while rank == hung_rank:
        time.sleep(0.1)
