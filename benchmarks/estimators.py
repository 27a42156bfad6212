"""Gradient estimators' experiments (docs/estimators.md): SNR vs K, VAE learning, GMM.

    python benchmarks/estimators.py snr    [--reps 2000] [--vae-reps 60]
    python benchmarks/estimators.py learn  [--steps 3000] [--seeds 0 1] [--test-size N]
    python benchmarks/estimators.py gmm    [--steps 3000] [--seeds 0 1] [--Ks 2 5] [--defensive 0.2]

`snr`: the guide gradient's signal-to-noise ratio `|E g| / sd(g)` of IWAE,
IWAE-DReG, RWS (wake-phi) and RWS-DReG for K in {1, 4, 16, 64, 256} (RWS from
K = 4: it needs K >= 2), on the conjugate scale model (guide off the posterior,
one datum per replicate, `d/d loc`) and on the digits VAE (a fixed minibatch of
32 images after 300 ELBO steps; SNR of every encoder weight, averaged), with
fitted log-log slopes and a PNG (docs/img/estimators-snr.png).
`learn`: the digits VAE trained at K = 50 with IWAE, IWAE-DReG and RWS-DReG:
test log-likelihood (`log_evidence`, K = 5000) and the guide's per-datum
effective sample size at K = 50 on the test set.
`gmm`: the GMM example's wake-wake RWS with and without `defensive=0.2`, paired by
seed; ends with a table per K of mean +- standard error over the seeds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pyro
import pyro.distributions as dist
import torch

import batchplate
from batchplate import batch_plate
from batchplate.examples import vae as vae_example

KS = (1, 4, 16, 64, 256)
NAMES = ("iwae", "iwae-dreg", "rws", "rws-dreg")
M, S, T = 8.5, 1.0, 0.75


def objective(name: str, K: int, **kw) -> batchplate.BatchObjective:
    kw = dict(num_particles=K, vectorize_particles=True, max_plate_nesting=1, **kw)
    if name.startswith("iwae"):
        return batchplate.RenyiELBO(
            alpha=0, estimator="dreg" if "dreg" in name else "standard", **kw
        )
    return batchplate.ReweightedWakeSleep(estimator="dreg" if "dreg" in name else "standard", **kw)


def conjugate_grads(name: str, K: int, reps: int, seed: int) -> torch.Tensor:
    """`[reps]` replicates of `d loss / d loc` for one datum (x = 10), guide off the posterior."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    x = torch.full((reps,), 10.0)

    def model(x):
        with batch_plate("data", len(x)):
            w = pyro.sample("w", dist.Normal(M, S))
            pyro.sample("x", dist.Normal(w, T), obs=x)

    def guide(x):
        loc = pyro.param("loc", lambda: 0.64 * x + 3.06 + 0.5)
        with batch_plate("data", len(x)):
            pyro.sample("w", dist.Normal(loc, 0.6 * 1.5))

    objective(name, K).loss_and_grads(model, guide, x)
    return pyro.param("loc").unconstrained().grad * reps


def vae_snr(name: str, K: int, vae, x: torch.Tensor, reps: int) -> float:
    """Mean over encoder weights of `|mean g| / sd(g)` over `reps` steps on `x`."""
    obj = objective(name, K)
    params = list(vae.encoder.parameters())
    grads = []
    for _ in range(reps):
        loss = obj.differentiable_loss(vae.model, vae.guide, x)
        if isinstance(loss, tuple):
            loss = sum(loss)
        g = torch.autograd.grad(loss, params, allow_unused=True)
        grads.append(torch.cat([gi.reshape(-1) for gi in g if gi is not None]))
    g = torch.stack(grads)
    snr = g.mean(0).abs() / g.std(0).clamp_min(1e-12)
    return float(snr.mean())


def pretrained_vae(steps: int = 300):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    train, _ = vae_example.load_data()
    vae = vae_example.VAE()
    svi = pyro.infer.SVI(
        vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), batchplate.Trace_ELBO()
    )
    for i in range(steps):
        svi.step(train[(i * 100) % 1400 : (i * 100) % 1400 + 100])
    return vae, train[:32]


def slope(Ks, values) -> float:
    return float(np.polyfit(np.log(Ks), np.log(values), 1)[0])


def snr_main(args) -> None:
    table = {"conjugate": {}, "vae": {}}
    vae, x = pretrained_vae()
    for name in NAMES:
        Ks = [K for K in KS if K >= 2 or not name.startswith("rws")]
        conj = []
        for K in Ks:
            g = conjugate_grads(name, K, args.reps, seed=K)
            conj.append(float(g.mean().abs() / g.std()))
        table["conjugate"][name] = (Ks, conj)
        table["vae"][name] = (Ks, [vae_snr(name, K, vae, x, args.vae_reps) for K in Ks])
    for problem, rows in table.items():
        for name, (Ks, snr) in rows.items():
            cells = " ".join(f"{v:8.3f}" for v in snr)
            print(f"{problem:9s} {name:10s} slope {slope(Ks, snr):+.2f}  SNR {cells}  (K={Ks})")
    plot(table, args.out)


def plot(table, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, (problem, rows) in zip(axes, table.items(), strict=True):
        for name, (Ks, snr) in rows.items():
            ax.loglog(Ks, snr, "o-", label=f"{name} (slope {slope(Ks, snr):+.2f})")
        ax.set_title(f"{problem}: guide-gradient SNR")
        ax.set_xlabel("K")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print("wrote", path)


def learn_run(name: str, seed: int, train: torch.Tensor, test: torch.Tensor, steps: int):
    """Train the digits VAE at K = 50 with `name`; return (test LL at K = 5000, ESS at K = 50)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    vae = vae_example.VAE()
    svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), objective(name, 50))
    for _ in range(steps):
        idx = torch.randint(0, len(train), (100,))
        svi.step(train[idx])
    with torch.no_grad():
        ll = vae_example.test_log_likelihood(vae, test, 5000, 500).mean().item()
        log_w = batchplate.log_weights(
            vae.model, vae.guide, test, num_particles=50, vectorize_particles=True,
            max_plate_nesting=1,
        )  # fmt: skip
        w = torch.softmax(log_w, 0)
        ess = float((1 / (w**2).sum(0)).mean())  # per datum, then averaged
    return ll, ess


def learn_main(args) -> None:
    """Seeds outer, objectives inner: an interrupted run still gives paired seeds."""
    train, test = vae_example.load_data()
    test = test[: args.test_size] if args.test_size else test
    results: dict = {name: [] for name in args.names}
    for seed in args.seeds:
        for name in args.names:
            t0 = time.perf_counter()
            ll, ess = learn_run(name, seed, train, test, args.steps)
            results[name].append((ll, ess))
            print(
                f"{name} seed {seed}: test LL {ll:.3f}, ESS {ess:.1f}/50 "
                f"({len(test)} test images, {args.steps} steps, {time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
    for name, rows in results.items():
        lls = [f"{ll:.3f}" for ll, _ in rows]
        ll = statistics.mean(ll for ll, _ in rows)
        ess = statistics.mean(e for _, e in rows)
        print(f"== {name}: test LL {ll:.3f} (seeds {', '.join(lls)}), ESS {ess:.1f}/50", flush=True)


def gmm_main(args) -> None:
    """The GMM example's own training (`gmm.train`: its data, minibatches, Adam
    schedule and metrics), with wake-wake RWS built with and without `defensive`.
    K and seed outer, the two proposals inner: an interrupted run stays paired.
    Ends with a table per K: mean +- standard error over seeds of each proposal's
    final weight error and KL, and of their paired difference (defensive - plain)."""
    results: dict = {}
    for K in args.Ks:
        for seed in args.seeds:
            for defensive in (0.0, args.defensive):
                t0 = time.perf_counter()
                weight_error, kl = gmm_run(K, seed, defensive, args.steps)
                results[K, seed, defensive] = (weight_error, kl)
                print(
                    f"rws defensive={defensive} K={K} seed={seed}: weight error "
                    f"{weight_error:.3f}, KL {kl:.2f} "
                    f"({args.steps} steps, {time.perf_counter() - t0:.0f}s)",
                    flush=True,
                )
    gmm_table(results, args)


def gmm_run(K: int, seed: int, defensive: float, steps: int) -> tuple[float, float]:
    """Final (weight error, posterior KL) of the GMM example's wake-wake training."""
    from batchplate.examples import gmm as gmm_example

    standard = gmm_example.make_objective
    gmm_example.make_objective = lambda name, K: batchplate.ReweightedWakeSleep(
        num_particles=K, defensive=defensive, vectorize_particles=True, max_plate_nesting=1
    )
    try:
        _, hist = gmm_example.train("rws", K, steps=steps, seed=seed)
    finally:
        gmm_example.make_objective = standard
    return hist["weight_error"][-1], hist["kl"][-1]


def mean_sem(values: list[float]) -> str:
    sem = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.3f} ± {sem:.3f}"


def gmm_table(results: dict, args) -> None:
    """A markdown table, one row per K, over the seeds that ran both proposals."""
    eps = args.defensive
    print(f"\n{args.steps} steps, seeds {args.seeds}, mean ± s.e.m. over seeds")
    print("| K | weight error, plain | weight error, defensive | difference | "
          "KL, plain | KL, defensive | difference |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for K in args.Ks:
        seeds = [s for s in args.seeds if (K, s, eps) in results]
        cells = []
        for metric in (0, 1):
            plain = [results[K, s, 0.0][metric] for s in seeds]
            defensive = [results[K, s, eps][metric] for s in seeds]
            diff = [d - p for d, p in zip(defensive, plain, strict=True)]
            cells += [mean_sem(plain), mean_sem(defensive), mean_sem(diff)]
        print(f"| {K} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("snr", "learn", "gmm"))
    parser.add_argument("--reps", type=int, default=2000)
    parser.add_argument("--vae-reps", type=int, default=60)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--Ks", type=int, nargs="+", default=[2, 5, 10, 20])
    parser.add_argument("--defensive", type=float, default=0.2)
    parser.add_argument("--test-size", type=int, default=0, help="learn: first N test images")
    parser.add_argument("--names", nargs="+", default=["iwae", "iwae-dreg", "rws-dreg"])
    parser.add_argument("--out", default="docs/img/estimators-snr.png")
    args = parser.parse_args()
    {"snr": snr_main, "learn": learn_main, "gmm": gmm_main}[args.what](args)


if __name__ == "__main__":
    main()
