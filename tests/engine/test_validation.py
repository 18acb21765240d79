"""Bad input is refused at construction, naming what to fix; a bad state changes nothing."""

import math

import numpy as np
import pytest
import torch
from support import no_warnings

from adam_monitor import AdamMonitor, Monitor, Thresholds


def adam(n=2):
    params = [torch.nn.Parameter(torch.randn(300)) for _ in range(n)]
    return params, torch.optim.AdamW(params)


def monitored_steps(steps=3):
    """(params, optimizer, Monitor) after ``steps`` AdamW steps on random gradients."""
    params, opt = adam()
    monitor = Monitor(opt, log_every_n_steps=None)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(300)
        opt.step()
    return params, opt, monitor


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(stale_peak="2"), r"Thresholds.stale_peak must be a number, got '2'"),
        (dict(growth_steps=2.0), r"Thresholds.growth_steps must be an int"),
        (dict(eps_steps=np.int64(3)), None),  # numpy integers are ints
        (dict(spike_ratio=math.nan), r"Thresholds.spike_ratio must be a number, got nan"),
        (dict(spike_decay=True), r"Thresholds.spike_decay must be a number"),
        (dict(stale_clear=3.0), r"Thresholds.stale_clear must be in \(0, stale_peak\]"),
        (dict(bound_factor=math.inf), None),
    ],
)
def test_thresholds_check_types_before_ranges(kwargs, match):
    if match is None:
        Thresholds(**kwargs)
    else:
        with pytest.raises(ValueError, match=match):
            Thresholds(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(thresholds={"stale_peak": 3}), r"AdamMonitor\(thresholds=...\) must be an adam_monitor.Thresholds"),
        (dict(thresholds="strict"), r"AdamMonitor\(thresholds=...\)"),
        (dict(per_parameter="no"), r"AdamMonitor\(per_parameter=...\) must be True or False"),
        (dict(on_alert="stop!"), r"AdamMonitor\(on_alert=...\) must be one of 'warn', 'raise', 'stop'"),
        (dict(log_every_n_steps=0), r"AdamMonitor\(log_every_n_steps=...\)"),
    ],
)
def test_callback_options_are_checked_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamMonitor(**kwargs)


def test_monitor_inputs_are_checked_at_construction():
    params, opt = adam()
    with pytest.raises(TypeError, match=r"Monitor\(optimizer\): expected a torch.optim.Optimizer .* got NoneType"):
        Monitor(None)
    with pytest.raises(TypeError, match=r"got an empty sequence"):
        Monitor([])
    with pytest.raises(TypeError, match=r"Monitor\(writer=...\) must be a TensorBoard SummaryWriter.*log_dir=path"):
        Monitor(opt, writer="runs/x")
    with pytest.raises(TypeError, match=r"Monitor\(log_dir=...\) must be a path"):
        Monitor(opt, log_dir=3)
    with pytest.raises(TypeError, match=r"Monitor\(scalar_sink=...\) must be a function"):
        Monitor(opt, scalar_sink="tb")
    with pytest.raises(TypeError, match=r"named_parameters must yield \(name, tensor\) pairs"):
        Monitor(opt, named_parameters=["w", "b"])
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) 'log_every'"):
        Monitor(opt, log_every=5)
    assert not any(opt._optimizer_step_post_hooks.values() if hasattr(opt, "_optimizer_step_post_hooks") else [])


def test_one_name_for_two_tensors_is_refused():
    params, opt = adam()
    with pytest.raises(ValueError, match=r"names two different tensors 'w'.*own name"):
        Monitor(opt, named_parameters=[("w", params[0]), ("w", params[1])])
    # torch.compile's wrapper prefix is dropped before the comparison
    with pytest.raises(ValueError, match=r"'lin.weight'"):
        Monitor(opt, named_parameters={"_orig_mod.lin.weight": params[0], "lin.weight": params[1]})


def test_names_of_another_model_are_warned_naming_the_parameter():
    params, opt = adam()
    other = torch.nn.Linear(3, 3)
    with pytest.warns(
        UserWarning, match=r"no name for 2 of the 2 parameters of AdamW \(first: group0.param0 \(300,\)\)"
    ):
        monitor = Monitor(opt, named_parameters=other.named_parameters())
    monitor.close()
    with no_warnings():  # the model's own names: silent
        Monitor(opt, named_parameters=[("a", params[0]), ("b", params[1])]).close()


def test_a_state_that_does_not_fit_raises_and_changes_nothing():
    params, opt, monitor = monitored_steps()
    before = monitor.state_dict()
    three, opt3 = adam(3)
    other = Monitor(opt3, log_every_n_steps=None)
    for p in three:
        p.grad = torch.randn(300)
    opt3.step()
    with pytest.raises(ValueError, match=r"for 3 tensors, these rules watch 2"):
        monitor.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match=r"not a Monitor.state_dict\(\)"):
        monitor.load_state_dict({"optimizers": [{"sums": None}]})
    after = monitor.state_dict()
    torch.testing.assert_close(after["optimizers"][0]["sums"], before["optimizers"][0]["sums"])
    assert after["optimizers"][0]["step"] == 3
    for p in params:  # and the run goes on
        p.grad = torch.randn(300)
    opt.step()
    assert monitor.compute()["adam/update_rms"] > 0
    monitor.close()
    other.close()


def test_sums_saved_before_grad_count_resume_with_the_diagnostics_they_gave():
    from adam_monitor.diagnostics import COUNT, GRAD_COUNT, diagnostics_from_statistics

    params, opt, monitor = monitored_steps()
    state = monitor.state_dict()
    sums = state["optimizers"][0]["sums"]
    # the layout of a checkpoint written before the grad_count column: every coordinate counted
    legacy = torch.cat([sums[:, :GRAD_COUNT], sums[:, COUNT:]], dim=1)
    state["optimizers"][0]["sums"] = legacy
    resumed = Monitor(adam()[1], log_every_n_steps=None)
    resumed.load_state_dict(state)
    widened = resumed.state_dict()["optimizers"][0]["sums"]
    assert widened.shape == sums.shape
    torch.testing.assert_close(widened[:, GRAD_COUNT], widened[:, COUNT])
    torch.testing.assert_close(diagnostics_from_statistics(widened), diagnostics_from_statistics(sums))
    monitor.close()
    resumed.close()
