"""ms/step of `autobatch=True` against the sequential program and the padded form.

At `B = 64`, `K = 16`, one torch thread, one `pyro.infer.SVI` step including
backward and the Adam update, the methods interleaved in one process
(`timing.interleaved`), ratios paired per round (`timing.paired_ratio`):

- geometric (Pyro issue #2220), IWAE (`RenyiELBO(alpha=0)`): the sequential
  program one trace per particle, the same program with `autobatch=True`,
  and the hand-written padded form;
- PCFG with its GRU guide, reweighted wake-sleep: sequential, autobatch and
  the hand-written padded form;
- what autobatch itself costs per lane and per site: a program with 1, 2 or
  5 sites per datum and nothing else, its `2 B K` lane runs (guide and model);
- how the autobatched geometric step grows with the number of lanes `B * K`
  (64 to 4096);
- the floor: the geometric program's own Python (`_floor_step`), which any
  execution that runs each lane's Python pays, with its distributions built
  as in the lanes and as written.

Not a test: `batchplate bench --only autobatch [--quick]`.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.distribution import COERCIONS
from torch.distributions import Distribution

import batchplate
from batchplate import batch_plate

from ..autobatch import autobatch_log_weights
from ..autobatch._construct import lane_distribution
from ..examples import geometric, pcfg
from ..examples._pcfg_programs import PCFG
from . import timing

B, K = 64, 16


def _svi(model, guide, loss, *args) -> Callable[[int], object]:
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss)
    svi.step(*args)  # warm-up, parameters created
    return lambda i: svi.step(*args)


def _geometric_steps(b: int, k: int, padded: bool, sequential: bool) -> dict:
    obs = geometric.sample_data(b, 0.3, seed=0)
    steps = {}
    if sequential:
        loss = batchplate.RenyiELBO(alpha=0, num_particles=k)
        steps["sequential"] = _svi(
            geometric.model_sequential, geometric.guide_sequential, loss, obs
        )
    # All K * B lanes in one run (vectorize_particles=False would run B lanes per particle).
    loss = batchplate.RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True, autobatch=True)
    steps["autobatch"] = _svi(geometric.model_sequential, geometric.guide_sequential, loss, obs)
    if padded:
        loss = batchplate.RenyiELBO(
            alpha=0, num_particles=k, vectorize_particles=True, max_plate_nesting=1
        )
        steps["padded"] = _svi(geometric.model_padded, geometric.guide_padded, loss, obs)
    return steps


def _floor_step(b: int, k: int, as_lanes: bool = True) -> Callable[[int], object]:
    """The geometric program's own Python, the floor of any lane-by-lane execution.

    Guide and model run `k` times over the `b` data with `pyro.sample` replaced
    by a function that returns the observation or the next of a list of fair
    coin flips: no handler, no tensor operation per site, no backward, only
    the program (its recursion, its `Bernoulli` objects, its batch plate).
    With `as_lanes` its distributions are built as in autobatch's lanes
    (validation off, `autobatch._construct.lane_distribution`); without, as
    the program runs by itself (Pyro's default validation, the constructors).
    """
    obs = geometric.sample_data(b, 0.3, seed=0)
    coins = torch.rand(200_000, generator=torch.Generator().manual_seed(0)) < 0.5
    flips = coins.float().unbind(0)

    def step(i: int) -> None:
        draws = iter(flips)

        def sample(name: str, fn: object, *args: object, obs: object = None, **kw: object):
            return obs if obs is not None else next(draws)

        real, pyro.sample = pyro.sample, sample
        validate = Distribution._validate_args
        if as_lanes:
            Distribution.set_default_validate_args(False)
            COERCIONS.insert(0, lane_distribution)
        try:
            for _ in range(k):
                geometric.guide_sequential(obs)
                geometric.model_sequential(obs)
        finally:
            pyro.sample = real
            if as_lanes:
                COERCIONS.remove(lane_distribution)
                Distribution.set_default_validate_args(validate)

    return step


def _sites_program(n: int) -> Callable:
    """A program with `n` `Bernoulli` sites per datum and nothing else (model = guide):
    what autobatch costs per lane and per site, apart from any program's own work."""
    logits = torch.tensor(0.0)

    def program(b: int) -> None:
        for i in batch_plate("batch", b):
            for j in range(n):
                pyro.sample(f"z_{i}_{j}", dist.Bernoulli(logits=logits))

    return program


def _sites_rows(rounds: int) -> list[dict]:
    """ms for the `2 B K` lane runs of `_sites_program(n)` (guide and model, no backward)."""
    steps = {}
    for n in (1, 2, 5):
        program = _sites_program(n)
        steps[f"{n} sites per lane"] = lambda i, p=program: autobatch_log_weights(
            p, p, (B,), {}, num_particles=K
        )
    times = timing.interleaved(steps, rounds)
    return [
        {
            "program": f"2BK lanes, {name}",
            "method": "autobatch",
            "ms_per_step": statistics.median(ms),
        }
        for name, ms in times.items()
    ]


def _pcfg_steps() -> dict:
    grammar = PCFG(max_words=12)
    sentences, lengths = pcfg.pad(pcfg.sample_sentences(B, 12, seed=0), 12)
    steps = {}
    for name, auto in (("sequential", False), ("autobatch", True)):
        loss = batchplate.ReweightedWakeSleep(
            num_particles=K, vectorize_particles=auto, autobatch=auto
        )
        args = (sentences, lengths)
        steps[name] = _svi(grammar.model_sequential, grammar.guide_sequential, loss, *args)
    loss = batchplate.ReweightedWakeSleep(
        num_particles=K, vectorize_particles=True, max_plate_nesting=1
    )
    steps["padded"] = _svi(grammar.model_padded, grammar.guide_padded, loss, sentences, lengths)
    return steps


def _rows(program: str, times: dict[str, list[float]]) -> list[dict]:
    rows = []
    for name, ms in times.items():
        row = {"program": program, "method": name, "ms_per_step": statistics.median(ms)}
        if name != "autobatch":
            row["x_autobatch"] = timing.paired_ratio(ms, times["autobatch"])
        rows.append(row)
    return rows


def main(quick: bool = False) -> list[dict]:
    """Print and return the rows: the two programs, then the scaling in `B * K`."""
    torch.set_num_threads(1)
    pyro.clear_param_store()
    rounds = 2 if quick else 5
    steps = _geometric_steps(B, K, True, True)
    steps["floor"] = _floor_step(B, K)
    steps["floor, as written"] = _floor_step(B, K, as_lanes=False)
    rows = _rows("geometric", timing.interleaved(steps, rounds))
    pyro.clear_param_store()
    rows += _rows("pcfg", timing.interleaved(_pcfg_steps(), 1 if quick else 3))
    rows += _sites_rows(rounds)
    for lanes in (64, 256, 1024, 4096):
        pyro.clear_param_store()
        steps = _geometric_steps(
            lanes // K if lanes >= K * 4 else 4, min(K, lanes // 4), False, False
        )
        ms = statistics.median(timing.interleaved(steps, rounds)["autobatch"])
        rows.append({"program": f"geometric B*K={lanes}", "method": "autobatch", "ms_per_step": ms})
    for row in rows:
        extra = (
            f"  {row['method']} / autobatch = {row['x_autobatch']:.2f}"
            if "x_autobatch" in row
            else ""
        )
        print(f"{row['program']:>24} {row['method']:>17} {row['ms_per_step']:9.1f} ms{extra}")
    return rows
