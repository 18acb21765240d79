"""``adam-monitor bound --beta1 B1 --beta2 B2``: the worst-case update bound, noise level and
timescales of a beta pair, with the verdict the alert rules give it.

Exit 0: the update is bounded (B_inf finite); 1: beta1^2 >= beta2, unbounded (what the monitor
reports as the ``beta_coupling`` error); 2: betas or steps it cannot use.
"""

from __future__ import annotations

import argparse
import math
import sys

from ..alerts.records import Thresholds
from ..theory import asymptotic_bound, bound_table

__all__ = ["EXIT_BOUNDED", "EXIT_INVALID", "EXIT_UNBOUNDED", "add_parser", "run"]

EXIT_BOUNDED, EXIT_UNBOUNDED, EXIT_INVALID = 0, 1, 2

EPILOG = """\
exit status:
  0  bounded: every update stays below B_inf x lr (beta1^2 < beta2, or no momentum: beta1 = 0);
     this includes beta1 >= beta2 > beta1^2, which the monitor notes only as info (beta_order)
  1  UNBOUNDED: beta1^2 >= beta2 with beta1 > 0, the worst-case update grows without limit (the
     monitor's beta_coupling error)
  2  invalid arguments (a beta outside [0, 1), a step below 1)
"""


def add_parser(commands) -> None:
    bound = commands.add_parser(
        "bound",
        help="worst-case update bound, noise level and timescales of a beta pair",
        description=(
            "Print B_t, the largest possible |update|/lr of Adam at step t over all gradients (eps = 0),\n"
            "its limit B_inf, the noise level, the memory of each beta, and a verdict on the pair that\n"
            "matches the alerts the monitor would raise for it."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bound.add_argument("--beta1", type=float, required=True, help="first-moment decay (momentum), e.g. 0.9")
    bound.add_argument("--beta2", type=float, required=True, help="second-moment decay, e.g. 0.999 or 0.95")
    bound.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=[10, 100, 1000, 10000],
        metavar="T",
        help="steps at which to print B_t (default: 10 100 1000 10000)",
    )
    bound.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        print(bound_table(args.beta1, args.beta2, steps=tuple(args.steps), stale_peak=Thresholds().stale_peak))
    except ValueError as err:
        print(f"adam-monitor bound: {err}", file=sys.stderr)
        return EXIT_INVALID
    return EXIT_UNBOUNDED if math.isinf(asymptotic_bound(args.beta1, args.beta2)) else EXIT_BOUNDED
