"""The `batchplate` command line.

Each subcommand is a pair of functions registered in `SUBCOMMANDS`: one adds
the subcommand's parser and arguments, the other runs it on the parsed
arguments and returns the exit code. `batchplate demo` is the tour of the
problems raised in Pyro issue #2220, `run <example>` trains one of
`batchplate.examples` and `bench` runs the benchmarks of `batchplate.bench`.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import pkgutil
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

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
            "Reproduce the problems of Pyro issue #2220 on small models with exact answers: "
            "the IWAE "
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
# run <example>
# ---------------------------------------------------------------------------

#: `run` options that map onto `run()`'s keywords (`--out` -> `out_dir`).
RUN_OPTIONS = ("objective", "num_particles", "batch_size", "steps", "lr", "seed")


def available_examples() -> list[str]:
    """Names of the public modules in `batchplate.examples` (importable or not)."""
    from . import examples

    modules = pkgutil.iter_modules(examples.__path__)
    return sorted(m.name for m in modules if not m.ispkg and not m.name.startswith("_"))


def load_example(name: str) -> ModuleType:
    """Import `batchplate.examples.<name>`; `LookupError` with the choices if unknown."""
    names = available_examples()
    if not name.isidentifier() or name not in names:
        raise LookupError(
            f"unknown example {name!r}; available examples: {', '.join(names) or '(none)'}"
        )
    module = importlib.import_module(f"batchplate.examples.{name}")
    if not callable(getattr(module, "run", None)) or not callable(getattr(module, "Options", None)):
        raise LookupError(f"batchplate.examples.{name} has no run() function or Options")
    return module


def _add_run(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "run",
        help="train one example (scale, geometric, gmm, pcfg, vae, ssvae, dmm) and plot its curves",
        description=(
            "Train the example batchplate.examples.EXAMPLE with a progress bar, save its "
            "plots to --out and print the summary metrics. Options not given come from the "
            "example's Options (also listed in its DEFAULTS)."
        ),
    )
    parser.add_argument(
        "example", metavar="EXAMPLE", help=f"one of {', '.join(available_examples())}"
    )
    parser.add_argument("--objective", help="elbo, iwae, vimco, rws (wake-wake) or ws (wake-sleep)")
    parser.add_argument(
        "-K", "--num-particles", dest="num_particles", type=int, help="particles per datum"
    )
    parser.add_argument("--batch-size", type=int, help="minibatch size B")
    parser.add_argument("--steps", type=int, help="optimizer steps")
    parser.add_argument("--lr", type=float, help="learning rate")
    parser.add_argument("--seed", type=int, help="random seed")
    parser.add_argument(
        "--out", default="batchplate-runs", help="output folder (default batchplate-runs)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "-o",
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other keyword of the example's run(), e.g. -o eval_particles=1000 "
        "(repeatable; VALUE is read as a Python literal, else kept as a string)",
    )
    return parser


def parse_options(pairs: Sequence[str]) -> dict:
    """`["eval_particles=1000", "layout=sequential"]` -> `{"eval_particles": 1000, ...}`."""
    options = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"expected KEY=VALUE, got {pair!r}")
        try:
            options[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            options[key] = text
    return options


def _format_metric(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _run_example(args: argparse.Namespace) -> int:
    try:
        module = load_example(args.example)
    except LookupError as e:
        print(f"batchplate run: {e.args[0]}", file=sys.stderr)
        return 2
    try:
        extra = parse_options(args.option)
    except ValueError as e:
        print(f"batchplate run: {e}", file=sys.stderr)
        return 2
    options = {k: getattr(args, k) for k in RUN_OPTIONS if getattr(args, k) is not None}
    options.update(extra, out_dir=args.out, progress=not args.no_progress)
    try:  # a wrong option is a usage error, not a crash inside run()
        module.Options(**options)
    except (TypeError, ValueError) as e:
        message = str(e).replace(f"{module.Options.__name__}.__init__() ", "")
        print(f"batchplate run {args.example}: {message}", file=sys.stderr)
        return 2
    from .examples import _runner

    try:  # before any training: what plotting needs, and a writable --out
        _runner.preflight(args.out)
    except _runner.SetupError as e:
        print(f"batchplate run {args.example}: {e}", file=sys.stderr)
        return 2
    metrics = module.run(**options)
    failed = "plot_error" in metrics
    where = "plotting failed" if failed else f"plot saved to {metrics.get('plot', '(none)')}"
    print(f"batchplate run {args.example}: {where}")
    width = max((len(k) for k in metrics), default=0)
    for key, value in metrics.items():
        if key != "plot":
            print(f"  {key:<{width}}  {_format_metric(value)}")
    return 1 if failed else 0


# ---------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------


def available_benchmarks() -> list[str]:
    """Names of the modules in `batchplate.bench`."""
    from . import bench

    return sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if not m.ispkg)


def _add_bench(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench",
        help="time batchplate against stock Pyro and hand-written PyTorch (ms/step)",
        description=(
            "Run every benchmark of batchplate.bench (or one, with --only). Each prints its "
            "table of ms/step and ratios, all measured in the same run."
        ),
    )
    parser.add_argument("--quick", action="store_true", help="few steps (a rough check)")
    parser.add_argument("--only", metavar="NAME", help="run one benchmark, e.g. iwae_vae")
    return parser


def _run_bench(args: argparse.Namespace) -> int:
    names = available_benchmarks()
    if args.only is not None:
        if args.only not in names:
            print(
                f"batchplate bench: unknown benchmark {args.only!r}; "
                f"available: {', '.join(names) or '(none)'}",
                file=sys.stderr,
            )
            return 2
        names = [args.only]
    for i, name in enumerate(names):
        if i:
            print()
        print(f"== {name} ==")
        importlib.import_module(f"batchplate.bench.{name}").main(quick=args.quick)
    return 0


# ---------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------

#: `name -> (add_parser, handler)`, in the order shown by `--help`.
SUBCOMMANDS: dict[
    str, tuple[Callable[[argparse._SubParsersAction], argparse.ArgumentParser], Handler]
] = {
    "demo": (_add_demo, _run_demo),
    "run": (_add_run, _run_example),
    "bench": (_add_bench, _run_bench),
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
    """Entry point of the `batchplate` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.handler(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
