"""ms/step of stochastic-control-flow programs (geometric, PCFG): sequential vs padded traces.

A thin wrapper of :mod:`batchplate.bench.padded` (also run by
``batchplate bench --only padded``). Not a test.
Run ``python benchmarks/bench_padded.py [--quick]``.
"""

from batchplate.bench.padded import cli

if __name__ == "__main__":
    cli()
