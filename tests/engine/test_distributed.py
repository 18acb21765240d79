"""Same numbers on one process, DDP and FSDP2; one collective per step under sharding."""

import os
import signal
import socket
import time

import dist_workers
import pytest
import torch
import torch.multiprocessing as mp

from adam_monitor.diagnostics import NUM_STATS

pytestmark = pytest.mark.slow

STEPS, EVERY = 40, 10


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single():
    torch.manual_seed(0)
    return dist_workers.train(dist_workers.make_model(), STEPS, log_every=EVERY)


def run_ranks(fn, args, nprocs, timeout, stacks_dir):
    """``mp.spawn`` with a deadline: daemonic ranks, killed when the deadline passes, so a rank that
    hangs (in a collective, or in torch's exit) fails this test instead of the whole session, with
    the stack each rank was in when the deadline passed."""
    ctx = mp.start_processes(
        dist_workers.with_stack_dump,
        args=(fn, str(stacks_dir), *args),
        nprocs=nprocs,
        join=False,
        daemon=True,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    try:
        # join() is True once every rank has exited, False while one still runs, and raises for a
        # rank that failed.
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.0)):
            if time.monotonic() >= deadline:
                alive = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
                pytest.fail(f"ranks {alive} still running after {timeout} s\n{_stacks(ctx, alive, stacks_dir)}")
    finally:
        for process in ctx.processes:
            if process.is_alive():
                process.kill()
                process.join(5)


def _stacks(ctx, ranks, stacks_dir, wait=10.0):
    """Ask each rank for its stacks (SIGUSR1, see ``with_stack_dump``) and read what they wrote."""
    for r in ranks:
        os.kill(ctx.processes[r].pid, signal.SIGUSR1)
    files = [stacks_dir / f"rank{r}.txt" for r in ranks]
    until = time.monotonic() + wait
    while time.monotonic() < until and not all(f.exists() and "File" in f.read_text() for f in files):
        time.sleep(0.1)
    return "\n".join(
        f"rank {r}:\n{f.read_text() if f.exists() else '(no stack: still starting)'}" for r, f in zip(ranks, files)
    )


def strip_ddp_prefix(metrics):
    return {k.replace("/module.", "/"): v for k, v in metrics.items()}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_two_processes_log_what_one_process_logs(kind, single, tmp_path):
    args = (2, free_port(), kind, STEPS, EVERY, str(tmp_path))
    run_ranks(dist_workers.distributed_worker, args, nprocs=2, timeout=180, stacks_dir=tmp_path)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for res in results:
        logged = {t: strip_ddp_prefix(m) for t, m in res["logged"].items()}
        assert logged.keys() == single.keys()
        for t in single:
            assert logged[t].keys() == single[t].keys()
            for tag, value in single[t].items():
                assert logged[t][tag] == pytest.approx(value, rel=1e-4, abs=1e-12), (kind, t, tag)
    if kind == "fsdp2":
        # One packed all-reduce per optimizer step: [tensors × statistics] in one call.
        assert [len(r["collectives"]) for r in results] == [STEPS, STEPS]
        assert set(results[0]["collectives"]) == {6 * NUM_STATS}  # the model's 6 tensors
    else:
        assert results[0]["collectives"] == []  # replicas hold identical state: nothing to reduce


@pytest.mark.timeout(240)
@pytest.mark.parametrize("nan_rank", [None, 1])
def test_raise_mode_ends_every_ddp_rank_together(tmp_path, nan_rank):
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from adam_monitor import AdamMonitor
    from adam_monitor.alerts.log import alerts_path, read_alerts

    trainer = L.Trainer(
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,
        max_steps=30,
        callbacks=[AdamMonitor(on_alert="raise")],
        logger=TensorBoardLogger(tmp_path, name="run", version=0),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
    )
    # A NaN gradient at step 5 on every rank, or on rank 1 alone (the gradient all-reduce carries
    # it to rank 0): if one rank raised alone, the other would hang in the next all-reduce and the
    # test would time out.
    with pytest.raises(Exception, match="nonfinite"):
        trainer.fit(dist_workers.NanModel(nan_at=5, rank=nan_rank))
    alerts = read_alerts(alerts_path(tmp_path / "run" / "version_0"))
    assert [(a.rule, a.step) for a in alerts] == [("nonfinite", 5)]


@pytest.mark.timeout(300)
def test_lightning_model_parallel_strategy_logs_what_one_process_logs(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from adam_monitor.cli.events import read_scalars

    script = Path(__file__).with_name("lightning_fsdp2_fit.py")
    for kind in ("single", "fsdp2"):
        command = [sys.executable, str(script), kind, str(tmp_path / kind)]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=140)
        assert proc.returncode == 0, proc.stderr[-3000:]
    single = read_scalars(tmp_path / "single" / "run" / "version_0")
    sharded = read_scalars(tmp_path / "fsdp2" / "run" / "version_0")
    tags = [t for t in single if t.startswith(("adam/", "adam_per_parameter/"))]
    assert "adam_per_parameter/update_rms/net.0.weight" in tags
    for tag in tags:
        assert [s for s, _ in sharded[tag]] == [s for s, _ in single[tag]] == [4, 9, 14, 19]
        for (_, got), (_, want) in zip(sharded[tag], single[tag]):
            assert got == pytest.approx(want, rel=1e-4, abs=1e-12), tag


@pytest.mark.timeout(120)
def test_a_rank_that_hangs_fails_the_test_with_its_stack(tmp_path):
    with pytest.raises(pytest.fail.Exception, match=r"(?s)ranks \[1\] still running.*hang_on_rank"):
        run_ranks(dist_workers.hang_on_rank, (1,), nprocs=2, timeout=40, stacks_dir=tmp_path)
