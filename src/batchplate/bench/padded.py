"""ms/step of stochastic-control-flow programs: one trace per particle, padded traces, stock Pyro.

Two programs whose trace length depends on sampled values, each written in
the two forms of `batchplate.examples.geometric` and `batchplate.examples.pcfg`,
at minibatch `B = 64` and `K = 16` particles:

- geometric (the program of Pyro issue #2220), one `pyro.infer.SVI` step of
  `batchplate.RenyiELBO(alpha=0)` (IWAE, per-datum score-function term)
  including backward and the Adam update:

    - `per-particle`: sequential `batch_plate`, one trace pair per particle
      (`vectorize_particles=False`), `K * B` Python recursions;
    - `stock Pyro`: the same program with `pyro.plate` under
      `pyro.infer.RenyiELBO(alpha=0, vectorize_particles=False)`, the setting
      of Pyro issue #2220 (its bound is the wrong, joint-batch one; shown for
      cost: it does the same tracing work);
    - `padded`: `batchplate.Lanes` over all `K * B` lanes,
      `vectorize_particles=True`;

- PCFG (the "astronomers" grammar, amortized GRU guide), one SVI step of
  `batchplate.ReweightedWakeSleep` (wake-wake), per-particle vs padded.

The methods of a program run interleaved in one process, one step each per
round in a rotating order; the table gives the median ms/step, the speed-up
of the padded form, and for the per-particle geometric row its paired ratio
to stock Pyro (the median over rounds of the two steps' ratio). One torch
thread. Not a test: `batchplate bench --only padded` or
`python benchmarks/bench_padded.py [--quick]`.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch

import batchplate

from ..examples import geometric, pcfg
from . import timing

B, K = 64, 16


def _stock_model(obs: torch.Tensor) -> None:
    logits = pyro.param("model_logits", lambda: torch.tensor(0.0, device=obs.device))
    for b in pyro.plate("batch", len(obs)):
        g = geometric.geometric_sequential(f"{b}", 0, logits)
        pyro.sample(
            f"obs_{b}",
            dist.Bernoulli(probs=torch.tensor(geometric.MATCH, device=obs.device)),
            obs=torch.tensor(float(g == int(obs[b])), device=obs.device),
        )


def _stock_guide(obs: torch.Tensor) -> None:
    logits = pyro.param("guide_logits", lambda: torch.tensor(0.0, device=obs.device))
    for b in pyro.plate("batch", len(obs)):
        geometric.geometric_sequential(f"{b}", 0, logits)


def _svi_step(model, guide, loss, args) -> Callable[[int], object]:
    """A warmed-up SVI step. Methods share parameter names, hence values: every
    method sees the same program as training moves it."""
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss)
    svi.step(*args)
    return lambda i: svi.step(*args)


def _geometric_rows(rounds: int) -> list[dict]:
    obs = geometric.sample_data(B, 0.3, seed=0)
    iwae = {"alpha": 0.0, "num_particles": K, "max_plate_nesting": 1}
    steps = {
        "per-particle": _svi_step(
            geometric.model_sequential,
            geometric.guide_sequential,
            batchplate.RenyiELBO(vectorize_particles=False, **iwae),
            (obs,),
        ),
        "stock Pyro": _svi_step(
            _stock_model,
            _stock_guide,
            pyro.infer.RenyiELBO(alpha=0.0, num_particles=K, vectorize_particles=False),
            (obs,),
        ),
        "padded": _svi_step(
            geometric.model_padded,
            geometric.guide_padded,
            batchplate.RenyiELBO(vectorize_particles=True, **iwae),
            (obs,),
        ),
    }
    times = timing.interleaved(steps, rounds)
    rows = _rows("geometric", "RenyiELBO(alpha=0)", times)
    rows[0]["paired_ratio_to_stock"] = timing.paired_ratio(
        times["per-particle"], times["stock Pyro"]
    )
    return rows


def _pcfg_rows(rounds: int, quick: bool) -> list[dict]:
    sentences, lengths = pcfg.pad(pcfg.sample_sentences(B, 12, seed=0), 12)
    grammar = pcfg.PCFG(max_words=12)
    rws = {"num_particles": K, "max_plate_nesting": 1, "insomnia": 1.0}
    # The per-particle PCFG takes tens of seconds per step at B = 64: quick runs B/4, scaled.
    B_seq = B // 4 if quick else B
    steps = {
        "per-particle": _svi_step(
            grammar.model_sequential,
            grammar.guide_sequential,
            batchplate.ReweightedWakeSleep(vectorize_particles=False, **rws),
            (sentences[:B_seq], lengths[:B_seq]),
        ),
        "padded": _svi_step(
            grammar.model_padded,
            grammar.guide_padded,
            batchplate.ReweightedWakeSleep(vectorize_particles=True, **rws),
            (sentences, lengths),
        ),
    }
    times = timing.interleaved(steps, rounds)
    times["per-particle"] = [t * B / B_seq for t in times["per-particle"]]  # linear in B
    rows = _rows("pcfg", "ReweightedWakeSleep", times)
    if B_seq != B:
        rows[0]["form"] += f" (B={B_seq}, scaled)"
    return rows


def _rows(program: str, objective: str, times: dict[str, list[float]]) -> list[dict]:
    padded = statistics.median(times["padded"])
    return [
        {
            "program": program,
            "objective": objective,
            "form": form,
            "B": B,
            "K": K,
            "ms_per_step": statistics.median(t),
            "speedup_of_padded": statistics.median(t) / padded,
        }
        for form, t in times.items()
    ]


def main(quick: bool = False) -> list[dict]:
    """Time both programs in all forms; print the table and return its rows.

    `quick`: 2 rounds (after a warm-up step) instead of 7, and the per-particle
    PCFG at `B = 16`.
    """
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    try:
        rounds = 2 if quick else 7
        rows = _geometric_rows(rounds) + _pcfg_rows(rounds if quick else 3, quick)
    finally:
        torch.set_num_threads(old_threads)
        pyro.clear_param_store()
    print(f"stochastic control flow, B={B}, K={K}, 1 torch thread, interleaved rounds")
    header = ("program", "objective", "form", "ms/step", "x padded", "x stock")
    print("{:<10} {:<20} {:<26} {:>9} {:>9} {:>8}".format(*header))
    for r in rows:
        stock = f"{r['paired_ratio_to_stock']:8.3f}" if "paired_ratio_to_stock" in r else ""
        print(
            f"{r['program']:<10} {r['objective']:<20} {r['form']:<26} "
            f"{r['ms_per_step']:>9.1f} {r['speedup_of_padded']:>9.1f} {stock:>8}"
        )
    return rows


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two timed rounds")
    main(quick=parser.parse_args().quick)


if __name__ == "__main__":
    cli()
