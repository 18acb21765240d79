"""``adam-monitor report LOGDIR -o FILE.png``: loss and the diagnostics of every run, alerts marked.

The plotting (:mod:`.plot`) needs matplotlib, loaded only when this command runs. Reading the event
files of a long run takes seconds: the command says on stderr what it is reading and drawing.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_parser", "run"]


def add_parser(commands) -> None:
    report = commands.add_parser(
        "report",
        help="plot loss and the diagnostics of a run, alerts marked, to a PNG",
        description=(
            "Plot the loss and the adam/* diagnostics of every monitored run under LOGDIR (one colour\n"
            "each) into a PNG, with one marker per alert episode and, when a warning or error fired,\n"
            "a zoom on the first one. Progress goes to stderr. Needs matplotlib:\n"
            "pip install 'adam-monitor[report]'."
        ),
        epilog="exit status: 0 written; 2 no readable monitored run under LOGDIR, or matplotlib missing",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("logdir", help="a run's log folder, or a folder holding several (searched recursively)")
    report.add_argument("-o", "--output", default="report.png", help="the PNG to write (default: report.png)")
    report.add_argument("--title", default=None, help="the figure's title (default: 'adam-monitor report: LOGDIR')")
    report.add_argument(
        "-q", "--quiet", action="store_true", help="print nothing on success (errors still go to stderr)"
    )
    report.set_defaults(run=run)


def _progress(message: str) -> None:
    print(f"adam-monitor report: {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    try:
        from . import plot
    except ImportError as err:
        print(f"adam-monitor report needs matplotlib: pip install 'adam-monitor[report]' ({err})", file=sys.stderr)
        return 2
    try:
        plot.write_report(args.logdir, args.output, title=args.title, progress=None if args.quiet else _progress)
    except (FileNotFoundError, ValueError) as err:
        print(f"adam-monitor report: {err}", file=sys.stderr)
        return 2
    return 0
