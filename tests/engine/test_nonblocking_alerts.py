"""Non-blocking alerts: the rules run once a step's rows reach the host, with the same results.

On CUDA, ``blocking_alerts=False`` copies each step's rows to pinned memory without waiting and
runs the rules when the copy has landed. Here the device copy is replaced by one that lands a set
number of steps later, so the bookkeeping (order, log points, betas changes, state_dict, close) is
checked on the CPU against the blocking run. ``tests/engine/test_cuda.py`` counts the syncs on a GPU.
"""

import warnings

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from adam_monitor import AdamMonitor, InstabilityWarning, Monitor
from adam_monitor.alerts.log import alerts_path, read_alert_records
from adam_monitor.cli.events import read_scalars
from adam_monitor.engine import monitor as monitor_module


class LandsLater:
    """A host copy that becomes ready ``lag`` copies (steps) after it was started."""

    lag = 3
    started = 0

    def __init__(self, values):
        LandsLater.started += 1
        self.born = LandsLater.started
        self.tensor = values.clone()

    def ready(self) -> bool:
        return LandsLater.started - self.born >= self.lag

    def wait(self):
        return self.tensor


@pytest.fixture
def late_copies(monkeypatch):
    LandsLater.started = 0
    monkeypatch.setattr(monitor_module, "HostCopy", LandsLater)
    return LandsLater


def eventful_run(log_dir, *, blocking, steps=200, after_each_step=None):
    """Adam (0.9, 0.999) on noise, x10 at step 150, a NaN at step 125, betas broken at step 180.

    Returns the monitor (closed) and the x-axis values its alerts were recorded at.
    """
    torch.manual_seed(0)
    big = torch.nn.Parameter(torch.zeros(2048))
    small = torch.nn.Parameter(torch.zeros(16))
    opt = torch.optim.Adam([big, small], lr=1e-3, betas=(0.9, 0.999))
    clock = {"x": 0}
    monitor = Monitor(
        opt,
        named_parameters=[("big", big), ("small", small)],
        writer=SummaryWriter(str(log_dir)),
        log_every_n_steps=10,
        blocking_alerts=blocking,
        step_axis=lambda: clock["x"],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InstabilityWarning)
        for t in range(1, steps + 1):
            clock["x"] = 100 + 2 * t  # a trainer's axis that is not the optimizer's step
            if t == 180:
                opt.param_groups[0]["betas"] = (0.99, 0.95)
            scale = 10.0 if t >= 150 else 1.0
            big.grad = torch.randn(2048) * scale
            small.grad = torch.randn(16) * scale
            if t == 125:
                small.grad[3] = float("nan")
            opt.step()
            if after_each_step is not None:
                after_each_step(t, monitor)
        monitor.close()
    return monitor, read_alert_records(alerts_path(log_dir))


def described(alerts):
    return [(a.rule, a.step, a.parameter, repr(a.value), a.threshold, a.message) for a in alerts]  # repr: NaN == NaN


def test_non_blocking_alerts_equal_the_blocking_ones_and_keep_their_step_axis(tmp_path, late_copies):
    blocking, blocking_records = eventful_run(tmp_path / "blocking", blocking=True)
    rules = {a.rule for a in blocking.alerts}
    assert {"nonfinite", "stale_second_moment", "beta_coupling"} <= rules, rules

    seen_at = {}  # alert -> the optimizer step after which it was first in monitor.alerts

    def note(t, monitor):
        for a in monitor.alerts:
            seen_at.setdefault((a.rule, a.step, a.parameter), t)

    late, late_records = eventful_run(tmp_path / "late", blocking=False, after_each_step=note)
    assert described(late.alerts) == described(blocking.alerts)
    # The alert file and TensorBoard place each alert at its own step's x-axis value.
    assert [(a.rule, a.step, x) for a, x in late_records] == [(a.rule, a.step, x) for a, x in blocking_records]
    assert all(x == 100 + 2 * a.step for a, x in late_records)
    # Step rules report when the rows land (3 steps later here) or at a log point, whichever is
    # first; configuration alerts (betas) are host-side and immediate.
    for a in late.alerts:
        delay = seen_at[(a.rule, a.step, a.parameter)] - a.step
        if a.rule in ("beta_coupling", "beta_order"):
            assert delay == 0, a
        else:
            assert delay == min(late_copies.lag, -a.step % 10), (a.rule, a.step, delay)
    # Each log point counts every alert up to it: the rules caught up before it was written.
    logged = dict(read_scalars(tmp_path / "late")["adam/alerts"])
    expected = dict(read_scalars(tmp_path / "blocking")["adam/alerts"])
    assert logged == expected


def test_state_dict_and_summary_include_steps_still_in_flight(late_copies):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(1024))
    opt = torch.optim.Adam([p], betas=(0.9, 0.999))
    monitor = Monitor(opt, log_every_n_steps=None, blocking_alerts=False)
    for t in range(1, 151):
        p.grad = torch.randn(1024) * (10.0 if t >= 149 else 1.0)  # a lasting jump: judged at its second step
        opt.step()
    assert monitor.alerts == []  # step 150's rows have not landed
    with pytest.warns(InstabilityWarning, match="stale_second_moment at step 150"):
        state = monitor.state_dict()
    assert [(a.rule, a.step) for a in monitor.alerts] == [("stale_second_moment", 150)]
    assert state["optimizers"][0]["rules"]["last_step"] == 150
    assert monitor.check_alerts() == []
    monitor.close()


def test_the_default_blocks_only_where_an_alert_must_act_on_its_step():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.Adam([p])
    assert Monitor(opt).options.blocking is False
    assert Monitor(opt, on_alert="raise").options.blocking is True
    assert Monitor(opt, on_alert="stop").options.blocking is True
    assert Monitor(opt, on_alert="raise", blocking_alerts=False).options.blocking is False
    with pytest.raises(ValueError, match="blocking_alerts"):
        Monitor(opt, blocking_alerts="yes")
    with pytest.raises(ValueError, match="blocking_alerts"):
        AdamMonitor(blocking_alerts=1)
