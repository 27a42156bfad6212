"""ms/step of a VAE-sized IWAE step: batchplate vs stock Pyro vs hand-written PyTorch.

A Gaussian-latent VAE (784 -> 400 -> 20, Bernoulli likelihood) on random
binary data, minibatch B = 128, K = 16 particles, all vectorized. One step is
the forward pass, backward and an Adam update:

- ``batchplate``: ``pyro.infer.SVI`` with ``batchplate.RenyiELBO(alpha=0)`` and
  the model written with ``batch_plate``;
- ``stock``: the same model with ``pyro.plate`` and ``pyro.infer.RenyiELBO(alpha=0)``
  (with a vectorized plate and vectorized particles stock Pyro keeps per-datum
  weights too, and sums where batchplate averages; the work is the same);
- ``torch``: the IWAE loss written by hand, ``torch.optim.Adam``.

The three run in one process, interleaved: after a warm-up, each round times
``--steps`` steps of every method, in a rotating order, and the report gives
the median over rounds of ms/step and of the per-round ratios (paired, so a
slow moment of a shared machine hits both sides of a ratio).

Not a test. Run ``batchplate bench --only iwae_vae`` or
``python benchmarks/bench_iwae_vae.py`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer.util import is_validation_enabled
from torch import nn

import batchplate
from batchplate import batch_plate

from . import timing

X_DIM, H_DIM, Z_DIM = 784, 400, 20  # defaults; --sizes changes them


class Encoder(nn.Module):
    def __init__(self, x_dim: int, h_dim: int, z_dim: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(x_dim, h_dim)
        self.loc = nn.Linear(h_dim, z_dim)
        self.log_scale = nn.Linear(h_dim, z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.softplus(self.hidden(x))
        return self.loc(h), self.log_scale(h).exp()


class Decoder(nn.Module):
    def __init__(self, x_dim: int, h_dim: int, z_dim: int) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.hidden = nn.Linear(z_dim, h_dim)
        self.logits = nn.Linear(h_dim, x_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.logits(F.softplus(self.hidden(z)))


def networks(sizes: tuple[int, int, int], seed: int) -> tuple[Encoder, Decoder]:
    torch.manual_seed(seed)
    return Encoder(*sizes), Decoder(*sizes)


# -- Pyro: one program, two plates ---------------------------------------------


def pyro_programs(encoder: Encoder, decoder: Decoder, prefix: str, plate) -> tuple:
    def model(x: torch.Tensor) -> None:
        pyro.module(f"{prefix}decoder", decoder)
        with plate("data", x.shape[0]):
            z_dim = decoder.z_dim
            prior = dist.Normal(x.new_zeros(z_dim), x.new_ones(z_dim)).to_event(1)
            z = pyro.sample("z", prior)
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x: torch.Tensor) -> None:
        pyro.module(f"{prefix}encoder", encoder)
        with plate("data", x.shape[0]):
            loc, scale = encoder(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    return model, guide


def pyro_step(objective, plate, prefix: str, sizes: tuple, lr: float, seed: int) -> Callable:
    encoder, decoder = networks(sizes, seed)
    model, guide = pyro_programs(encoder, decoder, prefix, plate)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": lr}), objective)
    return svi.step


# -- hand-written PyTorch IWAE ---------------------------------------------------


def torch_step(K: int, sizes: tuple, lr: float, seed: int) -> Callable:
    encoder, decoder = networks(sizes, seed)
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=lr)

    def step(x: torch.Tensor) -> float:
        loc, scale = encoder(x)
        q = torch.distributions.Normal(loc, scale)
        z = q.rsample((K,))  # [K, B, Z]
        log_q = q.log_prob(z).sum(-1)
        log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        logits = decoder(z)  # [K, B, X]
        log_lik = -F.binary_cross_entropy_with_logits(
            logits, x.expand_as(logits), reduction="none"
        ).sum(-1)
        log_w = log_prior + log_lik - log_q  # [K, B]
        loss = -(torch.logsumexp(log_w, 0) - math.log(K)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


# -- timing -------------------------------------------------------------------------

METHODS = ("batchplate", "stock", "torch")
#: Ratios reported, numerator / denominator.
PAIRS = (("batchplate", "stock"), ("batchplate", "torch"), ("stock", "torch"))


def build(K: int, sizes: tuple[int, int, int], lr: float, seed: int) -> dict[str, Callable]:
    return {
        "batchplate": pyro_step(
            batchplate.RenyiELBO(
                alpha=0, num_particles=K, vectorize_particles=True, max_plate_nesting=1
            ),
            batch_plate,
            "batchplate_",
            sizes,
            lr,
            seed,
        ),
        "stock": pyro_step(
            pyro.infer.RenyiELBO(
                alpha=0, num_particles=K, vectorize_particles=True, max_plate_nesting=1
            ),
            pyro.plate,
            "stock_",
            sizes,
            lr,
            seed,
        ),
        "torch": torch_step(K, sizes, lr, seed),
    }


def time_steps(step: Callable, batches: list[torch.Tensor], n: int, start: int) -> float:
    """ms per step over ``n`` steps."""
    t0 = time.perf_counter()
    for i in range(n):
        step(batches[(start + i) % len(batches)])
    return 1000 * (time.perf_counter() - t0) / n


def summarize(times: dict[str, list[float]]) -> list[dict]:
    """One row per method: median/min/max ms/step and paired ratios to the other methods.

    ``ratio_to_<other>`` is the ratio of medians; ``paired_ratio_to_<other>`` the
    median over rounds of the per-round ratio (both sides measured back to back,
    so a slow moment of a shared machine cancels).
    """
    rows = []
    for name, t in times.items():
        row = {
            "benchmark": "iwae_vae",
            "method": name,
            "ms_per_step": statistics.median(t),
            "ms_min": min(t),
            "ms_max": max(t),
        }
        for a, b in PAIRS:
            if a == name and b in times:
                row[f"ratio_to_{b}"] = statistics.median(t) / statistics.median(times[b])
                row[f"paired_ratio_to_{b}"] = statistics.median(
                    x / y for x, y in zip(t, times[b], strict=True)
                )
        rows.append(row)
    return rows


def format_report(times: dict[str, list[float]], rows: list[dict], steps: int) -> str:
    lines = [f"ms/step over {len(next(iter(times.values())))} rounds of {steps} steps:"]
    lines.append(f"  {'method':<11}{'median':>8}  [min, max]")
    for row in rows:
        lines.append(
            f"  {row['method']:<11}{row['ms_per_step']:8.2f}  "
            f"[{row['ms_min']:.2f}, {row['ms_max']:.2f}]"
        )
    ratios = []
    for a, b in PAIRS:
        if a in times and b in times:
            per_round = [x / y for x, y in zip(times[a], times[b], strict=True)]
            of_medians = statistics.median(times[a]) / statistics.median(times[b])
            q = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
            ratios.append(
                f"  {a + ' / ' + b:<22}{of_medians:6.3f}   per-round median "
                f"{statistics.median(per_round):.3f} [quartiles {q[0]:.3f}, {q[2]:.3f}]"
            )
    if ratios:
        lines.append("ratios (ratio of medians; paired per-round ratios):")
        lines.extend(ratios)
    return "\n".join(lines)


def main(
    quick: bool = False,
    *,
    batch_size: int = 128,
    particles: int = 16,
    sizes: Sequence[int] = (X_DIM, H_DIM, Z_DIM),
    steps: int | None = None,
    rounds: int | None = None,
    warmup: int | None = None,
    threads: int | None = 1,
    validation: bool = True,
    only: Sequence[str] | None = None,
    seed: int = 0,
    file: TextIO | None = None,
) -> list[dict]:
    """Time one IWAE step of each method, interleaved in one process; print the table.

    ``quick`` takes 3 rounds of 3 steps after 2 warm-up steps (a few seconds,
    a rough check); the default is 15 rounds of 10 steps after 10 warm-up
    steps. ``threads=None`` leaves torch's thread count alone. Returns one row
    per method (see :func:`summarize`).
    """
    file = sys.stdout if file is None else file
    steps = steps if steps is not None else (3 if quick else 10)
    rounds = rounds if rounds is not None else (3 if quick else 15)
    warmup = warmup if warmup is not None else (2 if quick else 10)
    sizes = tuple(sizes)
    old_threads = torch.get_num_threads()
    old_validation = is_validation_enabled()
    if threads is not None:
        torch.set_num_threads(threads)
    pyro.enable_validation(validation)
    try:
        pyro.clear_param_store()
        g = torch.Generator().manual_seed(seed)
        data = torch.bernoulli(torch.full((8 * batch_size, sizes[0]), 0.3), generator=g)
        batches = list(data.split(batch_size))
        step_fns = build(particles, sizes, 1e-3, seed)
        if only:
            step_fns = {name: step_fns[name] for name in only}

        print(_header(sizes, batch_size, particles, validation), file=file)
        for name, step in step_fns.items():
            time_steps(step, batches, warmup, 0)
            print(f"  warm-up {name}: loss {step(batches[0]):.1f}", file=file)
        calls = {name: _batch_step(step, batches) for name, step in step_fns.items()}
        times = timing.interleaved(calls, rounds, per_round=steps)
        rows = summarize(times)
        print(file=file)
        print(format_report(times, rows, steps), file=file)
        return rows
    finally:
        torch.set_num_threads(old_threads)
        pyro.enable_validation(old_validation)
        pyro.clear_param_store()


def _header(sizes: tuple, batch_size: int, particles: int, validation: bool) -> str:
    x_dim, h_dim, z_dim = sizes
    return (
        f"VAE {x_dim}->{h_dim}->{z_dim}, Bernoulli likelihood, B={batch_size}, "
        f"K={particles}, vectorized; torch {torch.__version__}, pyro {pyro.__version__}, "
        f"batchplate {batchplate.__version__}, python {platform.python_version()}, "
        f"{torch.get_num_threads()} thread(s), validation {'on' if validation else 'off'}"
    )


def _batch_step(step: Callable, batches: list[torch.Tensor]) -> Callable[[int], object]:
    return lambda i: step(batches[i % len(batches)])


def cli(argv: list[str] | None = None) -> list[dict]:
    """The command-line options of ``benchmarks/bench_iwae_vae.py``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 3 steps")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--particles", type=int, default=16)
    parser.add_argument(
        "--sizes",
        type=int,
        nargs=3,
        default=(X_DIM, H_DIM, Z_DIM),
        metavar=("X", "H", "Z"),
        help="data, hidden and latent dims (default 784 400 20; small ones expose overhead)",
    )
    parser.add_argument("--steps", type=int, help="steps per method per round (default 10)")
    parser.add_argument("--rounds", type=int, help="default 15")
    parser.add_argument("--warmup", type=int, help="untimed steps per method (default 10)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: steadier timings)"
    )
    parser.add_argument(
        "--no-validation", action="store_true", help="pyro.enable_validation(False) for all"
    )
    parser.add_argument("--only", choices=METHODS, action="append", help="profile one method")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return main(
        args.quick,
        batch_size=args.batch_size,
        particles=args.particles,
        sizes=args.sizes,
        steps=args.steps,
        rounds=args.rounds,
        warmup=args.warmup,
        threads=args.threads,
        validation=not args.no_validation,
        only=args.only,
        seed=args.seed,
    )


if __name__ == "__main__":
    cli()
