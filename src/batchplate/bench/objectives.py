"""ms/step of TraceGraph_ELBO, TraceMeanField_ELBO and the Jit variants next to stock Pyro's.

Each row is one `pyro.infer.SVI` step (forward, backward, Adam) of a
batchplate objective with the program written with `batch_plate`, and of
stock Pyro's counterpart on the same program with `pyro.plate`, timed in
interleaved rounds (`bench.timing`); the report gives the paired ratio (median
over rounds of batchplate / stock). Programs:

- `vae`: the VAE of `bench.iwae_vae` (784 -> 400 -> 20, Bernoulli likelihood),
  B = 128, one particle: `TraceMeanField_ELBO`, `TraceGraph_ELBO` and the Jit
  variants;
- `discrete`: a per-datum Bernoulli latent with an `nn_baseline` and a
  Gaussian latent downstream of it, B = 128, under `TraceGraph_ELBO` and
  `JitTraceGraph_ELBO` (score function, provenance tracking and baselines);
- `ssvae`: the semi-supervised VAE M2 of `batchplate.examples.ssvae` at
  MNIST-like sizes (784 -> 400 -> 20), an unlabelled batch of B = 128, the
  label `y` enumerated in the guide (10 values), under `TraceEnum_ELBO` and
  `JitTraceEnum_ELBO`.

Not a test. Run `batchplate bench --only objectives` (`--quick` for a rough check).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import pyro.infer
import torch
from pyro.infer import config_enumerate
from torch import nn

import batchplate
from batchplate import batch_plate
from batchplate.examples import ssvae

from . import timing
from .iwae_vae import X_DIM, Z_DIM, networks, pyro_programs

B = 128
#: (row, program, batchplate objective, stock objective)
ROWS = (
    ("TraceMeanField_ELBO", "vae", batchplate.TraceMeanField_ELBO, pyro.infer.TraceMeanField_ELBO),
    ("TraceGraph_ELBO", "vae", batchplate.TraceGraph_ELBO, pyro.infer.TraceGraph_ELBO),
    ("JitTrace_ELBO", "vae", batchplate.JitTrace_ELBO, pyro.infer.JitTrace_ELBO),
    # Stock's JitTraceMeanField_ELBO recompiles on every call in Pyro 1.9 (it caches the
    # compiled step under one attribute and tests another), so it is no fair counterpart:
    # stock's JitTrace_ELBO is, the same compiled pipeline on the same VAE (with two log
    # densities of z where the mean-field step has one analytic KL).
    ("JitTraceMeanField_ELBO", "vae", batchplate.JitTraceMeanField_ELBO, pyro.infer.JitTrace_ELBO),
    ("TraceGraph_ELBO", "discrete", batchplate.TraceGraph_ELBO, pyro.infer.TraceGraph_ELBO),
    ("JitTraceGraph_ELBO", "discrete", batchplate.JitTraceGraph_ELBO, None),
    ("TraceEnum_ELBO", "ssvae", batchplate.TraceEnum_ELBO, pyro.infer.TraceEnum_ELBO),
    ("JitTraceEnum_ELBO", "ssvae", batchplate.JitTraceEnum_ELBO, pyro.infer.JitTraceEnum_ELBO),
)


def discrete_programs(prefix: str, plate) -> tuple[Callable, Callable]:
    torch.manual_seed(0)
    encoder, baseline = nn.Linear(X_DIM, 2), nn.Linear(X_DIM, 1)

    def model(x: torch.Tensor) -> None:
        with plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(0.3))
            w = pyro.sample("w", dist.Normal(2.0 * z, 1.0))
            pyro.sample("x", dist.Bernoulli(logits=w[:, None].expand(-1, X_DIM)).to_event(1), obs=x)

    def guide(x: torch.Tensor) -> None:
        pyro.module(f"{prefix}encoder", encoder)
        pyro.module(f"{prefix}baseline", baseline)
        with plate("data", x.shape[0]):
            h = encoder(x)
            spec = {"nn_baseline": lambda v: baseline(v).squeeze(-1), "nn_baseline_input": x}
            z = pyro.sample("z", dist.Bernoulli(logits=h[:, 0]), infer={"baseline": spec})
            pyro.sample("w", dist.Normal(h[:, 1] + z, 1.0))

    return model, guide


def ssvae_programs(prefix: str, plate) -> tuple[Callable, Callable]:
    torch.manual_seed(0)
    net = ssvae.SSVAE(Z_DIM, 400, plate=plate, x_dim=X_DIM, name=f"{prefix}ss_vae")
    return net.model, config_enumerate(net.guide, "parallel", expand=False)


def step(objective, program: str, prefix: str, plate) -> Callable:
    if program == "vae":
        model, guide = pyro_programs(*networks((X_DIM, 400, Z_DIM), 0), prefix, plate)
    elif program == "ssvae":
        model, guide = ssvae_programs(prefix, plate)
    else:
        model, guide = discrete_programs(prefix, plate)
    return pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), objective).step


def stock_class(name: str, stock) -> type:
    # Stock's JitTraceGraph_ELBO freezes nothing here: Pyro's own class.
    return stock if stock is not None else getattr(pyro.infer, name)


def options(cls: type) -> dict:
    jit = {"ignore_jit_warnings": True} if "Jit" in cls.__name__ else {}
    return {"max_plate_nesting": 1, **jit}


def main(quick: bool = False) -> list[dict]:
    """Time every row, print the table, return one dict per row."""
    rounds, per_round, warmup = (3, 2, 2) if quick else (11, 5, 5)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    data = torch.bernoulli(
        torch.full((4 * B, X_DIM), 0.3), generator=torch.Generator().manual_seed(0)
    )
    batches = list(data.split(B))
    rows = []
    print(f"SVI ms/step, B={B}, 1 particle, 1 thread; paired ratio = median over {rounds} rounds")
    try:
        for i, (name, program, ours, stock) in enumerate(ROWS):
            stock = stock_class(name, stock)
            pyro.clear_param_store()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                steps = {
                    "batchplate": step(ours(**options(ours)), program, f"b{i}_", batch_plate),
                    "stock": step(stock(**options(stock)), program, f"s{i}_", pyro.plate),
                }
                calls = {k: _on_batches(s, batches) for k, s in steps.items()}
                for call in calls.values():
                    for j in range(warmup):
                        call(j)
                times = timing.interleaved(calls, rounds, per_round)
            ratio = timing.paired_ratio(times["batchplate"], times["stock"])
            row = {"benchmark": "objectives", "objective": name, "program": program}
            row.update({f"{k}_ms": sorted(t)[len(t) // 2] for k, t in times.items()})
            row["paired_ratio"] = ratio
            rows.append(row)
            print(
                f"  {name:<24}{program:<10}batchplate {row['batchplate_ms']:7.2f}  "
                f"stock {row['stock_ms']:7.2f}  paired ratio {ratio:.3f}"
            )
    finally:
        torch.set_num_threads(old_threads)
        pyro.clear_param_store()
    return rows


def _on_batches(step: Callable, batches: list[torch.Tensor]) -> Callable[[int], object]:
    return lambda i: step(batches[i % len(batches)])


if __name__ == "__main__":
    main()
