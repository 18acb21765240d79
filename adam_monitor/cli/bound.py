"""``adam-monitor bound --beta1 B1 --beta2 B2``: the worst-case update bound, noise level and
timescales of a beta pair."""

from __future__ import annotations

import argparse
import sys

from ..theory import bound_table

__all__ = ["add_parser", "run"]


def add_parser(commands) -> None:
    bound = commands.add_parser("bound", help="worst-case update bound, noise level and timescales of a beta pair")
    bound.add_argument("--beta1", type=float, required=True)
    bound.add_argument("--beta2", type=float, required=True)
    bound.add_argument("--steps", type=int, nargs="+", default=[10, 100, 1000, 10000])
    bound.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        print(bound_table(args.beta1, args.beta2, steps=tuple(args.steps)))
    except ValueError as err:
        print(f"adam-monitor bound: {err}", file=sys.stderr)
        return 2
    return 0
