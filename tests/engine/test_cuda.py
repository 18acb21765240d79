"""The CUDA paths: compiled optimizer steps and statistics against their specifications, host
synchronizations per step, a Lightning run in bf16. Skipped where no CUDA device is present."""

from __future__ import annotations

import warnings

import pytest
import torch

from adam_monitor import Monitor
from adam_monitor.diagnostics import adam_statistics
from adam_monitor.diagnostics.compiled import fast_adam_statistics
from adam_monitor.optim import Adam, AdamAtan2, LaProp, StableAdamW

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
# Two heads (one with a tail), a tensor just over the head size, small ones for the batch.
SHAPES = ((80, 1024), (300, 221), (64, 33), (5, 7), (1,))
VARIANTS = {
    "Adam": lambda ps, compiled: Adam(
        ps, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, momentum_bias_correction=True, compiled=compiled
    ),
    "LaProp": lambda ps, compiled: LaProp(ps, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, compiled=compiled),
    "AdamAtan2": lambda ps, compiled: AdamAtan2(ps, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, compiled=compiled),
    "StableAdamW": lambda ps, compiled: StableAdamW(
        ps, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, compiled=compiled
    ),
}


def cuda_params(shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(CUDA)) for s in shapes]


def gradients(params, steps, seed=1):
    """Random gradients whose scale wanders over four orders of magnitude from step to step."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        scale = 10 ** (4 * torch.rand((), generator=gen).item() - 2)
        out.append([(scale * torch.randn(p.shape, generator=gen)).to(CUDA) for p in params])
    return out


def follows_the_specification(make, compiled, record: bool, steps: int = 4):
    """Step ``make(params, compiled)`` and the eager specification on twin params with the same
    gradients; params, moments (and statistics rows) agree after every step."""
    params = cuda_params()
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fast, spec = make(params, compiled), make(twins, False)
    fast.record_statistics = spec.record_statistics = record
    for step_grads in gradients(params, steps):
        for p, q, g in zip(params, twins, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        fast.step()
        spec.step()
        for p, q in zip(params, twins):
            torch.testing.assert_close(p, q, rtol=2e-5, atol=1e-6)
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(fast.state[p][key], spec.state[q][key], rtol=2e-5, atol=1e-6)
            if record:
                torch.testing.assert_close(fast.last_statistics[p], spec.last_statistics[q], rtol=1e-5, atol=1e-6)
    return fast


@pytest.mark.parametrize("name", VARIANTS)
def test_compiled_step_matches_the_eager_specification_on_cuda(name):
    fast = follows_the_specification(VARIANTS[name], True, record=True)
    assert fast._compiled_steps.enabled is True
    assert all(row.device.type == "cuda" for row in fast.last_statistics.values())


@pytest.mark.parametrize("name", VARIANTS)
def test_default_cuda_step_matches_the_specification(monkeypatch, name):
    # compiled=None without statistics: torch's fused AdamW kernel for Adam, multi-tensor kernels else
    import adam_monitor.optim.adam as adam_module
    from adam_monitor.optim import foreach

    calls = []
    for route in ("foreach_step_", "torch_fused_step_"):
        original = getattr(foreach, route)
        monkeypatch.setattr(adam_module, route, lambda *a, _r=route, _f=original, **k: calls.append(_r) or _f(*a, **k))
    follows_the_specification(VARIANTS[name], None, record=False)
    assert calls == ["torch_fused_step_" if name == "Adam" else "foreach_step_"] * 4


def test_fast_statistics_on_cuda_equal_the_float64_reference():
    params = cuda_params()
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), compiled=True)
    for step_grads in gradients(params, 3):
        for p, g in zip(params, step_grads):
            p.grad = g
        opt.step()
    lists = [
        [p.grad for p in params],
        [opt.state[p]["exp_avg"] for p in params],
        [opt.state[p]["exp_avg_sq"] for p in params],
    ]
    kw = dict(beta1=0.9, beta2=0.95, eps=1e-8, step=3)
    reference = adam_statistics(*([t.double().cpu() for t in ts] for ts in lists), **kw)
    for compiled in (True, False, None):  # None: the default, the compiled path
        fast = fast_adam_statistics(*lists, **kw, compiled=compiled)
        torch.testing.assert_close(fast.cpu(), reference, rtol=1e-5, atol=1e-6)


def synchronizations(fn) -> int:
    """How many synchronizing CUDA operations ``fn`` runs (torch's sync debug mode)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def per_step_syncs(
    make_optimizer,
    num_tensors: int,
    monitored: bool,
    steps: int = 6,
    blocking_alerts: bool | None = None,
    numel: int = 4096,
) -> tuple[list[int], int | None]:
    params = [torch.nn.Parameter(torch.randn(numel, device=CUDA)) for _ in range(num_tensors)]
    opt = make_optimizer(params)
    monitor = Monitor(opt, log_every_n_steps=None, blocking_alerts=blocking_alerts) if monitored else None
    counts = []
    for step in range(steps + 2):
        for p in params:
            p.grad = torch.randn_like(p)
        count = synchronizations(opt.step)
        if step >= 2:  # the first steps compile
            counts.append(count)
    flush = None
    if monitor is not None:
        flush = synchronizations(monitor.flush)
        monitor.close()
    return counts, flush


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda ps: torch.optim.AdamW(ps, betas=(0.9, 0.95), fused=True),
        lambda ps: torch.optim.AdamW(ps, betas=(0.9, 0.95), foreach=True),
        lambda ps: Adam(ps, betas=(0.9, 0.95), compiled=True),
    ],
    ids=["torch-fused", "torch-foreach", "adam_monitor-Adam"],
)
def test_monitor_adds_no_sync_per_step_on_cuda_unless_alerts_block(make_optimizer):
    # The fused kernel's device-resident step counts are read at the first step only (the counted
    # steps start at the third); the rules' rows travel without a sync unless alerts block.
    # Tensors of 4096 elements take the eager statistics, those of 300,000 the compiled ones.
    for num_tensors, numel in ((3, 4096), (40, 4096), (3, 300_000)):
        baseline, _ = per_step_syncs(make_optimizer, num_tensors, monitored=False, numel=numel)
        for blocking, rules_syncs in ((None, 0), (True, 1)):
            monitored, flush = per_step_syncs(
                make_optimizer, num_tensors, monitored=True, blocking_alerts=blocking, numel=numel
            )
            added = [m - b for m, b in zip(monitored, baseline)]
            print(
                f"{num_tensors} tensors of {numel}, blocking_alerts={blocking}: syncs per step {baseline} alone, "
                f"{monitored} monitored; flush {flush}"
            )
            assert max(added) <= rules_syncs, (num_tensors, blocking, added)
            assert flush is not None and flush <= 1


def test_lightning_bf16_run_on_cuda_logs_and_checks(tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from adam_monitor import AdamMonitor
    from adam_monitor.cli.events import read_scalars
    from examples.quickstart import Regressor, data

    monitor = AdamMonitor(log_every_n_steps=10)
    trainer = L.Trainer(
        accelerator="cuda",
        devices=1,
        precision="bf16-mixed",
        max_steps=60,
        callbacks=[monitor],
        logger=TensorBoardLogger(tmp_path, name="run"),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Regressor(), data())
    scalars = read_scalars(trainer.logger.log_dir)
    assert any(tag.startswith("adam/") for tag in scalars), sorted(scalars)[:10]
    assert [a for a in monitor.alerts if a.severity == "error"] == []
