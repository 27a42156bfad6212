"""ms/step of stochastic-control-flow programs: sequential vs padded traces.

Two programs whose trace length depends on sampled values, each written in
the two forms of :mod:`batchplate.examples.geometric` and
:mod:`batchplate.examples.pcfg`, at minibatch ``B = 64`` and ``K = 16``
particles:

- geometric (the seed's program), one ``pyro.infer.SVI`` step of
  ``batchplate.RenyiELBO(alpha=0)`` (IWAE, per-datum score-function term)
  including backward and the Adam update:

  - ``sequential``: sequential ``batch_plate``, one trace per particle
    (``vectorize_particles=False``), ``K * B`` Python recursions;
  - ``padded``: :class:`~batchplate.Lanes` over all ``K * B`` lanes,
    ``vectorize_particles=True``;
  - ``stock Pyro``: the seed's program with ``pyro.plate`` under
    ``pyro.infer.RenyiELBO(alpha=0, vectorize_particles=False)`` (the seed's
    setting; its bound is the wrong, joint-batch one, shown for cost only);

- PCFG (the "astronomers" grammar, amortized GRU guide), one SVI step of
  ``batchplate.ReweightedWakeSleep`` (wake-wake), sequential vs padded.

Ratios are ``sequential ms / padded ms`` measured in the same run. Set
``torch.set_num_threads(1)`` (done by :func:`main`) for stable numbers on a
shared machine. Not a test: ``batchplate bench --only padded`` or
``python benchmarks/bench_padded.py [--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch

from ..examples import geometric, pcfg


def _stock_model(obs: torch.Tensor) -> None:
    logits = pyro.param("model_logits", torch.tensor(0.0))
    for b in pyro.plate("batch", len(obs)):
        g = geometric.geometric_sequential(f"{b}", 0, logits)
        pyro.sample(
            f"obs_{b}",
            dist.Bernoulli(probs=torch.tensor(geometric.MATCH)),
            obs=torch.tensor(float(g == int(obs[b]))),
        )


def _stock_guide(obs: torch.Tensor) -> None:
    logits = pyro.param("guide_logits", torch.tensor(0.0))
    for b in pyro.plate("batch", len(obs)):
        geometric.geometric_sequential(f"{b}", 0, logits)


def _time(step: Callable[[], object], repeats: int) -> float:
    """Median ms of ``repeats`` calls of ``step`` after one warm-up call."""
    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def _svi_step(model, guide, loss, args) -> Callable[[], object]:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss)
    return lambda: svi.step(*args)


def main(quick: bool = False) -> list[dict]:
    """Time both programs in both forms; print the table and return its rows.

    ``quick``: one timed step each (after a warm-up) instead of several, and
    the sequential PCFG at ``B = 16`` (it takes tens of seconds per step at 64).
    """
    torch.set_num_threads(1)
    B, K = 64, 16
    reps_fast, reps_slow = (3, 1) if quick else (20, 3)
    rows: list[dict] = []

    # -- geometric -------------------------------------------------------------
    obs = geometric.sample_data(B, 0.3, seed=0)
    iwae = {"alpha": 0.0, "num_particles": K, "max_plate_nesting": 1}
    padded = _time(
        _svi_step(
            geometric.model_padded,
            geometric.guide_padded,
            _batchplate_renyi(vectorize=True, **iwae),
            (obs,),
        ),
        reps_fast,
    )
    sequential = _time(
        _svi_step(
            geometric.model_sequential,
            geometric.guide_sequential,
            _batchplate_renyi(vectorize=False, **iwae),
            (obs,),
        ),
        reps_slow,
    )
    stock = _time(
        _svi_step(
            _stock_model,
            _stock_guide,
            pyro.infer.RenyiELBO(alpha=0.0, num_particles=K, vectorize_particles=False),
            (obs,),
        ),
        reps_slow,
    )
    for form, ms in (("padded", padded), ("sequential", sequential), ("stock Pyro seq.", stock)):
        rows.append(
            {
                "program": "geometric",
                "objective": "RenyiELBO(alpha=0)",
                "form": form,
                "B": B,
                "K": K,
                "ms_per_step": ms,
                "speedup_of_padded": ms / padded,
            }
        )

    # -- PCFG ---------------------------------------------------------------------
    sentences, lengths = pcfg.pad(pcfg.sample_sentences(B, 12, seed=0), 12)
    grammar = pcfg.PCFG(max_words=12)
    rws = {"num_particles": K, "max_plate_nesting": 1, "insomnia": 1.0}
    padded = _time(
        _svi_step(
            grammar.model_padded,
            grammar.guide_padded,
            _batchplate_rws(vectorize=True, **rws),
            (sentences, lengths),
        ),
        reps_fast,
    )
    B_seq = 16 if quick else B
    sequential = _time(
        _svi_step(
            grammar.model_sequential,
            grammar.guide_sequential,
            _batchplate_rws(vectorize=False, **rws),
            (sentences[:B_seq], lengths[:B_seq]),
        ),
        reps_slow,
    )
    sequential *= B / B_seq  # per-datum work is linear in B for the sequential form
    for form, ms in (("padded", padded), ("sequential", sequential)):
        rows.append(
            {
                "program": "pcfg",
                "objective": "ReweightedWakeSleep",
                # In quick mode the sequential PCFG runs B/4 data, scaled up linearly.
                "form": form if B_seq == B or form == "padded" else f"{form} (B={B_seq}, scaled)",
                "B": B,
                "K": K,
                "ms_per_step": ms,
                "speedup_of_padded": ms / padded,
            }
        )

    print(f"padded traces, B={B}, K={K}, torch threads={torch.get_num_threads()}")
    print(f"{'program':<10} {'objective':<20} {'form':<26} {'ms/step':>10} {'x padded':>9}")
    for r in rows:
        print(
            f"{r['program']:<10} {r['objective']:<20} {r['form']:<26} "
            f"{r['ms_per_step']:>10.1f} {r['speedup_of_padded']:>9.1f}"
        )
    return rows


def _batchplate_renyi(vectorize: bool, **kwargs):
    import batchplate

    return batchplate.RenyiELBO(vectorize_particles=vectorize, **kwargs)


def _batchplate_rws(vectorize: bool, **kwargs):
    import batchplate

    return batchplate.ReweightedWakeSleep(vectorize_particles=vectorize, **kwargs)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one timed step each")
    main(quick=parser.parse_args().quick)


if __name__ == "__main__":
    cli()
