"""AdamDiagnostics (a torchmetrics Metric) gives the engine's numbers, alone, over ranks and in Lightning."""

import csv
import datetime
import math
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from adam_monitor import Monitor
from adam_monitor.diagnostics import DIAGNOSTICS, NUM_STATS, diagnostics_from_statistics
from adam_monitor.engine.names import names_by_id, parameter_names
from adam_monitor.engine.reader import StepReader
from adam_monitor.metrics import AdamDiagnostics

STEPS = 12


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(9, 6), nn.Tanh(), nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 1))


def _train(model, opt, steps=STEPS):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 9, generator=g), torch.randn(16, 1, generator=g)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def _close(a: float, b: float, rtol: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=rtol, abs=0.0)


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95))


def _in_step_adam(params):
    from adam_monitor.optim import Adam

    return Adam(params, lr=1e-2, betas=(0.9, 0.95))  # statistics from inside its own step


@pytest.mark.parametrize("make_optimizer", [_adamw, _in_step_adam], ids=["torch AdamW", "adam_monitor Adam"])
def test_compute_is_the_engines_numbers_pooled_and_per_parameter(make_optimizer):
    model = _model()
    model[2].requires_grad_(False)  # a frozen tensor: zero rows, NaN per-parameter diagnostics
    opt = make_optimizer(model.parameters())
    names = parameter_names(opt, names_by_id(model.named_parameters()))
    monitor = Monitor(opt, named_parameters=model.named_parameters(), log_every_n_steps=None)
    metric = AdamDiagnostics(per_parameter=True, names=names, prefix="adam")
    pooled_only = AdamDiagnostics()
    handles = [metric.attach(opt), pooled_only.attach(opt)]
    reader, steps = StepReader(opt), []
    opt.register_step_post_hook(lambda *_: steps.append(reader.read(after_step=True)[0]))

    _train(model, opt)
    engine, ours = monitor.compute(), {k: v.item() for k, v in metric.compute().items()}
    monitor.close()

    rows = torch.stack(steps)  # (STEPS, len(params), NUM_STATS)
    by_hand = diagnostics_from_statistics(rows.sum((0, 1))).tolist()
    assert [ours[f"adam/{d}"] for d in DIAGNOSTICS] == pytest.approx(by_hand, rel=1e-12)
    assert [v.item() for v in pooled_only.compute().values()] == pytest.approx(by_hand, rel=1e-12)
    assert list(pooled_only.compute()) == list(DIAGNOSTICS)
    per_parameter = [k for k in ours if "_per_parameter/" in k]
    assert len(per_parameter) == len(DIAGNOSTICS) * len(names)
    assert "adam_per_parameter/update_rms/2.weight" in per_parameter
    worst = 0.0
    for key, value in ours.items():
        if key in engine:
            assert _close(value, engine[key], rtol=1e-12), key
            worst = max(worst, abs(value - engine[key]) / abs(engine[key]) if engine[key] else abs(value))
        else:  # the engine leaves NaN diagnostics out
            assert math.isnan(value), key
    assert {k for k in engine if "_per_parameter/" in k} <= set(per_parameter)
    assert math.isnan(ours["adam_per_parameter/update_rms/2.weight"])
    print(f"largest relative difference to the engine: {worst:.3g}")

    for handle in handles:
        handle.remove()
    before = metric.statistics.clone()
    _train(model, opt, steps=2)
    assert torch.equal(metric.statistics, before)  # removed: no longer fed


def test_a_monitor_closed_beside_the_metric_leaves_its_in_step_statistics_on():
    # adam_monitor.optim records its statistics inside step() while any reader wants them.
    from adam_monitor.optim import Adam

    torch.manual_seed(0)
    model = nn.Linear(8, 2)
    opt = Adam(model.parameters(), lr=1e-2)
    metric = AdamDiagnostics()
    monitor = Monitor(opt, log_every_n_steps=None)
    attachment = metric.attach(opt)

    def steps(n):
        rows = []
        for _ in range(n):
            model(torch.randn(4, 8)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            rows.append(torch.stack([opt.last_statistics[p] for p in model.parameters()]))
        return rows

    steps(2)
    monitor.close()
    metric.reset()
    rows = steps(3)
    assert opt.record_statistics and not torch.equal(rows[1], rows[2]), "every step recorded afresh"
    expected = diagnostics_from_statistics(torch.stack(rows).sum((0, 1)))
    got = metric.compute()
    assert [float(got[d]) for d in DIAGNOSTICS[:2]] == pytest.approx(expected[:2].tolist(), rel=1e-12)
    attachment.remove()
    assert not opt.record_statistics


def test_reset_clears_and_wrong_shapes_are_refused():
    metric = AdamDiagnostics(per_parameter=True, names=["a", "b"])
    rows = torch.rand(3, 2, NUM_STATS, dtype=torch.float64) + 1
    metric.update(rows)
    assert not math.isnan(metric.compute()["update_rms"].item())
    metric.reset()
    assert torch.count_nonzero(metric.statistics) == 0 and torch.count_nonzero(metric.parameter_statistics) == 0
    with pytest.warns(UserWarning, match="before the ``update`` method"):
        assert all(math.isnan(v.item()) for v in metric.compute().values())

    with pytest.raises(ValueError, match=rf"shape \(\.\.\., 2, {NUM_STATS}\).*got \(3, 2, 5\)"):
        metric.update(torch.zeros(3, 2, 5))
    with pytest.raises(ValueError, match=rf"shape \(\.\.\., 2, {NUM_STATS}\).*got \({NUM_STATS},\)"):
        metric.update(torch.zeros(NUM_STATS))
    with pytest.raises(TypeError, match=r"StepReader.read\(\) returns \(rows, step\)"):
        metric.update((rows, 3))
    with pytest.raises(ValueError, match=rf"shape \(\.\.\., {NUM_STATS}\).*got \(4, 6\)"):
        AdamDiagnostics().update(torch.zeros(4, 6))
    AdamDiagnostics().update(torch.zeros(2, 3, NUM_STATS))  # any leading dimensions pool


def test_misuse_at_construction_raises():
    with pytest.raises(ValueError, match="needs names"):
        AdamDiagnostics(per_parameter=True)
    with pytest.raises(ValueError, match="per_parameter=True too"):
        AdamDiagnostics(names=["a"])
    with pytest.raises(ValueError, match="repeats"):
        AdamDiagnostics(per_parameter=True, names=["a", "a"])
    model = nn.Linear(3, 2)
    with pytest.raises(TypeError, match="cannot read SGD: SGD is not torch.optim.Adam"):
        AdamDiagnostics().attach(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="optimizer has 2 parameters, this metric was given 1 names"):
        AdamDiagnostics(per_parameter=True, names=["w"]).attach(torch.optim.Adam(model.parameters()))


def _rank_rows(rank):
    g = torch.Generator().manual_seed(10 + rank)
    # Each rank its own rows, of its own scale: a mean over ranks of each rank's diagnostics differs
    # from the diagnostics of the summed rows.
    return [torch.rand(3, NUM_STATS, generator=g, dtype=torch.float64) * (1 + 9 * rank) for _ in range(4)]


def ddp_worker(rank, world, port, out_dir):
    # As tests/engine/dist_workers.py starts a rank (loopback gloo, a short timeout), without
    # importing that module: it loads Lightning, seconds of each rank's start.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    metric = AdamDiagnostics(per_parameter=True, names=["a", "b", "c"])
    for rows in _rank_rows(rank):
        metric.update(rows)
    local = metric.statistics.clone()
    values = {k: v.item() for k, v in metric.compute().items()}
    torch.save({"values": values, "restored": torch.equal(metric.statistics, local)}, f"{out_dir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(fn, args, nprocs, timeout):
    """Spawned daemonic ranks, killed once ``timeout`` passes (a rank hung in a collective fails
    this test, not the session)."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, daemon=True, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.0)):  # raises for a failed rank
            if time.monotonic() >= deadline:
                pytest.fail(f"ranks still running after {timeout} s")
    finally:
        for process in ctx.processes:
            if process.is_alive():
                process.kill()
                process.join(5)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ranks_compute_the_diagnostics_of_all_ranks_rows(tmp_path):
    _run_ranks(ddp_worker, (2, _free_port(), str(tmp_path)), nprocs=2, timeout=90)
    alone = AdamDiagnostics(per_parameter=True, names=["a", "b", "c"], sync_on_compute=False)
    for rank in range(2):
        for rows in _rank_rows(rank):
            alone.update(rows)
    expected = {k: v.item() for k, v in alone.compute().items()}
    rank0_alone = diagnostics_from_statistics(torch.stack(_rank_rows(0)).sum((0, 1))).tolist()
    assert rank0_alone != pytest.approx([expected[d] for d in DIAGNOSTICS], rel=1e-3)  # the sync matters
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["restored"]  # compute syncs a copy; the rank keeps its own sums
        assert result["values"].keys() == expected.keys()
        for key, value in expected.items():
            assert result["values"][key] == pytest.approx(value, rel=1e-12), (rank, key)


def test_a_lightning_module_logs_the_metrics_values(tmp_path):
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel
    from lightning.pytorch.loggers import CSVLogger

    from adam_monitor import AdamMonitor

    class Model(BoringModel):
        def __init__(self):
            super().__init__()
            self.adam = AdamDiagnostics(per_parameter=True, names=[n for n, _ in self.named_parameters()], prefix="tm")
            self.computed = []

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=0.1)
            self.adam.attach(optimizer)
            return optimizer

        def on_train_batch_end(self, outputs, batch, batch_idx):
            if self.trainer.global_step % self.trainer.log_every_n_steps == 0:
                values = self.adam.compute()
                self.log_dict(values)
                self.computed.append({k: v.item() for k, v in values.items()})
                self.adam.reset()

    model = Model()
    trainer = L.Trainer(
        max_steps=10,
        log_every_n_steps=5,
        accelerator="cpu",
        logger=CSVLogger(tmp_path, name="run", version=0),
        callbacks=[AdamMonitor(per_parameter=True)],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model)
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    written = [r for r in rows if r["tm/update_rms"]]
    # AdamMonitor writes its own log points (rows of their own) at the same steps
    engine = {r["step"]: r for r in rows if r["adam/update_rms"]}
    assert len(model.computed) == len(written) == 2 and [r["step"] for r in written] == ["4", "9"]
    for values, row in zip(model.computed, written):
        assert values.keys() == {k for k in row if k.startswith(("tm/", "tm_per_parameter/"))}
        for key, value in values.items():
            assert _close(float(row[key]), value, rtol=0.0), key
            theirs = engine[row["step"]]["adam" + key.removeprefix("tm")]
            assert _close(float(theirs) if theirs else math.nan, value, rtol=1e-12), key
