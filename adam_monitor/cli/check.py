"""``adam-monitor check LOGDIR``: the CI gate on a run's alerts. It fails closed: anything it
cannot read or validate is exit 2, never a pass.

Exit 0: monitored and clean; 1: alerts at or above ``--fail-on`` (warning or error; ``info``
alerts are listed and never fail); 2: no monitor data, nothing
monitored, a run that stopped before its first step, or data it could not read (this wins over 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..alerts.log import ALERTS_FILE, RUN_FILE, RunData, printable, read_run, summary_table
from ..alerts.records import GATING_SEVERITIES, SEVERITY_ORDER

__all__ = ["EXIT_ALERTS", "EXIT_CLEAN", "EXIT_NO_DATA", "add_parser", "run"]

EXIT_CLEAN, EXIT_ALERTS, EXIT_NO_DATA = 0, 1, 2

EPILOG = """\
exit status:
  0  every run found was monitored, stepped, and raised no alert at or above --fail-on
  1  some run raised an alert at or above --fail-on (with the default 'warning': a warning or
     an error; with 'error': an error)
  2  LOGDIR missing or holding no monitor data; a run that monitored nothing (no Adam
     optimizer) or stopped before its first optimizer step; or a record, file or folder that
     could not be read (2 wins over 1; a bad command line is 2 as well)
Severities: error (the run is broken or must be: NaN/Inf, beta1^2 >= beta2), warning (a
precursor: a loss spike predicted within the next steps), info (a regime worth knowing, not a
danger: eps sets a tensor's step, beta1 >= beta2 chosen on purpose, a tensor that starts training
late at full lr, an lr raised at once). info is listed, never fails.
A last line cut short (a run killed mid-write, or still writing) is reported and counted as an
alert with the severity still readable in it, 'error' where the cut took it.
"""


def add_parser(commands) -> None:
    check = commands.add_parser(
        "check",
        help="exit non-zero if a monitored run raised instability alerts",
        description="Gate a CI job on the alerts of monitored runs (adam_monitor/alerts.jsonl and run.json).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("logdir", help="a run's log folder, or a folder holding several (searched recursively)")
    check.add_argument(
        "--fail-on",
        choices=GATING_SEVERITIES,
        default="warning",
        help="lowest severity that fails the check (default: warning: warnings and errors; info alerts never fail it)",
    )
    check.add_argument("--json", action="store_true", help="print the verdict, problems and alerts as JSON")
    check.set_defaults(run=run)


def run_folders(root: Path) -> tuple[list[Path], list[str]]:
    """The ``adam_monitor`` folders under ``root`` (links not followed) and the folders that could not be read."""
    problems: list[str] = []
    found = []

    def unreadable(err: OSError) -> None:
        problems.append(f"cannot read folder {printable(str(err.filename))}: {printable(err.strerror or str(err))}")

    for folder, dirs, files in os.walk(root, onerror=unreadable):
        dirs.sort()
        here = Path(folder)
        # a link or a folder under the file's name is found too, and then refused by read_run
        if here.name == ALERTS_FILE.parent.name and {ALERTS_FILE.name, RUN_FILE.name} & set(dirs + files):
            found.append(here)
    return found, problems


def verdict_problems(data: RunData) -> list[str]:
    """Why this run cannot pass whatever its alerts say: nothing monitored, no step taken."""
    status = data.status
    if status is None:
        return []
    where = printable(str(data.folder.parent))
    if not status["monitored"]:
        skipped = "; ".join(printable(f"{m.get('class')}: {m.get('reason')}") for m in status.get("not_monitored", []))
        return [f"{where}: nothing was monitored ({skipped or 'no optimizer'})"]
    if all(m["steps"] == 0 for m in status["monitored"]):
        how = "ended" if status["closed"] else "stopped (killed, or still starting)"
        return [f"{where}: the run {how} before its first optimizer step: nothing was checked"]
    return []


def run(args: argparse.Namespace) -> int:
    root = Path(args.logdir)
    if not os.path.lexists(root):
        print(f"adam-monitor check: {printable(str(root))} does not exist", file=sys.stderr)
        return EXIT_NO_DATA
    folders, problems = run_folders(root)
    if not folders and not problems:
        print(
            f"adam-monitor check: no monitor data under {printable(str(root))}: no {ALERTS_FILE} found. Was "
            "AdamMonitor (or Monitor with a writer or log_dir) attached to the run that wrote this folder?",
            file=sys.stderr,
        )
        return EXIT_NO_DATA
    runs = [read_run(f) for f in folders]
    for data in runs:
        problems += data.problems + verdict_problems(data)
    level = SEVERITY_ORDER[args.fail_on]
    failing = [a for data in runs for a in data.alerts if SEVERITY_ORDER[a.severity] >= level]
    code = EXIT_NO_DATA if problems else EXIT_ALERTS if failing else EXIT_CLEAN
    if args.json:
        report = {
            "fail_on": args.fail_on,
            "exit_code": code,
            "failing": len(failing),
            "problems": problems,
            "runs": [
                {
                    "alerts_file": str(d.folder / ALERTS_FILE.name),
                    "alerts": [a.to_dict() for a in d.alerts],
                    "torn_last_line": d.torn,
                    "run": d.status,
                }
                for d in runs
            ],
        }
        print(json.dumps(report, indent=2))
        return code
    for data in runs:
        print(f"{printable(str(data.folder.parent))}:")
        print("  " + summary_table(data.alerts).replace("\n", "\n  "))
        if data.torn is not None:
            print(f"  its last line was cut short (killed mid-write, or still writing): {data.torn[:80]}")
    for problem in problems:
        print(f"adam-monitor check: {problem}", file=sys.stderr)
    if problems:
        print(f"NOT CHECKED: {len(problems)} problem(s) (on stderr); the gate cannot call these runs clean")
    elif failing:
        print(f"FAIL: {len(failing)} alert(s) at or above '{args.fail_on}'")
    else:
        print(f"OK: no alert at or above '{args.fail_on}' in {len(runs)} monitored run(s)")
    return code
