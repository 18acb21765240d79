"""Fault injection: nothing the monitor does ends or corrupts the run under ``on_alert="warn"``, no
alert is lost, and ``adam-monitor check`` never passes data it could not read.

Faults: a full disk (a real kernel limit on file size in a child process), a log folder deleted
mid-run, writes refused for a while (read-only), failing writers and loggers, a kill mid-write
followed by another run appending, a corpus of corrupt files and random bytes for the gate,
FIFOs, links and unreadable folders, an exception in ``training_step``, ``stop`` beside a default
``ModelCheckpoint``, and an ``InstabilityError`` crossing a process boundary.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
import textwrap
import warnings
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from support import AdamBoring, quiet_trainer

import adam_monitor._faults as faults
from adam_monitor import AdamMonitor, Alert, InstabilityError, InstabilityWarning, Monitor
from adam_monitor.alerts.log import alerts_path, read_alerts, read_run
from adam_monitor.cli import main as cli

ALERT = dict(rule="nonfinite", severity="error", step=3, message="m", optimizer="Adam", parameter=None)


def nan_run(log_dir, *, optimizers=6, steps=12, writer=None, between=None, on_alert="warn"):
    """``optimizers`` AdamW on one tensor each; optimizer k's gradient turns NaN at step 3 + k, so
    alerts come at many steps. ``between(t)`` runs after step t. Returns (monitor, steps done)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(300)) for _ in range(optimizers)]
    opts = [torch.optim.AdamW([p]) for p in params]
    monitor = Monitor(opts, log_dir=log_dir, writer=writer, log_every_n_steps=2, on_alert=on_alert)
    done = 0
    for t in range(1, steps + 1):
        for k, (p, opt) in enumerate(zip(params, opts)):
            p.grad = torch.randn(300) * (float("nan") if t == 3 + k else 1.0)
            opt.step()
        done = t
        if between is not None:
            between(t)
    monitor.close()
    return monitor, done


def written_or_warned(monitor, path, warned: str) -> None:
    """Every alert of the run is in alerts.jsonl or, in full, in the warnings: none lost."""
    on_disk = [(a.rule, a.step, a.optimizer) for a in read_alerts(path)] if path.exists() else []
    for a in monitor.alerts:
        line = json.dumps(a.to_dict())[:-1]  # the record without its closing brace (x_step follows)
        assert (a.rule, a.step, a.optimizer) in on_disk or line in warned, a


# ---------------------------------------------------------------------------------------------- training survives


def test_a_full_disk_never_ends_the_run_and_loses_no_alert(tmp_path):
    # RLIMIT_FSIZE: the kernel refuses writes past 2 KB in every file of the child (EFBIG, as a
    # full disk gives ENOSPC); TensorBoard's event file and alerts.jsonl both hit it.
    script = textwrap.dedent(
        f"""
        import resource, signal, sys, warnings
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from torch.utils.tensorboard import SummaryWriter
        from test_faults import nan_run
        writer = SummaryWriter({str(tmp_path)!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            monitor, done = nan_run({str(tmp_path)!r}, optimizers=12, steps=20, writer=writer)
        print("steps", done, "alerts", len(monitor.alerts))
        for w in caught:
            print("WARNING", w.message)
        """
    )
    env = {**os.environ, "ADAM_MONITOR_EAGER": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "steps 20 alerts 12" in proc.stdout
    assert "could not write" in proc.stdout and "File too large" in proc.stdout
    path = alerts_path(tmp_path)
    assert 0 < path.stat().st_size <= 2048
    data = read_run(path.parent)
    assert data.torn is None and not [p for p in data.problems if "alerts.jsonl" in p]  # no torn line left
    on_disk = {(a.step, a.optimizer) for a in data.alerts}
    printed = proc.stdout.split("here they are:", 1)[1]
    for k in range(12):  # each optimizer's nonfinite alert, on disk or printed whole
        optimizer = f"AdamW-{k}" if k else "AdamW"
        assert (3 + k, optimizer) in on_disk or f'"step": {3 + k}, ' in printed, k
    assert cli(["check", str(tmp_path)]) == 1  # what reached the disk is read, and fails the gate


def test_a_log_folder_deleted_mid_run_comes_back_with_the_later_alerts(tmp_path):
    import shutil

    log_dir = tmp_path / "run"
    with pytest.warns(UserWarning):
        monitor, done = nan_run(log_dir, between=lambda t: t == 4 and shutil.rmtree(log_dir))
    assert done == 12 and len(monitor.alerts) == 6
    # the alerts of steps 3 and 4 went with the folder; every later one is in the new file
    assert [a.step for a in read_alerts(alerts_path(log_dir))] == [5, 6, 7, 8]
    assert read_run(alerts_path(log_dir).parent).status["closed"] is True


def test_refused_writes_are_retried_and_every_alert_lands_once(tmp_path, monkeypatch):
    real = faults.append_lines
    refused = {"n": 0}

    def read_only(path, lines, repair):
        if refused["n"] < 3:  # the folder is read-only for the first three tries
            refused["n"] += 1
            raise PermissionError(13, "Permission denied", str(path))
        real(path, lines, repair)

    monkeypatch.setattr("adam_monitor.alerts.log.append_lines", read_only)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor, _ = nan_run(tmp_path)
    failures = [str(w.message) for w in caught if "could not write" in str(w.message)]
    assert len(failures) == 1 and "alerts.jsonl: PermissionError" in failures[0]
    assert any("writes" in str(w.message) and "again" in str(w.message) for w in caught)
    assert [(a.rule, a.step) for a in read_alerts(alerts_path(tmp_path))] == [(a.rule, a.step) for a in monitor.alerts]


class BrokenWriter:
    """A SummaryWriter stand-in whose every write fails, as one whose disk went away."""

    log_dir = "/nonexistent"

    def __getattr__(self, name):
        def fail(*args, **kwargs):
            raise OSError(28, "No space left on device")

        return fail


def test_a_failing_writer_or_logger_is_one_warning_and_training_goes_on(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor, done = nan_run(tmp_path, writer=BrokenWriter())
    messages = [str(w.message) for w in caught if "could not write" in str(w.message)]
    assert done == 12 and messages
    assert len(messages) == len(set(m.split(":")[0] for m in messages))  # once per target
    assert len(read_alerts(alerts_path(tmp_path))) == len(monitor.alerts) == 6


def test_raise_mode_still_raises_when_the_alerts_file_cannot_take_the_alert(tmp_path, monkeypatch):
    def full(path, lines, repair):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr("adam_monitor.alerts.log.append_lines", full)
    with pytest.warns(UserWarning, match="could not write"), pytest.raises(InstabilityError) as err:
        nan_run(tmp_path, on_alert="raise")
    text = str(err.value)
    assert "could not be written" in text and '"rule": "nonfinite"' in text  # the record travels in the error


def test_a_run_appending_after_a_kill_mid_write_loses_neither_record(tmp_path):
    path = alerts_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(
        json.dumps({**ALERT, "value": 1.0, "threshold": 2.0}) + "\n" + '{"rule": "stale_second_moment", "se'
    )
    with pytest.warns(UserWarning):
        monitor, _ = nan_run(tmp_path, optimizers=1)
    records = read_alerts(path)
    assert [(a.rule, a.severity) for a in records] == [
        ("nonfinite", "error"),
        ("torn_record", "error"),  # the cut took its severity: counted as an error
        ("nonfinite", "error"),
    ]
    assert "stale_second_moment" in records[1].message
    assert all(line.startswith("{") and line.endswith("}") for line in path.read_text().splitlines())
    assert cli(["check", str(tmp_path)]) == 1


def test_an_exception_in_training_step_closes_the_monitor(tmp_path, capsys):
    class Failing(AdamBoring):
        def training_step(self, batch, batch_idx):
            if self.global_step == 4:
                raise RuntimeError("user code failed")
            return super().training_step(batch, batch_idx)

    model = Failing(betas=(0.99, 0.95))
    callback = AdamMonitor()
    trainer = quiet_trainer(tmp_path, callbacks=[callback], max_steps=20)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="user code failed"):
        trainer.fit(model)
    optimizer = trainer.optimizers[0]
    assert not optimizer._optimizer_step_post_hooks  # the hook is off the optimizer
    status = read_run(alerts_path(trainer.log_dir).parent).status
    assert status["closed"] and status["monitored"][0]["steps"] == 4
    assert [a.rule for a in callback.alerts] == ["beta_coupling"]
    assert "beta_coupling" in capsys.readouterr().out  # the summary


def test_a_checkpoint_saved_after_fit_holds_the_monitor_state(tmp_path):
    callback = AdamMonitor()
    trainer = quiet_trainer(tmp_path, callbacks=[callback], max_steps=6)
    with pytest.warns(UserWarning, match="beta_coupling"):
        trainer.fit(AdamBoring(betas=(0.99, 0.95)))
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    state = torch.load(tmp_path / "after.ckpt", weights_only=False)["callbacks"]["AdamMonitor"]
    assert state["optimizers"][0]["step"] == 6 and [a["rule"] for a in state["alerts"]] == ["beta_coupling"]
    resumed = AdamMonitor()
    again = quiet_trainer(tmp_path, callbacks=[resumed], max_steps=8, name="resumed")
    with warnings.catch_warnings():
        warnings.simplefilter("error", InstabilityWarning)  # no configuration alert repeated at "step 1"
        again.fit(AdamBoring(betas=(0.99, 0.95)), ckpt_path=tmp_path / "after.ckpt")
    assert [a.step for a in resumed.alerts] == [1]  # the one alert, from the first run


class NanAt(AdamBoring):
    def __init__(self, nan_at):
        super().__init__()
        self.nan_at = nan_at

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step + 1 == self.nan_at else loss


def test_stop_never_replaces_the_last_good_checkpoint(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt")  # the default: save_top_k=1, at epoch ends
    trainer = quiet_trainer(tmp_path, callbacks=[AdamMonitor(on_alert="stop"), checkpoint], max_steps=40)
    with pytest.warns(UserWarning), pytest.raises(InstabilityError, match="nonfinite") as err:
        trainer.fit(NanAt(nan_at=14))  # 6 batches an epoch: checkpoints at steps 6 and 12
    saved = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert saved == ["epoch=1-step=12.ckpt"]
    state = torch.load(tmp_path / "ckpt" / saved[0], weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())
    assert f"the newest, from before it: {tmp_path / 'ckpt' / saved[0]}" in str(err.value)


def _raise_in_worker():
    alert = Alert(
        rule="nonfinite", severity="error", step=3, message="m", optimizer="A", parameter=None, value=1, threshold=2
    )
    raise InstabilityError([alert], where="runs/x/adam_monitor/alerts.jsonl", note="n")


def test_instability_error_crosses_a_process_boundary_whole():
    err = InstabilityError([Alert(**ALERT, value=float("nan"), threshold=float("inf"))], where="w")
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.alerts[0].rule == "nonfinite" and again.where == "w"
    with ProcessPoolExecutor(1) as pool, pytest.raises(InstabilityError) as info:
        pool.submit(_raise_in_worker).result(timeout=120)
    assert info.value.alerts[0].step == 3 and info.value.note == "n"


# ---------------------------------------------------------------------------------------------- the gate fails closed


def gate_run(tmp_path, content: bytes, *, steps=10, monitored=True):
    folder = tmp_path / "run" / "adam_monitor"
    folder.mkdir(parents=True)
    (folder / "alerts.jsonl").write_bytes(content)
    entry = [{"optimizer": "AdamW", "class": "AdamW", "parameters": 2, "steps": steps}] if monitored else []
    skipped = [] if monitored else [{"class": "SGD", "reason": "SGD is not torch.optim.Adam"}]
    status = {"format": 1, "closed": True, "monitored": entry, "not_monitored": skipped}
    (folder / "run.json").write_text(json.dumps(status))
    return tmp_path / "run"


def record(**changes) -> bytes:
    return json.dumps({**ALERT, "severity": "warning", "value": 1.0, "threshold": 2.0, **changes}).encode()


CORPUS = {
    "garbage last line": (b"garbage\n", 2),
    "unknown severity": (record(severity="critical") + b"\n", 2),
    "step as text": (record(step="five") + b"\n", 2),
    "step 1e400": (record()[:-1] + b', "step": 1e400}\n', 2),
    "huge integer": (record()[:-1] + b', "step": ' + b"9" * 5000 + b"}\n", 2),
    "deep nesting": (b"[" * 100_000 + b"]" * 100_000 + b"\n", 2),
    "UTF-8 BOM": (b"\xef\xbb\xbf" + record() + b"\n", 2),
    "NUL byte": (record() + b"\x00\n", 2),
    "NaN literal": (record()[:-1] + b', "value": NaN}\n', 2),
    "not an object": (b"[1, 2]\n", 2),
    "bool step": (record(step=True) + b"\n", 2),
    "missing field": (json.dumps({"rule": "x"}).encode() + b"\n", 2),
    "latin-1": (record(message="caf\xe9").replace(b"caf\\u00e9", b"caf\xe9") + b"\n", 2),
    "invalid middle line": (record() + b"\n{\n" + record() + b"\n", 2),
    "valid warning": (record() + b"\n", 1),
    "torn last line, severity readable": (record(severity="warning")[:60], 1),
    "empty": (b"", 0),
}


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_the_gate_exits_2_on_what_it_cannot_read(tmp_path, case, capsys):
    content, code = CORPUS[case]
    assert cli(["check", str(gate_run(tmp_path, content))]) == code
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out


def test_the_gate_never_tracebacks_on_random_bytes(tmp_path, capsys):
    rng = random.Random(0)
    for i in range(200):
        n = rng.randrange(1, 300)
        content = bytes(rng.randrange(256) for _ in range(n)) + (b"\n" if i % 2 else b"")
        run = gate_run(tmp_path / str(i), content)
        code = cli(["check", str(run)])
        assert code in (1, 2), (i, content)  # never "clean": each file holds something it cannot read
    assert "Traceback" not in capsys.readouterr().err


def test_the_gate_needs_a_run_that_monitored_and_stepped(tmp_path, capsys):
    assert cli(["check", str(gate_run(tmp_path / "a", b"", steps=0))]) == 2
    assert "before its first optimizer step" in capsys.readouterr().err
    assert cli(["check", str(gate_run(tmp_path / "b", b"", monitored=False))]) == 2
    assert "nothing was monitored (SGD: SGD is not torch.optim.Adam)" in capsys.readouterr().err
    (tmp_path / "b" / "run" / "adam_monitor" / "run.json").unlink()
    assert cli(["check", str(tmp_path / "b")]) == 2
    assert "run.json is missing" in capsys.readouterr().err


def test_a_real_sgd_run_and_a_run_dead_at_step_zero_do_not_pass(tmp_path, capsys):
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.warns(UserWarning, match="not monitoring SGD"):
        Monitor(torch.optim.SGD([p], lr=0.1), log_dir=tmp_path / "sgd").close()
    assert cli(["check", str(tmp_path / "sgd")]) == 2
    assert "nothing was monitored (SGD: SGD is not torch.optim.Adam" in capsys.readouterr().err
    Monitor(torch.optim.AdamW([p]), log_dir=tmp_path / "dead")  # never stepped, never closed
    assert cli(["check", str(tmp_path / "dead")]) == 2


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_a_fifo_is_refused_without_opening_it(tmp_path):
    run = gate_run(tmp_path, b"")
    fifo = run / "adam_monitor" / "alerts.jsonl"
    fifo.unlink()
    os.mkfifo(fifo)
    proc = subprocess.run(
        [sys.executable, "-m", "adam_monitor.cli", "check", str(run)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "is not a regular file" in proc.stderr


def test_a_link_is_not_followed_and_its_target_never_printed(tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:secret\n")
    run = gate_run(tmp_path, b"")
    (run / "adam_monitor" / "alerts.jsonl").unlink()
    (run / "adam_monitor" / "alerts.jsonl").symlink_to(secret)
    assert cli(["check", str(run)]) == 2
    out = capsys.readouterr()
    assert "symbolic link" in out.err and "secret" not in out.err.replace(str(tmp_path), "") + out.out


def test_an_unreadable_folder_beside_a_clean_run_is_exit_2(tmp_path, monkeypatch, capsys):
    gate_run(tmp_path / "clean", b"")
    (tmp_path / "locked").mkdir()
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert cli(["check", str(tmp_path)]) == 2
    assert "cannot read folder" in capsys.readouterr().err


def test_control_characters_in_a_record_are_escaped(tmp_path, capsys):
    run = gate_run(tmp_path, record(rule="\x1b[2J\x1b[31mfake", parameter="a\nOK: all clean") + b"\n")
    assert cli(["check", str(run)]) == 1
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[2J" in out
    assert "\nOK: all clean" not in out
