"""``adam-monitor``: gate CI on instability alerts, print the update bound of a beta pair, plot a run.

    adam-monitor check LOGDIR [--fail-on warning|error] [--json]
        exit 0: monitored and clean; 1: alerts at or above the level; 2: no monitor data or unreadable
    adam-monitor bound --beta1 0.9 --beta2 0.999 [--steps 10 100 1000]
        exit 0: the update is bounded; 1: beta1^2 >= beta2, unbounded; 2: invalid betas
    adam-monitor report LOGDIR -o report.png
    adam-monitor --version

One module per command (``check``, ``bound``, ``report``), each adding its parser and running it;
``events`` reads TensorBoard event files back, ``plot`` draws the report.
"""

from __future__ import annotations

import argparse

from . import bound, check, report

__all__ = ["build_parser", "main", "version"]


def version() -> str:
    """The installed distribution's version; the package's ``__version__`` when run from a source tree."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("adam-monitor")
    except PackageNotFoundError:
        import adam_monitor

        return getattr(adam_monitor, "__version__", "unknown")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adam-monitor", description="Adam training diagnostics and alerts.")
    parser.add_argument(
        "--version", action="version", version=f"adam-monitor {version()}", help="print the version and exit"
    )
    commands = parser.add_subparsers(dest="command", required=True, help="command (each has its own --help)")
    for command in (check, bound, report):
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
