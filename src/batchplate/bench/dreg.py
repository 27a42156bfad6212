"""ms/step of the doubly reparameterized estimators next to the standard ones.

The digits VAE of `batchplate.examples.vae` (64 pixels, 8 latents, 128 hidden),
B = 100, K = 50, vectorized particles, one `pyro.infer.SVI` step (forward,
backward, Adam) per call: `RenyiELBO(alpha=0)` against
`RenyiELBO(alpha=0, estimator="dreg")`, and `ReweightedWakeSleep` against
`ReweightedWakeSleep(estimator="dreg")`. All four run interleaved in one
process (`timing.interleaved`); the ratios are paired per round
(`timing.paired_ratio`). DReG's extra cost is one autograd pass from the log
weights back to the sampled latents (the density gradients, not the weights').
RWS-DReG's step (`loss_and_grads`, one backward pass of the sum of its two
losses) needs no extra pass through the model: wake-theta's own path to the
latents, rescaled per particle by a hook, is wake-phi's; its extra cost is one
pass through the guide's densities only, which stops at the latents
(`pathwise.rws_dreg_fused`).
"""

from __future__ import annotations

import statistics

import pyro
import torch

import batchplate
from batchplate.examples import vae as vae_example

from . import timing

B, K = 100, 50


def _step(name: str, estimator: str, x: torch.Tensor):
    vae = vae_example.VAE()
    kw = dict(num_particles=K, vectorize_particles=True, max_plate_nesting=1, estimator=estimator)
    if name == "iwae":
        objective = batchplate.RenyiELBO(alpha=0, **kw)
    else:
        objective = batchplate.ReweightedWakeSleep(**kw)
    svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), objective)
    return lambda i: svi.step(x[(i * B) % 1400 : (i * B) % 1400 + B])


def main(quick: bool = False) -> list[dict]:
    """Print and return one row per objective and estimator, with DReG's paired ratio.

    One torch thread, as the other step benchmarks: on a shared machine a second
    thread waits for a core, which swamps the step (hundreds of ms instead of ~10).
    """
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(quick)
    finally:
        torch.set_num_threads(old_threads)
        pyro.clear_param_store()


def _run(quick: bool) -> list[dict]:
    pyro.clear_param_store()
    torch.manual_seed(0)
    train, _ = vae_example.load_data()
    rounds, per_round = (5, 2) if quick else (11, 3)
    steps = {}
    for name in ("iwae", "rws"):
        for estimator in ("standard", "dreg"):
            # (The four share the parameter store's "encoder"/"decoder": timing only.)
            steps[name, estimator] = _step(name, estimator, train)
    for step in steps.values():  # warm-up
        step(0)
    named = {f"{n}/{e}": s for (n, e), s in steps.items()}
    times = timing.interleaved(named, rounds, per_round)
    rows = []
    for name in ("iwae", "rws"):
        base, dreg = times[f"{name}/standard"], times[f"{name}/dreg"]
        ratio = timing.paired_ratio(dreg, base)
        rows.append(
            {
                "objective": name,
                "ms_standard": statistics.median(base),
                "ms_dreg": statistics.median(dreg),
                "paired_ratio": ratio,
            }
        )
    print(
        f"digits VAE, B={B}, K={K}, 1 torch thread, {rounds} rounds x {per_round} steps, "
        "median ms/step"
    )
    print(f"{'objective':10s} {'standard':>9s} {'dreg':>9s} {'dreg/standard':>14s}")
    for r in rows:
        print(
            f"{r['objective']:10s} {r['ms_standard']:9.2f} {r['ms_dreg']:9.2f} "
            f"{r['paired_ratio']:14.2f}"
        )
    return rows
