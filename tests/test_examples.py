"""Every example runs as a user would run it."""

import subprocess
import sys
from pathlib import Path

from adam_monitor.cli import main as cli
from adam_monitor.events import read_scalars

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(*args, cwd):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_plain_loop(tmp_path):
    run(EXAMPLES / "plain_loop.py", "--steps", "40", "--logdir", tmp_path / "plain", cwd=tmp_path)
    scalars = read_scalars(tmp_path / "plain")
    assert [s for s, _ in scalars["adam/update_rms"]] == [10, 20, 30, 40]
    assert "adam/update_rms/0.weight" in scalars
    assert cli(["check", str(tmp_path / "plain")]) == 0


def test_fabric_loop(tmp_path):
    run(EXAMPLES / "fabric_loop.py", "--steps", "20", "--logdir", tmp_path / "fabric", cwd=tmp_path)
    scalars = read_scalars(tmp_path / "fabric")
    assert "adam/update_rms/0.weight" in scalars  # no Fabric wrapper prefix in names


def test_lightning_cli_adds_the_callback_by_class_path(tmp_path):
    run(
        EXAMPLES / "lightning_cli.py", "fit", "--config", EXAMPLES / "adam_monitor.yaml",
        "--trainer.max_steps", "20", "--trainer.enable_progress_bar", "false",
        cwd=tmp_path,
    )
    (run_dir,) = (tmp_path / "runs" / "lightning_cli").iterdir()
    assert "adam/staleness" in read_scalars(run_dir)
    assert cli(["check", str(run_dir)]) == 0
