"""``adam-monitor report LOGDIR -o FILE.png``: loss and the diagnostics of every run, alerts marked.

The plotting (:mod:`.plot`) needs matplotlib, loaded only when this command runs.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_parser", "run"]


def add_parser(commands) -> None:
    report = commands.add_parser("report", help="plot loss and the diagnostics of a run, alerts marked, to a PNG")
    report.add_argument("logdir")
    report.add_argument("-o", "--output", default="report.png")
    report.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        from . import plot
    except ImportError as err:
        print(f"adam-monitor report needs matplotlib: pip install 'adam-monitor[report]' ({err})", file=sys.stderr)
        return 2
    try:
        path = plot.write_report(args.logdir, args.output)
    except (FileNotFoundError, ValueError) as err:
        print(f"adam-monitor report: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
