"""Alerts end to end: policies, alerts.jsonl, TensorBoard, the CLI gate."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from support import AdamBoring, quiet_trainer
from torch.utils.tensorboard import SummaryWriter

from adam_monitor import AdamMonitor, InstabilityError, InstabilityWarning, Monitor
from adam_monitor.alerts.log import alerts_path, read_alerts
from adam_monitor.cli import main as cli
from adam_monitor.cli.events import read_scalars


def BetasBoring(betas):
    return AdamBoring(betas, optimizer=torch.optim.Adam, lr=1e-3)


def trainer(tmp_path, callbacks, max_steps=8, **kwargs):
    return quiet_trainer(tmp_path, callbacks=callbacks, max_steps=max_steps, log_every_n_steps=2, **kwargs)


def test_unstable_betas_in_raise_mode_fail_the_fit_and_the_alert_is_on_disk(tmp_path):
    t = trainer(tmp_path, [AdamMonitor(on_alert="raise")], enable_checkpointing=False)
    with pytest.raises(InstabilityError, match="beta_coupling") as err:
        t.fit(BetasBoring((0.99, 0.95)))
    assert t.global_step == 0  # caught at fit start, before any step
    (alert,) = read_alerts(alerts_path(t.logger.log_dir))
    assert (alert.rule, alert.severity, alert.step) == ("beta_coupling", "error", 1)
    assert "beta2" in alert.message and err.value.alerts == [alert]


def test_stop_mode_stops_gracefully_then_fails(tmp_path, capsys):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    t = trainer(tmp_path, [AdamMonitor(on_alert="stop"), ckpt], max_steps=50)
    with pytest.raises(InstabilityError, match="beta_coupling"):
        t.fit(BetasBoring((0.99, 0.95)))
    assert t.global_step == 1  # the batch in flight finished, then the loop stopped
    assert not (tmp_path / "ckpt").exists() or not list((tmp_path / "ckpt").iterdir())  # no post-alert state saved
    assert [a.rule for a in read_alerts(alerts_path(t.logger.log_dir))] == ["beta_coupling"]
    assert "beta_coupling" in capsys.readouterr().out  # the end-of-fit summary table


def test_info_alerts_are_recorded_and_never_acted_on(tmp_path, caplog):
    # β1 ≥ β2 > β1²: bounded (B_inf finite), a choice to know about: info, even under fail_on="warning".
    cb = AdamMonitor(on_alert="stop", fail_on="warning")
    t = trainer(tmp_path, [cb], max_steps=8, enable_checkpointing=False)
    with warnings.catch_warnings(), caplog.at_level("INFO", logger="adam_monitor"):
        warnings.simplefilter("error", InstabilityWarning)
        t.fit(BetasBoring((0.9, 0.85)))
    assert t.global_step == 8
    (alert,) = read_alerts(alerts_path(t.logger.log_dir))
    assert (alert.rule, alert.severity) == ("beta_order", "info")
    assert "beta_order" in caplog.text
    assert cli(["check", t.logger.log_dir]) == 0
    assert cli(["check", t.logger.log_dir, "--fail-on", "error"]) == 0


def test_check_does_not_accept_info_as_a_gate(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli(["check", str(tmp_path), "--fail-on", "info"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(ValueError, match="fail_on"):
        AdamMonitor(fail_on="info")


def test_warn_mode_warns_once_and_the_run_goes_on(tmp_path):
    cb = AdamMonitor()
    t = trainer(tmp_path, [cb], enable_checkpointing=False)
    with pytest.warns(InstabilityWarning, match="beta_coupling"):
        t.fit(BetasBoring((0.99, 0.95)))
    assert t.global_step == 8
    assert [a.rule for a in cb.alerts] == ["beta_coupling"]
    scalars = read_scalars(t.logger.log_dir)
    assert scalars["adam/alerts"][-1][1] == 1.0


def test_a_nan_at_one_step_gives_one_nonfinite_alert(tmp_path):
    p = torch.nn.Parameter(torch.zeros(512))
    opt = torch.optim.Adam([p], betas=(0.9, 0.95))
    writer = SummaryWriter(str(tmp_path))
    monitor = Monitor(opt, named_parameters=[("w", p)], writer=writer, log_every_n_steps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InstabilityWarning)
        for t in range(1, 60):
            p.grad = torch.randn(512)
            if t == 20:
                p.grad[7] = float("nan")  # from here on NaN lives in the optimizer state too
            opt.step()
    monitor.close()
    nonfinite = [a for a in monitor.alerts if a.rule == "nonfinite"]
    assert len(nonfinite) == 1 and nonfinite[0].step == 20 and nonfinite[0].parameter == "w"
    assert [a.rule for a in read_alerts(alerts_path(tmp_path))].count("nonfinite") == 1


def noise_run_alerts(*, size, steps, jump_at=None, resume_at=None):
    """Alerts of torch Adam (0.9, 0.999) on i.i.d. N(0, 1) gradients, ×10 from ``jump_at`` on.

    ``resume_at``: rebuild optimizer and monitor from their (serialized) state before that step.
    """
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(size))
    opt = torch.optim.Adam([p], lr=1e-3, betas=(0.9, 0.999))
    monitor = Monitor(opt, log_every_n_steps=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InstabilityWarning)
        for t in range(1, steps + 1):
            if t == resume_at:
                opt_state, mon_state = opt.state_dict(), monitor.state_dict()
                monitor.close()
                opt = torch.optim.Adam([p], lr=1e-3, betas=(0.9, 0.999))
                opt.load_state_dict(opt_state)
                monitor = Monitor(opt, log_every_n_steps=None)
                monitor.load_state_dict(torch.load(_roundtrip(mon_state), weights_only=True))
            p.grad = torch.randn(size) * (10.0 if jump_at and t >= jump_at else 1.0)
            opt.step()
    monitor.close()
    return [(a.rule, a.step, a.parameter) for a in monitor.alerts]


def test_a_lasting_noise_jump_alerts_one_step_after_it_and_stationary_noise_does_not():
    assert noise_run_alerts(size=2048, steps=1520) == []
    assert noise_run_alerts(size=2048, steps=1520, jump_at=1500)[0][:2] == ("stale_second_moment", 1501)


def test_alerts_written_before_a_kill_stay_readable(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from adam_monitor import Monitor
        p = torch.nn.Parameter(torch.zeros(8))
        opt = torch.optim.Adam([p], betas=(0.99, 0.95))
        monitor = Monitor(opt, log_dir={str(tmp_path)!r}, log_every_n_steps=None)
        p.grad = torch.ones(8)
        opt.step()
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert [a.rule for a in read_alerts(alerts_path(tmp_path))] == ["beta_coupling"]
    assert cli(["check", str(tmp_path)]) == 1


def test_a_resumed_monitor_does_not_repeat_configuration_alerts(tmp_path):
    p = torch.nn.Parameter(torch.zeros(8))
    opt = torch.optim.Adam([p], betas=(0.99, 0.95))
    with pytest.warns(InstabilityWarning):
        monitor = Monitor(opt, log_dir=str(tmp_path), log_every_n_steps=None)
        p.grad = torch.ones(8)
        opt.step()
    state = monitor.state_dict()
    monitor.close()
    resumed = Monitor(opt, log_dir=str(tmp_path), log_every_n_steps=None)
    resumed.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InstabilityWarning)
        opt.step()
    resumed.close()
    assert [a.rule for a in resumed.alerts] == ["beta_coupling"]
    assert len(read_alerts(alerts_path(tmp_path))) == 1


def test_bad_options_name_the_option():
    with pytest.raises(ValueError, match="on_alert"):
        AdamMonitor(on_alert="explode")
    with pytest.raises(ValueError, match="fail_on"):
        AdamMonitor(fail_on="info")
    with pytest.raises(ValueError, match="log_every_n_steps"):
        AdamMonitor(log_every_n_steps=0)


# ---------------------------------------------------------------------------------------- CLI
def make_run(root, rules, steps=10):
    path = alerts_path(root)
    path.parent.mkdir(parents=True)
    monitored = [{"optimizer": "Adam", "class": "Adam", "parameters": 2, "steps": steps}]
    (path.parent / "run.json").write_text(json.dumps({"format": 1, "closed": True, "monitored": monitored}))
    with open(path, "w") as f:
        for i, (rule, severity) in enumerate(rules):
            f.write(
                json.dumps(
                    dict(
                        rule=rule,
                        severity=severity,
                        step=i + 1,
                        message="m",
                        optimizer="Adam",
                        parameter=None,
                        value=2.0,
                        threshold=1.0,
                    )
                )
                + "\n"
            )
    return root


def test_check_exit_codes(tmp_path, capsys):
    clean = make_run(tmp_path / "clean", [])
    warned = make_run(tmp_path / "warned", [("stale_second_moment", "warning")])
    assert cli(["check", str(clean)]) == 0
    assert cli(["check", str(warned)]) == 1
    assert cli(["check", str(warned), "--fail-on", "error"]) == 0
    assert cli(["check", str(tmp_path)]) == 1  # a folder of runs: any failing run fails
    out = capsys.readouterr().out
    assert "stale_second_moment" in out and "FAIL" in out
    (tmp_path / "empty").mkdir()
    assert cli(["check", str(tmp_path / "empty")]) == 2
    assert "no monitor data" in capsys.readouterr().err
    assert cli(["check", str(tmp_path / "missing")]) == 2
    broken = make_run(tmp_path / "broken", [])
    alerts_path(broken).write_text("not json\n{}\n")
    assert cli(["check", str(broken)]) == 2
    assert "broken/adam_monitor/alerts.jsonl:1: not an alert record: not JSON" in capsys.readouterr().err


def test_check_json_and_a_truncated_last_line(tmp_path, capsys):
    run = make_run(tmp_path / "r", [("nonfinite", "error")])
    with open(alerts_path(run), "a") as f:
        f.write('{"rule": "nonfin')  # the write a kill interrupted
    assert cli(["check", str(run), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    first, torn = report["runs"][0]["alerts"]
    assert report["failing"] == 2 and first["rule"] == "nonfinite"
    # the cut took the severity: the torn record counts as an error, shown as it began
    assert (torn["rule"], torn["severity"]) == ("torn_record", "error")
    assert report["runs"][0]["torn_last_line"] == '{"rule": "nonfin'
    assert read_alerts(alerts_path(run))[-1].rule == "nonfinite"  # readers of complete records skip it


def test_check_as_an_installed_console_script(tmp_path):
    run = make_run(tmp_path / "r", [])
    exe = os.path.join(os.path.dirname(sys.executable), "adam-monitor")
    assert subprocess.run([exe, "check", str(run)], capture_output=True).returncode == 0


def test_bound_prints_the_table(capsys):
    assert cli(["bound", "--beta1", "0.9", "--beta2", "0.999"]) == 0
    assert "7.27" in capsys.readouterr().out
    assert cli(["bound", "--beta1", "1.5", "--beta2", "0.999"]) == 2
    assert "beta1" in capsys.readouterr().err


def test_resume_mid_run_gives_the_same_alerts_as_an_uninterrupted_run():
    uninterrupted = noise_run_alerts(size=1024, steps=1530, jump_at=1500)
    assert uninterrupted and uninterrupted[0][:2] == ("stale_second_moment", 1501)
    # A checkpoint between the jump and the update's peak: the alert episode carries over.
    assert noise_run_alerts(size=1024, steps=1530, jump_at=1500, resume_at=1501) == uninterrupted


def _roundtrip(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_report_plots_runs_with_their_alerts(tmp_path, capsys):
    p = torch.nn.Parameter(torch.zeros(512))
    opt = torch.optim.Adam([p], betas=(0.9, 0.95))
    writer = SummaryWriter(str(tmp_path / "run"))
    monitor = Monitor(opt, writer=writer, log_every_n_steps=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InstabilityWarning)
        for t in range(1, 41):
            p.grad = torch.randn(512)
            if t == 20:
                p.grad[0] = float("nan")
            opt.step()
            writer.add_scalar("train/loss", 1.0 / t, t)
    monitor.close()
    writer.close()
    out = tmp_path / "report.png"
    assert cli(["report", str(tmp_path), "-o", str(out)]) == 0
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"
    assert cli(["report", str(tmp_path / "nothing"), "-o", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def _alerts_with_betas(betas_at, steps: int, start=(0.9, 0.95)) -> list[tuple[str, str, int]]:
    """(rule, severity, step) of the alerts of an Adam run whose group gets ``betas_at(t)`` before step t."""
    p = torch.nn.Parameter(torch.zeros(8))
    opt = torch.optim.Adam([p], betas=start)
    monitor = Monitor(opt, log_every_n_steps=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InstabilityWarning)
        for t in range(1, steps + 1):
            opt.param_groups[0]["betas"] = betas_at(t)
            p.grad = torch.randn(8)
            opt.step()
    monitor.close()
    return [(a.rule, a.severity, a.step) for a in monitor.alerts]


def test_a_beta2_schedule_rising_through_beta1_squared_is_info_and_one_that_stops_below_it_an_error():
    # PaLM's and Adafactor's beta2_t = 1 - t^-0.8 starts at 0, below beta1^2 = 0.81 until step 8;
    # HeavyBall's palm=True writes it into the group's betas inside each step.
    def palm(stop_at=None):
        return lambda t: (0.9, 1 - min(t, stop_at or t) ** -0.8)

    assert _alerts_with_betas(palm(), 29, start=(0.9, 0.99)) == [("beta_order", "info", 2)]  # then beta1 >= beta2
    assert _alerts_with_betas(palm(stop_at=4), 29, start=(0.9, 0.99)) == [
        ("beta_order", "info", 2),
        ("beta_coupling", "error", 5),
    ]


def test_betas_changed_mid_run_are_checked_again():
    # e.g. a momentum schedule gone wrong at step 6
    alerts = _alerts_with_betas(lambda t: (0.99, 0.95) if t >= 6 else (0.9, 0.95), 10)
    assert alerts == [("beta_coupling", "error", 6)]


def test_repeated_warnings_of_a_rule_are_condensed_and_every_alert_is_kept(tmp_path):
    from adam_monitor import Alert
    from adam_monitor.engine.policy import REPEAT_WARNING_STEPS

    p = torch.nn.Parameter(torch.zeros(8))
    monitor = Monitor(torch.optim.Adam([p]), log_dir=str(tmp_path), log_every_n_steps=None)

    def alert(rule, step, severity="warning", optimizer="Adam"):
        return Alert(rule, severity, step, f"{rule} text at {step}", optimizer, "w", 2.0, 1.0)

    growth = [10, 12, 40, 10 + REPEAT_WARNING_STEPS, 10 + REPEAT_WARNING_STEPS + 5]
    raised = [alert("gradient_growth", s) for s in growth]
    raised += [alert("stale_second_moment", 20), alert("gradient_growth", 30, optimizer="Adam[1]")]
    raised += [alert("nonfinite", 50, "error"), alert("nonfinite", 60, "error")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for a in sorted(raised, key=lambda a: a.step):
            monitor._policy.handle([a], a.step)
        monitor.close()
    lines = [str(w.message) for w in caught if issubclass(w.category, InstabilityWarning)]
    where = alerts_path(tmp_path)
    assert lines == [
        "adam-monitor [warning] gradient_growth at step 10: gradient_growth text at 10",
        "adam-monitor [warning] stale_second_moment at step 20: stale_second_moment text at 20",
        "adam-monitor [warning] gradient_growth at step 30: gradient_growth text at 30",  # another optimizer
        "adam-monitor [error] nonfinite at step 50: nonfinite text at 50",  # errors: always in full
        "adam-monitor [error] nonfinite at step 60: nonfinite text at 60",
        f"adam-monitor [warning] gradient_growth: 3 more alerts on Adam after step 10, the latest at step "
        f"{10 + REPEAT_WARNING_STEPS} (w); each one is in {where}",
        f"adam-monitor [warning] gradient_growth: 1 more alert on Adam after step {10 + REPEAT_WARNING_STEPS}, "
        f"the latest at step {15 + REPEAT_WARNING_STEPS} (w); each one is in {where}",  # at close()
    ]
    assert monitor.alerts == sorted(raised, key=lambda a: a.step)
    assert read_alerts(where) == monitor.alerts


@pytest.mark.parametrize("beta2,rules", [(0.7, ["beta_coupling"]), (0.999, [])])
def test_a_beta_schedule_is_one_configuration_episode_and_keeps_the_rules(beta2, rules):
    # OneCycleLR's default cycle_momentum moves beta1 between 0.85 and 0.95 every step.
    model = torch.nn.Linear(32, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, beta2))
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InstabilityWarning)
        monitor = Monitor(opt, log_every_n_steps=None)
        seen_betas, seen_rules = set(), set()
        for _ in range(60):
            model(torch.randn(8, 32)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            schedule.step()
            monitor.check_alerts()
            seen_betas.add(opt.param_groups[0]["betas"][0])
            seen_rules.add(id(monitor._tracked[0].rules))
        monitor.close()
    assert len(seen_betas) > 50  # the schedule did move beta1 every step
    assert len(seen_rules) == 1  # one AlertRules for the run: its state carried over
    assert [a.rule for a in monitor.alerts] == rules


def test_a_configuration_condition_that_clears_and_returns_is_a_new_episode():
    p = torch.nn.Parameter(torch.zeros(8))
    opt = torch.optim.Adam([p], betas=(0.99, 0.95))
    monitor = Monitor(opt, log_every_n_steps=None)
    with pytest.warns(InstabilityWarning):
        for betas in [(0.99, 0.95), (0.98, 0.95), (0.9, 0.999), (0.99, 0.95), (0.99, 0.95)]:
            opt.param_groups[0]["betas"] = betas
            p.grad = torch.ones(8)
            opt.step()
            monitor.check_alerts()
    monitor.close()
    # β2 fell at step 4: judged at step 5, once it shows that no schedule is raising it again
    assert [(a.rule, a.step) for a in monitor.alerts] == [("beta_coupling", 1), ("beta_coupling", 5)]
