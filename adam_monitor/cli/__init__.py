"""``adam-monitor``: gate CI on instability alerts, print the update bound of a beta pair, plot a run.

adam-monitor check LOGDIR [--fail-on warning|error] [--json]
    exit 0: monitored and clean; 1: alerts at or above the level; 2: no monitor data or unreadable
adam-monitor bound --beta1 0.9 --beta2 0.999 [--steps 10 100 1000]
adam-monitor report LOGDIR -o report.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..alerts.log import ALERTS_FILE, read_alerts, summary_table
from ..alerts.records import SEVERITY_ORDER

__all__ = ["main"]

EXIT_CLEAN, EXIT_ALERTS, EXIT_NO_DATA = 0, 1, 2


def _check(args: argparse.Namespace) -> int:
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


def _bound(args: argparse.Namespace) -> int:
    from ..theory import bound_table

    try:
        print(bound_table(args.beta1, args.beta2, steps=tuple(args.steps)))
    except ValueError as err:
        print(f"adam-monitor bound: {err}", file=sys.stderr)
        return 2
    return 0


def _report(args: argparse.Namespace) -> int:
    try:
        from .report import write_report
    except ImportError as err:
        print(f"adam-monitor report needs matplotlib: pip install 'adam-monitor[report]' ({err})", file=sys.stderr)
        return 2
    try:
        path = write_report(args.logdir, args.output)
    except (FileNotFoundError, ValueError) as err:
        print(f"adam-monitor report: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adam-monitor", description="Adam training diagnostics and alerts.")
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="exit non-zero if a monitored run raised instability alerts")
    check.add_argument("logdir", help="a run's log folder, or a folder holding several (searched recursively)")
    check.add_argument(
        "--fail-on",
        choices=sorted(SEVERITY_ORDER, key=SEVERITY_ORDER.get),
        default="warning",
        help="lowest severity that fails the check (default: warning, i.e. any alert)",
    )
    check.add_argument("--json", action="store_true", help="print the alerts as JSON")
    check.set_defaults(run=_check)

    bound = sub.add_parser("bound", help="worst-case update bound, noise level and timescales of a beta pair")
    bound.add_argument("--beta1", type=float, required=True)
    bound.add_argument("--beta2", type=float, required=True)
    bound.add_argument("--steps", type=int, nargs="+", default=[10, 100, 1000, 10000])
    bound.set_defaults(run=_bound)

    report = sub.add_parser("report", help="plot loss and the diagnostics of a run, alerts marked, to a PNG")
    report.add_argument("logdir")
    report.add_argument("-o", "--output", default="report.png")
    report.set_defaults(run=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
