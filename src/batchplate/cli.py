"""The ``batchplate`` command line.

Each subcommand is a pair of functions registered in :data:`SUBCOMMANDS`: one
adds the subcommand's parser and arguments, the other runs it on the parsed
arguments and returns the exit code. ``batchplate demo`` is the tour of the
seed's problems; ``run <example>`` and ``bench`` slot in the same way.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from . import __version__

Handler = Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------


def _add_demo(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="stock Pyro vs batchplate vs exact values, side by side (under a minute)",
        description=(
            "Reproduce the seed's problems on small models with exact answers: the IWAE "
            "bound with a vectorized and with a sequential plate, the scale of the ELBO "
            "gradient, and the IWAE gradient of a discrete guide. Prints stock Pyro's value, "
            "batchplate's value and the exact value for each. Exits with 1 if a batchplate "
            "value disagrees with the exact one beyond Monte Carlo error."
        ),
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer particles and repeats (a few seconds)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    from . import demo

    result = demo.main(quick=args.quick, seed=args.seed)
    return 0 if result.ok else 1


# ---------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------

#: ``name -> (add_parser, handler)``, in the order shown by ``--help``.
SUBCOMMANDS: dict[
    str, tuple[Callable[[argparse._SubParsersAction], argparse.ArgumentParser], Handler]
] = {
    "demo": (_add_demo, _run_demo),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchplate",
        description="Correct minibatch training of probabilistic programs in Pyro.",
    )
    parser.add_argument("--version", action="version", version=f"batchplate {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add, handler) in SUBCOMMANDS.items():
        add(subparsers).set_defaults(handler=handler, command=name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``batchplate`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.handler(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
