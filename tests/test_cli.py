"""The ``adam-monitor`` command line: --version, help texts, ``bound``'s verdicts, ``report``'s figure."""

import argparse
import itertools
import json
from importlib.metadata import version

import pytest

from adam_monitor.alerts.configuration import configuration_alerts
from adam_monitor.alerts.log import ALERTS_FILE
from adam_monitor.alerts.records import Alert, Thresholds
from adam_monitor.cli import build_parser, check
from adam_monitor.cli import main as cli

# ---------------------------------------------------------------------------------------- parser


def subparsers(parser):
    """``{name: parser}`` of every subcommand."""
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_version_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"adam-monitor {version('adam-monitor')}\n"


def test_every_option_of_every_command_has_a_help_string():
    parser = build_parser()
    commands = subparsers(parser)
    assert sorted(commands) == ["bound", "check", "report"]
    for name, command in [("adam-monitor", parser)] + sorted(commands.items()):
        for action in command._actions:
            what = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help != argparse.SUPPRESS, f"{what} has no help"


def exit_codes(help_text: str) -> dict[str, str]:
    """The ``exit status`` block of a --help: ``{code: its text, continuation lines joined}``."""
    block = help_text.split("exit status:", 1)[1].split("\n")
    codes, current = {}, None
    for line in block[1:]:
        if line.startswith("  ") and line[2:3].isdigit():
            current = line[2]
            codes[current] = line[3:].strip()
        elif line.startswith("     ") and current:
            codes[current] += " " + line.strip()
        else:
            break
    return codes


def test_check_help_states_the_exit_codes_it_returns():
    text = subparsers(build_parser())["check"].format_help()
    codes = exit_codes(text)
    assert sorted(codes) == [str(check.EXIT_CLEAN), str(check.EXIT_ALERTS), str(check.EXIT_NO_DATA)]
    assert "no alert at or above --fail-on" in codes["0"]
    assert "a warning or an error" in codes["1"] and "with 'error': an error" in codes["1"]
    assert "LOGDIR missing" in codes["2"] and "could not be read" in codes["2"] and "2 wins over 1" in codes["2"]


def test_check_returns_2_for_a_missing_logdir_as_its_help_says(tmp_path):
    assert cli(["check", str(tmp_path / "missing")]) == check.EXIT_NO_DATA


def test_bound_help_states_its_exit_codes():
    codes = exit_codes(subparsers(build_parser())["bound"].format_help())
    assert sorted(codes) == ["0", "1", "2"]
    assert codes["0"].startswith("bounded") and "info (beta_order)" in codes["0"]
    assert codes["1"].startswith("UNBOUNDED") and "beta_coupling" in codes["1"]
    assert "invalid" in codes["2"]


# ---------------------------------------------------------------------------------------- bound


def bound(capsys, beta1, beta2):
    code = cli(["bound", "--beta1", str(beta1), "--beta2", str(beta2)])
    out = capsys.readouterr().out
    return code, " ".join(out.split("Verdict:", 1)[1].split())  # the verdict and notes, unwrapped


def test_bound_equal_betas_are_the_smallest_bound_not_a_warning(capsys):
    code, verdict = bound(capsys, 0.95, 0.95)
    assert code == 0
    assert verdict.startswith("bounded.") and "WARNING" not in verdict and "stale" not in verdict
    assert "B_inf = 1 x lr" in verdict and "smallest bound" in verdict
    assert "info (beta_order)" in verdict and "never fails" in verdict


def test_bound_momentum_longer_than_the_second_moment_is_info(capsys):
    code, verdict = bound(capsys, 0.9, 0.85)
    assert code == 0
    assert verdict.startswith("bounded (info): momentum outlives the second moment")
    assert "B_inf = 1.19 x lr" in verdict and "WARNING" not in verdict


@pytest.mark.parametrize("betas", [(0.9, 0.81), (0.99, 0.95), (0.9, 0.5)])
def test_bound_unbounded_pairs_exit_1(capsys, betas):
    code, verdict = bound(capsys, *betas)
    assert code == 1 and verdict.startswith("UNBOUNDED")


def test_bound_pytorch_default_names_the_stale_second_moment(capsys):
    code, verdict = bound(capsys, 0.9, 0.999)
    assert code == 0 and "fine" not in verdict
    assert "beta2 = 0.999 (PyTorch's default) remembers ~1000 steps while beta1 = 0.9 remembers ~10" in verdict
    assert "a gradient that grows after a quiet stretch is divided by a stale v_hat" in verdict
    assert "stale_second_moment" in verdict and "try beta2 around 0.95" in verdict
    # a shorter beta2 (x10 jump peak 1.11 < stale_peak) is just fine
    code, verdict = bound(capsys, 0.9, 0.95)
    assert code == 0 and verdict.startswith("fine.")


@pytest.mark.parametrize(
    "beta1, beta2",
    list(itertools.product([0.0, 0.5, 0.9, 0.95, 0.99], [0.0, 0.5, 0.81, 0.85, 0.9, 0.95, 0.99, 0.999])),
)
def test_bound_verdict_agrees_with_the_configuration_rules(capsys, beta1, beta2):
    """One story: the verdict's severity is that of the alert the monitor raises for the pair."""
    code, verdict = bound(capsys, beta1, beta2)
    alerts = configuration_alerts([(beta1, beta2)], optimizer="Adam", step=1)
    rule = alerts[0].rule if alerts else None
    assert "WARNING" not in verdict
    if rule == "beta_coupling":
        assert code == 1 and verdict.startswith("UNBOUNDED") and "beta_coupling" in verdict
    else:
        assert code == 0 and verdict.startswith(("bounded", "fine"))
        assert ("beta_order" in verdict) == (rule == "beta_order")
    if "Note:" in verdict:  # the closing note never contradicts the verdict
        assert "B_inf = 1, the smallest bound" in verdict


def test_bound_bad_betas_exit_2(capsys):
    assert cli(["bound", "--beta1", "1.5", "--beta2", "0.999"]) == 2
    assert "beta1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- report

plot = pytest.importorskip("adam_monitor.cli.plot")


def alert_record(rule, severity, x_step):
    """A record as AlertLog writes it under Lightning: the optimizer step one past the chart's step."""
    alert = Alert(rule, severity, x_step + 1, "m", "Adam", "w", 2.0, 1.0)
    return {**alert.to_dict(), "x_step": x_step}


#: eps at 30 (info), a precursor episode of 13 alerts from 99 to 190 (gaps <= 50), a NaN at 260
#: (its own kind), and a new precursor episode at 300 (110 steps after the last).
ALERTS = (
    [("eps_dominance", "info", 30), ("stale_second_moment", "warning", 99)]
    + [("update_rms_spike" if x % 2 else "gradient_growth", "warning", x) for x in (100, 101, 102, 110)]
    + [("gradient_growth", "warning", x) for x in range(120, 191, 10)]
    + [("nonfinite", "error", 260), ("stale_second_moment", "warning", 300)]
)


@pytest.fixture
def run_dir(tmp_path):
    """A small logged run, ``exp/version_0``: loss, flat update RMS and ε-dominance, the ALERTS."""
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "exp" / "version_0"
    writer = SummaryWriter(str(run))
    for x in range(400):
        writer.add_scalar("train/loss", 1.0 / (x + 1), x)
        writer.add_scalar("adam/update_rms", 0.0, x)
        writer.add_scalar("adam/staleness", 1.0 + (x % 7) / 10, x)
        writer.add_scalar("adam/gradient_jump", 1.0 + (x % 5) / 10, x)
        writer.add_scalar("adam/eps_dominance", 0.0, x)
    writer.close()
    (run / ALERTS_FILE).parent.mkdir()
    (run / ALERTS_FILE).write_text("".join(json.dumps(alert_record(*a)) + "\n" for a in ALERTS))
    return run


def test_alert_episodes_group_alerts_within_the_rules_window():
    from adam_monitor.alerts.rules import EPISODE_RULES

    assert plot.EPISODE_WINDOW == Thresholds().after_alert_window and plot.PRECURSOR_RULES == EPISODE_RULES
    records = [
        (Alert.from_dict({k: v for k, v in r.items() if k != "x_step"}), r["x_step"])
        for r in map(lambda a: alert_record(*a), ALERTS)
    ]
    episodes = plot.alert_episodes(records)
    assert [(e.first.rule, e.x, e.last_x, e.count, e.severity) for e in episodes] == [
        ("eps_dominance", 30, 30, 1, "info"),
        ("stale_second_moment", 99, 190, 13, "warning"),
        ("nonfinite", 260, 260, 1, "error"),
        ("stale_second_moment", 300, 300, 1, "warning"),
    ]
    assert episodes[1].label == "stale_second_moment at 99 (+12 to 190)"
    # the window is inclusive, as in the rules (an alert at last + window still joins)
    assert len(plot.alert_episodes([records[1], (records[1][0], 99 + plot.EPISODE_WINDOW)])) == 1
    assert len(plot.alert_episodes([records[1], (records[1][0], 100 + plot.EPISODE_WINDOW)])) == 2


@pytest.mark.parametrize("where", ["exp/version_0", "exp"])
def test_run_label_names_the_folder_above_a_version(run_dir, where):
    logdir = run_dir.parents[1] / where
    assert plot.run_label(run_dir, logdir) == "exp/version_0"


def test_report_draws_one_labelled_marker_per_episode_without_overlap(run_dir):
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    (run,) = plot.load_runs(run_dir)
    assert run.label == "exp/version_0"
    fig = plot.build_figure([run], title="t")
    try:
        renderer = fig.canvas.get_renderer()
        lanes = fig.axes[:2]  # row 0: the alerts lane of the whole run and of the zoom
        labels = [[t for t in lane.texts if t.get_text().strip()] for lane in lanes]
        assert [t.get_text().strip() for t in labels[0]] == [e.label for e in run.episodes]
        assert [t.get_text().strip() for t in labels[1]] == ["stale_second_moment at 99 (+12 to 190)"]  # the zoom
        for texts in labels:
            boxes = [t.get_window_extent(renderer) for t in texts]
            for a, b in itertools.combinations(boxes, 2):
                assert not a.overlaps(b), "alert labels overlap"
        # one vertical line per episode on each chart (16 alerts, 4 episodes), at the chart's step
        for ax in fig.axes[::2]:
            verticals = [ln.get_xdata()[0] for ln in ax.get_lines() if len(set(ln.get_xdata())) == 1]
            assert sorted(verticals) == [30, 99, 260, 300]
        words = " ".join(t.get_text() for t in fig.findobj(Text))
        assert "step axis" not in words
        (legend,) = fig.legends
        assert "exp/version_0" in [t.get_text() for t in legend.get_texts()]
        assert "optimizer step" in legend.get_title().get_text() and "one more" in legend.get_title().get_text()
        # flat series: a fixed range, not autoscaled to rounding noise
        update_rms, eps = fig.axes[2 * 2], fig.axes[5 * 2]
        assert update_rms.get_ylim() == (0.0, 1.0) and eps.get_ylim() == (-0.02, 1.02)
    finally:
        plt.close(fig)


def test_report_says_what_it_is_doing_on_stderr(run_dir, tmp_path, capsys):
    out = tmp_path / "r.png"
    assert cli(["report", str(run_dir.parent), "-o", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("adam-monitor report: looking for TensorBoard event files under")
    assert f"adam-monitor report: reading {run_dir} (1/1)..." in err
    assert "adam-monitor report: drawing 1 run(s)..." in err and err[-1] == f"adam-monitor report: wrote {out}"
    assert cli(["report", str(run_dir.parent), "-o", str(out), "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")


def test_a_crowded_lane_hides_the_labels_that_fit_nowhere_and_says_so():
    import matplotlib.pyplot as plt

    scalars = {"train/loss": [(x, 1.0) for x in range(3000)], "adam/update_rms": [(x, 0.2) for x in range(3000)]}
    records = [(Alert("nonfinite", "error", x + 1, "m", "Adam", "w", 1.0, 1.0), x) for x in range(0, 3000, 60)]
    run = plot.RunPlot("exp/version_0", "C0", scalars, records, plot.alert_episodes(records))
    assert len(run.episodes) == 50
    fig = plot.build_figure([run], title="t")
    try:
        renderer = fig.canvas.get_renderer()
        lane = fig.axes[0]
        shown = [t for t in lane.texts if t.get_visible() and " at " in t.get_text()]
        assert 10 < len(shown) < 50
        boxes = [t.get_window_extent(renderer) for t in lane.texts if t.get_visible()]
        assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
        assert any(t.get_text().startswith(f"{50 - len(shown)} more episodes not labelled") for t in lane.texts)
    finally:
        plt.close(fig)
