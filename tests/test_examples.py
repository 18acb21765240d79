"""Every example runs as a user would run it."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adam_monitor.cli import main as cli
from adam_monitor.cli.events import read_scalars

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(*args, cwd):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_plain_loop(tmp_path):
    run(EXAMPLES / "plain_loop.py", "--steps", "40", "--logdir", tmp_path / "plain", cwd=tmp_path)
    scalars = read_scalars(tmp_path / "plain")
    assert [s for s, _ in scalars["adam/update_rms"]] == [10, 20, 30, 40]
    assert "adam_per_parameter/update_rms/0.weight" in scalars
    assert cli(["check", str(tmp_path / "plain")]) == 0


def test_fabric_loop(tmp_path):
    run(EXAMPLES / "fabric_loop.py", "--steps", "20", "--logdir", tmp_path / "fabric", cwd=tmp_path)
    scalars = read_scalars(tmp_path / "fabric")
    assert "adam_per_parameter/update_rms/0.weight" in scalars  # no Fabric wrapper prefix in names


def test_lightning_cli_adds_the_callback_by_class_path(tmp_path):
    run(
        EXAMPLES / "lightning_cli.py",
        "fit",
        "--config",
        EXAMPLES / "adam_monitor.yaml",
        "--trainer.max_steps",
        "20",
        "--trainer.enable_progress_bar",
        "false",
        cwd=tmp_path,
    )
    (run_dir,) = (tmp_path / "runs" / "lightning_cli").iterdir()
    assert "adam/staleness" in read_scalars(run_dir)
    assert cli(["check", str(run_dir)]) == 0


@pytest.mark.slow
def test_the_spike_demo_forecasts_the_spike_and_the_fix_prevents_it(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import spike_demo

    runs = spike_demo.main(["--root", str(tmp_path)])
    losses, alerts, _ = runs["default_betas_0.9_0.999"]
    spikes = spike_demo.loss_spikes(losses)
    first = alerts[0]
    # The return is judged once it has lasted a step, the step the loss crosses 3x its median; the
    # overshoot it predicts peaks later.
    assert (first.rule, first.step) == ("stale_second_moment", spike_demo.RETURN + 1)
    assert spikes and spikes[0] >= first.step
    assert spike_demo.RETURN + int(np.argmax(losses[spike_demo.RETURN - 1 :])) > first.step  # losses[i]: step i + 1
    assert max(losses[spike_demo.RETURN :]) > 5 * losses[spike_demo.RETURN - 2]
    fixed_losses, fixed_alerts, _ = runs["fixed_betas_0.9_0.95"]
    assert spike_demo.loss_spikes(fixed_losses) == []
    assert all(a.rule in spike_demo.REGIME_RULES and a.severity == "info" for a in fixed_alerts)
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert "stale_second_moment" in capsys.readouterr().out
    assert cli(["check", str(tmp_path)]) == 1
    assert cli(["check", str(tmp_path / "fixed_betas_0.9_0.95")]) == 0  # the fix passes the gate


def test_a_demo_rerun_starts_from_empty_run_folders_and_keeps_everything_else(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import spike_demo

    for name, _ in spike_demo.RUNS:
        (tmp_path / name / "version_0" / "adam_monitor").mkdir(parents=True)
        (tmp_path / name / "version_0" / "adam_monitor" / "alerts.jsonl").write_text("{}\n")
    (tmp_path / "report.png").write_bytes(b"png")
    (tmp_path / "my_own_run" / "version_0").mkdir(parents=True)
    spike_demo.clear_previous(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_own_run"]


def test_the_demo_table_states_the_change_the_spike_rule_and_the_lead_within_100_columns(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import spike_demo

    from adam_monitor.alerts.records import Alert

    quiet = [0.01] * spike_demo.RETURN
    spiking = quiet[:-1] + [0.01, 0.5, 0.6, 0.4] + [0.01] * 50
    stale = Alert("stale_second_moment", "warning", spike_demo.RETURN, "", "AdamW", "net.0.weight", 3.0, 2.0)
    note = Alert("eps_dominance", "info", 100, "", "AdamW", "net.2.weight", 0.6, 0.5)
    runs = {
        "default": ((0.9, 0.999), spiking, [note, stale], "a", 1.0),
        "fixed": ((0.9, 0.95), quiet + [0.01] * 50, [note], "b", 1.0),
    }
    table = spike_demo.comparison(runs)
    assert "only beta2 differs" in table and "3x its median of the previous 50 steps" in table
    default, fixed = table.splitlines()[-2:]
    spike = spike_demo.loss_spikes(spiking)[0]
    assert f"stale_second_moment at step {spike_demo.RETURN}" in default
    assert f"step {spike}" in default and f"{spike - spike_demo.RETURN} step" in default
    assert "none" in fixed  # the info note is no precursor
    assert max(len(line) for line in table.splitlines()) < 100
