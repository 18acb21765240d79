"""The device plumbing's user-visible behaviour: compilation announces itself."""

import torch

from adam_monitor._runtime import compile_per_configuration


def _double(x):
    return x * 2


def test_the_first_call_of_a_compiled_configuration_says_it_compiles(capsys):
    fn = compile_per_configuration(_double, "double_for_the_notice_test", backend="eager")
    assert compile_per_configuration(_double, "double_for_the_notice_test", backend="eager") is fn
    assert torch.equal(fn(torch.ones(3)), torch.full((3,), 2.0))
    first = capsys.readouterr().err
    assert "adam-monitor: compiling double_for_the_notice_test" in first
    assert "adam-monitor: compiled double_for_the_notice_test in" in first
    assert "ADAM_MONITOR_EAGER=1" in first
    fn(torch.ones(3))
    assert capsys.readouterr().err == ""  # once per process and configuration
