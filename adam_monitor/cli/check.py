"""``adam-monitor check LOGDIR``: the CI gate on a run's alerts.

Exit 0: monitored and clean; 1: alerts at or above ``--fail-on``; 2: no monitor data, or data it
could not read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..alerts.log import ALERTS_FILE, read_alerts, summary_table
from ..alerts.records import SEVERITY_ORDER

__all__ = ["EXIT_ALERTS", "EXIT_CLEAN", "EXIT_NO_DATA", "add_parser", "run"]

EXIT_CLEAN, EXIT_ALERTS, EXIT_NO_DATA = 0, 1, 2


def add_parser(commands) -> None:
    check = commands.add_parser("check", help="exit non-zero if a monitored run raised instability alerts")
    check.add_argument("logdir", help="a run's log folder, or a folder holding several (searched recursively)")
    check.add_argument(
        "--fail-on",
        choices=sorted(SEVERITY_ORDER, key=SEVERITY_ORDER.get),
        default="warning",
        help="lowest severity that fails the check (default: warning, i.e. any alert)",
    )
    check.add_argument("--json", action="store_true", help="print the alerts as JSON")
    check.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    root = Path(args.logdir)
    if not root.exists():
        print(f"adam-monitor check: {root} does not exist", file=sys.stderr)
        return EXIT_NO_DATA
    files = sorted(root.rglob(ALERTS_FILE.name))
    files = [f for f in files if f.parent.name == ALERTS_FILE.parent.name]
    if not files:
        print(
            f"adam-monitor check: no monitor data under {root}: no {ALERTS_FILE} found. Was AdamMonitor "
            "(or Monitor with a writer or log_dir) attached to the run that wrote this folder?",
            file=sys.stderr,
        )
        return EXIT_NO_DATA
    runs = []
    for f in files:
        try:
            runs.append((f, read_alerts(f)))
        except (OSError, ValueError) as err:
            print(f"adam-monitor check: cannot read {f}: {err}", file=sys.stderr)
            return EXIT_NO_DATA
    level = SEVERITY_ORDER[args.fail_on]
    failing = [(f, a) for f, alerts in runs for a in alerts if SEVERITY_ORDER[a.severity] >= level]
    code = EXIT_ALERTS if failing else EXIT_CLEAN
    if args.json:
        print(
            json.dumps(
                {
                    "fail_on": args.fail_on,
                    "exit_code": code,
                    "failing": len(failing),
                    "runs": [{"alerts_file": str(f), "alerts": [a.to_dict() for a in alerts]} for f, alerts in runs],
                },
                indent=2,
            )
        )
        return code
    for f, alerts in runs:
        run_dir = f.parent.parent
        print(f"{run_dir}:")
        print("  " + summary_table(alerts).replace("\n", "\n  "))
    verdict = (
        f"FAIL: {len(failing)} alert(s) at or above '{args.fail_on}'"
        if failing
        else f"OK: no alert at or above '{args.fail_on}' in {len(runs)} monitored run(s)"
    )
    print(verdict)
    return code
