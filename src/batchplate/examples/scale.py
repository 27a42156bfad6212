"""The scale example of Pyro issue #2220, corrected, trained with reweighted wake-sleep.

Pyro issue #2220 ("Batching and plating") starts from a model that weighs an
object with a noisy scale, `weight ~ N(guess, 1)` and
`measurement ~ N(weight, 0.75)`, and an amortized guide
`N(a * x + c, exp(log_scale))`, written with a `return` inside the loop over
the plate, which ended the loop after the first datum. Here the program is
written with a batch plate, vectorized or sequential, and trained on
minibatches drawn from a dataset. The exact amortized posterior is
`a = s^2/(s^2+t^2) = 0.64`, `c = m t^2/(s^2+t^2) = 3.06`, scale
`s t / sqrt(s^2+t^2) = 0.6` (see the RWS page of the docs); when the prior mean
`guess` is learned, its maximum-likelihood value is the data mean.

`run()` follows the example convention (`batchplate run scale`): it trains
with one objective and plots `a`, `c`, `scale` and `guess` over the steps
against their exact values. `grid()` (`python -m batchplate.examples.scale
--grid`) trains over insomnia in `{1, 0.5, 0}`, both layouts and several
seeds, and prints the learned values with their run-to-run spread.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch

import batchplate
from batchplate.examples import _common as common
from batchplate.examples import _runner as runner
from batchplate.examples._scale_programs import (
    GUESS,
    GUESS_SCALE,
    LAYOUTS,
    OBS_SCALE,
    PROGRAMS,
    Posterior,
    guide,
    guide_params,
    make_dataset,
    model,
    observations_of,
    sequential_guide,
    sequential_model,
)

# The programs' names are part of this example's API (`scale.model`, ...).
__all__ = ["GUESS", "GUESS_SCALE", "OBS_SCALE", "Options", "Posterior", "grid", "guide"]
__all__ += ["guide_params", "make_dataset", "make_objective", "model", "observations_of"]
__all__ += ["run", "sequential_guide", "sequential_model", "train"]

NAME = "scale"
OBJECTIVES = ("elbo", "iwae", "vimco", "rws", "ws")


@dataclass(frozen=True, kw_only=True)
class Options(runner.Options):
    """The keywords of `run()`: the shared ones, then this example's.

    :param layout: `"vectorized"` or `"sequential"` batch plate.
    :param learn_prior: learn the prior mean `guess` too.
    :param dataset_size: number of measurements, drawn with the fixed seed 0.
    :param record_every: steps between two records of the parameters.
    """

    OBJECTIVES = OBJECTIVES
    CHOICES = {"layout": LAYOUTS}

    objective: str = "rws"
    num_particles: int = 5
    batch_size: int = 32
    steps: int = 1000
    lr: float = 0.05
    layout: str = "vectorized"
    learn_prior: bool = True
    dataset_size: int = 1000
    record_every: int = 5


DEFAULTS = runner.defaults(Options)


def train(
    objective: batchplate.BatchObjective,
    data: torch.Tensor,
    *,
    layout: str = "vectorized",
    batch_size: int = 32,
    steps: int = 1000,
    lr: float = 0.05,
    learn_prior: bool = False,
    seed: int = 0,
    history: dict[str, list] | None = None,
    record_every: int = 5,
    bar: Any = None,
) -> dict[str, float]:
    """Train the amortized guide (and the prior mean) on random minibatches.

    Returns the learned parameters. With `history`, every `record_every` steps
    appends the step, the parameters (`guess` fixed at 8.5 when not learned)
    and the running loss to its lists.
    """
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model_fn, guide_fn = PROGRAMS[layout]
    svi = pyro.infer.SVI(model_fn, guide_fn, pyro.optim.Adam({"lr": lr}), objective)
    N = len(data)

    def step(_: int):
        idx = torch.randperm(N)[:batch_size]
        observations = observations_of(data[idx], layout)
        return svi.step(observations=observations, size=N, subsample=idx, learn_prior=learn_prior)

    def record(t: int, running: float) -> dict[str, str]:
        if history is not None:
            history["step"].append(t)
            for key, value in _learned(learn_prior, fixed_guess=GUESS).items():
                history[key].append(value)
            history["loss"].append(running)
        return {"loss": f"{running:.3f}"}

    runner.train_loop(step, steps, every=record_every, record=record, bar=bar, smoothing=0.02)
    return _learned(learn_prior)


def _learned(learn_prior: bool, fixed_guess: float | None = None) -> dict[str, float]:
    """The current `a`, `c`, `scale`, and `guess` if learned (else `fixed_guess`, if any)."""
    params = {
        "a": pyro.param("a").item(),
        "c": pyro.param("c").item(),
        "scale": pyro.param("log_scale").exp().item(),
    }
    if learn_prior:
        params["guess"] = pyro.param("guess").item()
    elif fixed_guess is not None:
        params["guess"] = fixed_guess
    return params


def make_objective(name: str, num_particles: int) -> batchplate.BatchObjective:
    """The batchplate objective called `name` (one of `OBJECTIVES`).

    Particles are vectorized in both layouts (the program's structure is static).
    """
    return common.make_objective(name, num_particles, allowed=OBJECTIVES)


def _train_run(o: Options, bar: Any) -> dict:
    data = make_dataset(o.dataset_size)
    history: dict = {k: [] for k in ("step", "a", "c", "scale", "guess", "loss")}
    params = train(
        make_objective(o.objective, o.num_particles),
        data,
        **o.pick("layout", "batch_size", "steps", "lr", "learn_prior", "seed", "record_every"),
        history=history,
        bar=bar,
    )
    history["params"] = {**params, "guess": params.get("guess", GUESS)}
    history["data_mean"] = data.mean().item()
    return history


def _figures(history: dict, o: Options) -> dict[str, Any]:
    exact, data_mean = Posterior.exact(), history["data_mean"]
    targets = {"a": [exact.a], "c": [exact.c], "scale": [exact.scale], "guess": [GUESS]}
    if o.learn_prior:  # the exact posterior of the model at its maximum-likelihood prior mean
        targets["c"].append(Posterior.exact(m=data_mean).c)
        targets["guess"].append(data_mean)
    fig, axes = common.pyplot().subplots(2, 2, figsize=(8, 5.5), sharex=True)
    for ax, key in zip(axes.flat, ("a", "c", "scale", "guess"), strict=True):
        ax.plot(history["step"], history[key], color="C0", label="learned")
        ax.axhline(targets[key][0], color="k", ls="--", lw=1, label="exact (m = 8.5)")
        if len(targets[key]) > 1:
            ax.axhline(targets[key][1], color="C3", ls=":", lw=1.2, label="exact (m = data mean)")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0, 1].legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.suptitle(
        f"scale example, {o.objective}, K={o.num_particles}, B={o.batch_size} of "
        f"N={o.dataset_size}, {o.layout} plate" + (", learned prior mean" if o.learn_prior else ""),
        fontsize=10,
    )
    return {"plot": fig}


def _metrics(history: dict, o: Options, seconds: float, paths: dict[str, Path]) -> dict:
    params = history["params"]
    target = Posterior.exact(m=params["guess"])
    return {
        "example": NAME,
        **o.pick("objective", "layout", "num_particles", "batch_size", "steps", "seed"),
        **params,
        "data_mean": history["data_mean"],
        # Against the exact posterior at the learned prior mean (c depends on it).
        "a_error": params["a"] - target.a,
        "c_error": params["c"] - target.c,
        "scale_error": params["scale"] - target.scale,
        "final_loss": history["loss"][-1],
        "seconds": seconds,
        "plot": str(paths["plot"]),
    }


def _summary(m: dict) -> str:
    return (
        f"K={m['num_particles']}: a={m['a']:.3f} (0.64) c={m['c']:.3f} "
        f"({Posterior.exact(m=m['guess']).c:.2f}) scale={m['scale']:.3f} (0.6) "
        f"guess={m['guess']:.3f} (data mean {m['data_mean']:.3f}); {m['seconds']:.0f} s"
    )


EXAMPLE = runner.Example(NAME, _train_run, _figures, _metrics, _summary)


def run(**options: Any) -> dict:
    """Train the scale example with one objective and plot its parameters.

    The dataset (`dataset_size` measurements, fixed seed 0) is drawn from the
    model with prior mean 8.5; minibatches of `batch_size` are subsampled at
    random each step (the batch plate gets `size=N, subsample=idx`). Every
    `record_every` steps `a`, `c`, `scale` and `guess` are recorded and
    plotted against the exact values (dashed: `a = 0.64`, `c = 3.06`,
    `scale = 0.6`, `guess = 8.5`; dotted, when the prior mean is learned: its
    maximum-likelihood value, the data mean, and the matching `c`).

    :param options: the fields of `Options` (defaults there).
    :returns: the learned values, their errors against the exact posterior at
        the learned prior mean, `data_mean`, `final_loss` (running mean of the
        wake-theta loss for `rws`/`ws`), `seconds`, `plot` and the options of
        the run.
    """
    return runner.run_example(EXAMPLE, Options(**options))


GRID_INSOMNIA = (1.0, 0.5, 0.0)


def grid(
    *,
    insomnia: tuple[float, ...] = GRID_INSOMNIA,
    layouts: tuple[str, ...] = LAYOUTS,
    seeds: tuple[int, ...] = (0, 1, 2, 3),
    num_particles: int = 5,
    batch_size: int = 32,
    steps: int = 1000,
    lr: float = 0.05,
    learn_prior: bool = True,
    progress: bool = True,
    report: Callable[[str], None] = print,
) -> list[dict]:
    """Train with `ReweightedWakeSleep` over insomnia, layouts and seeds.

    Every run subsamples `batch_size` of the 1000 measurements per step.
    Returns one row per (insomnia, layout) with the mean and the run-to-run
    standard deviation of the learned `a`, `c`, `scale`, `guess` and of
    `guess - data mean`, and prints them as a table.
    """
    from tqdm.auto import tqdm

    data = make_dataset(DEFAULTS["dataset_size"])
    configs = [(lam, layout, seed) for lam in insomnia for layout in layouts for seed in seeds]
    settings = {"batch_size": batch_size, "steps": steps, "lr": lr, "learn_prior": learn_prior}
    runs: dict[tuple, list[dict]] = {}
    for lam, layout, seed in tqdm(configs, desc="scale grid", disable=not progress):
        objective = batchplate.ReweightedWakeSleep(
            num_particles=num_particles, insomnia=lam, max_plate_nesting=1
        )
        t0 = time.perf_counter()
        params = train(objective, data, layout=layout, seed=seed, **settings)
        params["seconds"] = time.perf_counter() - t0
        runs.setdefault((lam, layout), []).append(params)
    rows = _grid_rows(runs, data.mean().item(), learn_prior)
    report(
        f"scale example, RWS, K={num_particles}, B={batch_size} of N={len(data)}, {steps} steps, "
        f"Adam lr={lr}, seeds {list(seeds)}; mean ± run-to-run sd"
    )
    for line in _grid_table(rows, data.mean().item(), learn_prior):
        report(line)
    return rows


def _grid_rows(runs: dict[tuple, list[dict]], data_mean: float, learn_prior: bool) -> list[dict]:
    """Mean and run-to-run sd of each learned value, per (insomnia, layout)."""
    rows = []
    keys = ("a", "c", "scale") + (("guess",) if learn_prior else ())
    for (lam, layout), results in runs.items():
        row: dict = {"insomnia": lam, "layout": layout, "runs": len(results)}
        for key in keys + ("seconds",):
            values = torch.tensor([r[key] for r in results])
            row[key] = values.mean().item()
            row[f"{key}_sd"] = values.std().item() if len(values) > 1 else math.nan
        if learn_prior:
            row["guess_minus_data_mean"] = row["guess"] - data_mean
        rows.append(row)
    return rows


def _grid_table(rows: list[dict], data_mean: float, learn_prior: bool) -> list[str]:
    exact = Posterior.exact(m=data_mean if learn_prior else GUESS)
    keys = ("a", "c", "scale") + (("guess",) if learn_prior else ())
    lines = [
        f"exact: a={exact.a:.3f} c={exact.c:.3f} scale={exact.scale:.3f}"
        + (f" guess=data mean={data_mean:.3f}" if learn_prior else ""),
        f"{'insomnia':>8} {'layout':>10} " + " ".join(f"{k:>15}" for k in keys) + "  s/run",
    ]
    for row in rows:
        cells = " ".join(f"{row[k]:>7.3f} ± {row[k + '_sd']:<5.3f}" for k in keys)
        lines.append(f"{row['insomnia']:>8} {row['layout']:>10} {cells}  {row['seconds']:.1f}")
    return lines


def main(argv: list[str] | None = None) -> None:
    """`python -m batchplate.examples.scale [--grid] [--steps N] [--seeds S]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", action="store_true", help="the insomnia x layout x seed grid")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--seeds", type=int, default=4, help="seeds per grid cell")
    parser.add_argument("--objective", default=DEFAULTS["objective"], choices=OBJECTIVES)
    parser.add_argument("--out", default="batchplate-runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.grid:
        grid(steps=args.steps, seeds=tuple(range(args.seeds)))
    else:
        run(objective=args.objective, steps=args.steps, out_dir=args.out)


if __name__ == "__main__":
    main()
