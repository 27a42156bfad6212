"""ms/step of a VAE-sized IWAE step: batchplate vs stock Pyro vs hand-written PyTorch.

A thin wrapper of :mod:`batchplate.bench.iwae_vae` (also run by
``batchplate bench --only iwae_vae``). Not a test.
Run ``python benchmarks/bench_iwae_vae.py`` (``--help`` for options).
"""

from batchplate.bench.iwae_vae import cli

if __name__ == "__main__":
    cli()
