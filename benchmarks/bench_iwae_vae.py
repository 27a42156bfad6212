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

Not a test. Run ``python benchmarks/bench_iwae_vae.py`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

import batchplate
from batchplate import batch_plate

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


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    parser.add_argument("--steps", type=int, default=10, help="steps per method per round")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per method")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: steadier timings)"
    )
    parser.add_argument(
        "--no-validation", action="store_true", help="pyro.enable_validation(False) for both"
    )
    parser.add_argument("--only", choices=["batchplate", "stock", "torch"], help="profile one")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    pyro.enable_validation(not args.no_validation)
    pyro.clear_param_store()
    g = torch.Generator().manual_seed(args.seed)
    x_dim, h_dim, z_dim = args.sizes
    data = torch.bernoulli(torch.full((8 * args.batch_size, x_dim), 0.3), generator=g)
    batches = list(data.split(args.batch_size))
    steps = build(args.particles, tuple(args.sizes), 1e-3, args.seed)
    if args.only:
        steps = {args.only: steps[args.only]}
    names = list(steps)

    print(
        f"VAE {x_dim}->{h_dim}->{z_dim}, Bernoulli likelihood, B={args.batch_size}, "
        f"K={args.particles}, vectorized; torch {torch.__version__}, pyro {pyro.__version__}, "
        f"batchplate {batchplate.__version__}, python {platform.python_version()}, "
        f"{args.threads} thread(s), validation {'off' if args.no_validation else 'on'}"
    )
    for name, step in steps.items():
        time_steps(step, batches, args.warmup, 0)
        print(f"  warm-up {name}: loss {step(batches[0]):.1f}")

    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            times[name].append(time_steps(steps[name], batches, args.steps, r * args.steps))

    print(f"\nms/step over {args.rounds} rounds of {args.steps} steps (median [min, max]):")
    for name in names:
        t = times[name]
        print(f"  {name:<11}{statistics.median(t):8.2f}   [{min(t):.2f}, {max(t):.2f}]")
    pairs = [("batchplate", "stock"), ("batchplate", "torch"), ("stock", "torch")]
    lines = []
    for a, b in pairs:
        if a in times and b in times:
            per_round = [x / y for x, y in zip(times[a], times[b], strict=True)]
            of_medians = statistics.median(times[a]) / statistics.median(times[b])
            q = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
            lines.append(
                f"  {a + ' / ' + b:<22}{of_medians:6.3f}   per-round median "
                f"{statistics.median(per_round):.3f} [quartiles {q[0]:.3f}, {q[2]:.3f}]"
            )
    if lines:
        print("ratios (ratio of medians; paired per-round ratios):")
        print("\n".join(lines))
    return times


if __name__ == "__main__":
    main()
