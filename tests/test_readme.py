"""The README's examples and commands run as written."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent


def blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def python_blocks():
    return blocks("python")


@pytest.mark.parametrize("index", range(2, len(python_blocks())))
def test_every_other_python_block_runs_as_written(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(python_blocks()[index], f"README.md (python block {index})", "exec"), {"__name__": "__readme__"})


def test_the_usage_examples_write_tensorboard_logs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for code in python_blocks()[:2]:  # Lightning, then the plain loop
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    assert list((tmp_path / "runs" / "lightning_logs").rglob("events.out.tfevents.*"))
    assert list((tmp_path / "runs" / "plain").rglob("events.out.tfevents.*"))


def shell_commands():
    """Each command line of the README's bash blocks, without its comment."""
    lines = []
    for block in blocks("bash"):
        for line in block.splitlines():
            command = line.split(" #", 1)[0].strip()
            if command:
                lines.append(command)
    return lines


# Run elsewhere (make: the Quickstart itself; pip: an install), or servers that never return.
NOT_RUN_HERE = ("make ", "pip install", "tensorboard ", "source ")


def test_every_shell_command_is_one_the_tests_know():
    known = [c for c in shell_commands() if not c.startswith(NOT_RUN_HERE)]
    assert all(c.split()[0] in ("adam-monitor", "python") for c in known), known


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_shell_command_runs_as_written_after_the_quickstart(tmp_path):
    """In a copy of the examples, after the demo (what `make demo` leaves), with .venv on PATH as
    `source .venv/bin/activate` puts it; `check`'s documented exit codes are the expected ones."""
    subprocess.run(["cp", "-r", str(ROOT / "examples"), str(tmp_path)], check=True)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    demo = subprocess.run([sys.executable, "examples/spike_demo.py"], cwd=tmp_path, env=env, capture_output=True)
    assert demo.returncode == 0, demo.stderr[-3000:]
    for command in shell_commands():
        if command.startswith(NOT_RUN_HERE):
            continue
        proc = subprocess.run(shlex.split(command), cwd=tmp_path, env=env, capture_output=True, text=True)
        expected = 1 if command == "adam-monitor check runs/spike_demo" else 0
        assert proc.returncode == expected, (command, proc.stdout[-2000:], proc.stderr[-2000:])
