"""The monitor's host transfers: a fixed handful per step and one per log point, never one per tensor."""

import pytest
import torch

from adam_monitor import Monitor


class TransferCounter:
    """Counts Tensor.item / tolist / cpu / __float__ calls (the ways a value reaches the host)."""

    NAMES = ("item", "tolist", "cpu", "__float__", "__int__", "__bool__")

    def __init__(self, monkeypatch):
        self.calls = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                self.calls.append(_name)
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)

    def take(self):
        calls, self.calls = self.calls, []
        return calls


def transfers_per_step(params, opt, grads, counter):
    per_step = []
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g
        counter.take()
        opt.step()
        per_step.append(len(counter.take()))
    return per_step


@pytest.mark.parametrize("num_tensors", [3, 40])
def test_transfers_per_step_do_not_grow_with_the_number_of_tensors(monkeypatch, num_tensors):
    def make():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(64)) for _ in range(num_tensors)]
        return params, torch.optim.Adam(params, betas=(0.9, 0.95))

    grads = [[torch.randn(64) for _ in range(num_tensors)] for _ in range(12)]
    counter = TransferCounter(monkeypatch)
    # torch's own for-loop Adam reads each step count with .item(): that is the baseline.
    params, opt = make()
    baseline = transfers_per_step(params, opt, grads, counter)
    params, opt = make()
    monitor = Monitor(opt, log_every_n_steps=None)
    counter.take()
    monitored = transfers_per_step(params, opt, grads, counter)
    added = [m - b for m, b in zip(monitored, baseline)]
    # One read of all step counts (CPU-resident unless fused) and one small vector for the rules.
    assert max(added) <= 2, added
    monitor.flush()
    assert len(counter.take()) == 1  # the whole log point: pooled and per-tensor values at once
    monitor.close()
