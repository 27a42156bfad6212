"""The seed's scale example, corrected, trained with reweighted wake-sleep on minibatches.

The seed (Pyro issue "Batching and plating") wrote a model that weighs an
object with a noisy scale, ``weight ~ N(guess, 1)`` and
``measurement ~ N(weight, 0.75)``, and an amortized guide
``N(a * x + c, exp(log_scale))``. Its ``return`` inside the loop over the plate
ended the loop after the first datum: the bug the thread found. Here the
program is written with a batch plate, vectorized or sequential, and trained
on minibatches drawn from a dataset. The exact amortized posterior is
``a = s^2/(s^2+t^2) = 0.64``, ``c = m t^2/(s^2+t^2) = 3.06``, scale
``s t / sqrt(s^2+t^2) = 0.6`` (design.md); when the prior mean ``guess`` is
learned, its maximum-likelihood value is the data mean.

``run()`` follows the example convention (``batchplate run scale``): it trains
with one objective and plots ``a``, ``c``, ``scale`` and ``guess`` over the
steps against their exact values. ``grid()`` (``python -m
batchplate.examples.scale --grid``) trains over insomnia in ``{1, 0.5, 0}``,
both layouts and several seeds, and prints the learned values with their
run-to-run spread.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

import batchplate
from batchplate import batch_plate
from batchplate.examples import _common as common

NAME = "scale"
OBJECTIVES = ("elbo", "iwae", "vimco", "rws", "ws")
DEFAULTS: dict = {
    "objective": "rws",
    "num_particles": 5,
    "batch_size": 32,
    "steps": 1000,
    "lr": 0.05,
    "layout": "vectorized",
    "learn_prior": True,
    "dataset_size": 1000,
    "record_every": 5,
}

GUESS, GUESS_SCALE, OBS_SCALE = 8.5, 1.0, 0.75


@dataclass(frozen=True)
class Posterior:
    """The exact amortized posterior ``N(a x + c, scale)`` for prior mean ``m``."""

    a: float
    c: float
    scale: float

    @classmethod
    def exact(cls, m: float = GUESS, s: float = GUESS_SCALE, t: float = OBS_SCALE) -> Posterior:
        v = s**2 + t**2
        return cls(s**2 / v, m * t**2 / v, s * t / math.sqrt(v))


def make_dataset(n: int = 1000, seed: int = 0) -> torch.Tensor:
    """Measurements of ``n`` objects drawn from the model with prior mean 8.5."""
    g = torch.Generator().manual_seed(seed)
    weight = GUESS + GUESS_SCALE * torch.randn(n, generator=g)
    return weight + OBS_SCALE * torch.randn(n, generator=g)


def _prior_mean(learn_prior: bool) -> torch.Tensor:
    if learn_prior:
        return pyro.param("guess", torch.tensor(GUESS - 3.0))
    return torch.tensor(GUESS)


def _guide_params():
    a = pyro.param("a", torch.tensor(0.0))
    c = pyro.param("c", torch.tensor(0.0))
    log_scale = pyro.param("log_scale", torch.tensor(0.0))
    return a, c, log_scale.exp()


# Observations are keyed by site name (Pyro's RWS convention), so the sleep
# phase can hand the guide its fantasies in the same form as real data.


def model(observations=None, size=None, subsample=None, learn_prior=False):
    """Vectorized: ``observations = {"measurement": minibatch [B]}``."""
    x = observations["measurement"]
    guess = _prior_mean(learn_prior)
    with batch_plate("data", size or x.shape[-1], subsample=subsample):
        weight = pyro.sample("weight", dist.Normal(guess, GUESS_SCALE))
        pyro.sample("measurement", dist.Normal(weight, OBS_SCALE), obs=x)


def guide(observations=None, size=None, subsample=None, learn_prior=False):
    x = observations["measurement"]
    a, c, scale = _guide_params()
    with batch_plate("data", size or x.shape[-1], subsample=subsample):
        pyro.sample("weight", dist.Normal(a * x + c, scale))


def sequential_model(observations=None, size=None, subsample=None, learn_prior=False):
    """Sequential: ``observations = {"measurement_0": x_0, ...}``, one site per datum."""
    guess = _prior_mean(learn_prior)
    B = len(observations)
    for b, _ in enumerate(batch_plate("data", size or B, subsample=subsample)):
        weight = pyro.sample(f"weight_{b}", dist.Normal(guess, GUESS_SCALE))
        pyro.sample(
            f"measurement_{b}",
            dist.Normal(weight, OBS_SCALE),
            obs=observations[f"measurement_{b}"],
        )


def sequential_guide(observations=None, size=None, subsample=None, learn_prior=False):
    a, c, scale = _guide_params()
    B = len(observations)
    for b, _ in enumerate(batch_plate("data", size or B, subsample=subsample)):
        x = observations[f"measurement_{b}"]
        pyro.sample(f"weight_{b}", dist.Normal(a * x + c, scale))


def observations_of(batch: torch.Tensor, layout: str) -> dict:
    if layout == "vectorized":
        return {"measurement": batch}
    return {f"measurement_{b}": x for b, x in enumerate(batch)}


PROGRAMS = {"vectorized": (model, guide), "sequential": (sequential_model, sequential_guide)}


def train(
    objective,
    data: torch.Tensor,
    *,
    layout: str = "vectorized",
    batch_size: int = 32,
    steps: int = 1000,
    lr: float = 0.05,
    learn_prior: bool = False,
    seed: int = 0,
    callback=None,
) -> dict[str, float]:
    """Train the amortized guide (and the prior mean) on random minibatches.

    Returns the learned parameters. ``callback(step, losses)`` sees each step.
    """
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model_fn, guide_fn = PROGRAMS[layout]
    svi = pyro.infer.SVI(model_fn, guide_fn, pyro.optim.Adam({"lr": lr}), objective)
    N = len(data)
    for step in range(steps):
        idx = torch.randperm(N)[:batch_size]
        losses = svi.step(
            observations=observations_of(data[idx], layout),
            size=N,
            subsample=idx,
            learn_prior=learn_prior,
        )
        if callback is not None:
            callback(step, losses)
    params = {
        "a": pyro.param("a").item(),
        "c": pyro.param("c").item(),
        "scale": pyro.param("log_scale").exp().item(),
    }
    if learn_prior:
        params["guess"] = pyro.param("guess").item()
    return params


def make_objective(name: str, num_particles: int, layout: str = "vectorized"):
    """The batchplate objective called ``name`` (one of :data:`OBJECTIVES`).

    Particles are vectorized in both layouts (the program's structure is static).
    """
    return common.make_objective(name, num_particles, allowed=OBJECTIVES)


def _current_params(learn_prior: bool) -> dict[str, float]:
    params = {
        "a": pyro.param("a").item(),
        "c": pyro.param("c").item(),
        "scale": pyro.param("log_scale").exp().item(),
    }
    params["guess"] = pyro.param("guess").item() if learn_prior else GUESS
    return params


def _plot(path: Path, history: dict, data_mean: float, learn_prior: bool, title: str) -> None:
    plt = common.pyplot()

    exact = Posterior.exact()
    targets = {"a": [exact.a], "c": [exact.c], "scale": [exact.scale], "guess": [GUESS]}
    if learn_prior:  # the exact posterior of the model at its maximum-likelihood prior mean
        targets["c"].append(Posterior.exact(m=data_mean).c)
        targets["guess"].append(data_mean)
    fig, axes = plt.subplots(2, 2, figsize=(8, 5.5), sharex=True)
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
    fig.suptitle(title, fontsize=10)
    common.save_figure(fig, path)


def run(
    *,
    objective: str = DEFAULTS["objective"],
    num_particles: int = DEFAULTS["num_particles"],
    batch_size: int = DEFAULTS["batch_size"],
    steps: int = DEFAULTS["steps"],
    lr: float = DEFAULTS["lr"],
    seed: int = 0,
    out_dir: str | Path = "batchplate-runs",
    progress: bool = True,
    layout: str = DEFAULTS["layout"],
    learn_prior: bool = DEFAULTS["learn_prior"],
    dataset_size: int = DEFAULTS["dataset_size"],
    record_every: int = DEFAULTS["record_every"],
) -> dict:
    """Train the seed's scale example with one objective and plot its parameters.

    The dataset (``dataset_size`` measurements, fixed seed 0) is drawn from the
    model with prior mean 8.5; minibatches of ``batch_size`` are subsampled at
    random each step (the batch plate gets ``size=N, subsample=idx``). Every
    ``record_every`` steps ``a``, ``c``, ``scale`` and ``guess`` are recorded
    and plotted against the exact values (dashed: ``a = 0.64``, ``c = 3.06``,
    ``scale = 0.6``, ``guess = 8.5``; dotted, when the prior mean is learned:
    its maximum-likelihood value, the data mean, and the matching ``c``).

    Returns the learned values, their errors against the exact posterior at
    the learned prior mean, ``data_mean``, ``final_loss`` (running mean of the
    wake-theta loss for ``rws``/``ws``), ``seconds`` and ``plot``.
    """

    common.check_choice("objective", objective, OBJECTIVES)
    common.check_choice("layout", layout, tuple(PROGRAMS))
    out = common.output_dir(out_dir)
    stem = f"{NAME}-{objective}"
    data = make_dataset(dataset_size)
    data_mean = data.mean().item()
    history: dict = {k: [] for k in ("step", "a", "c", "scale", "guess")}
    state = {"running": math.nan}
    bar = common.progress_bar(steps, stem, progress)

    def callback(step: int, losses) -> None:
        loss = losses[0] if isinstance(losses, tuple) else losses  # RWS: (wake-theta, phi)
        r = state["running"]
        state["running"] = loss if math.isnan(r) else 0.98 * r + 0.02 * loss
        if (step + 1) % record_every == 0 or step + 1 == steps:
            history["step"].append(step + 1)
            for key, value in _current_params(learn_prior).items():
                history[key].append(value)
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{state['running']:.3f}")

    t0 = time.perf_counter()
    params = train(
        make_objective(objective, num_particles, layout),
        data,
        layout=layout,
        batch_size=batch_size,
        steps=steps,
        lr=lr,
        learn_prior=learn_prior,
        seed=seed,
        callback=callback,
    )
    seconds = time.perf_counter() - t0
    bar.close()
    params.setdefault("guess", GUESS)
    target = Posterior.exact(m=params["guess"])
    plot = out / f"{stem}.png"
    title = (
        f"scale example, {objective}, K={num_particles}, B={batch_size} of N={dataset_size}, "
        f"{layout} plate" + (", learned prior mean" if learn_prior else "")
    )
    _plot(plot, history, data_mean, learn_prior, title)
    metrics = {
        "example": NAME,
        "objective": objective,
        "layout": layout,
        "num_particles": num_particles,
        "batch_size": batch_size,
        "steps": steps,
        "seed": seed,
        **params,
        "data_mean": data_mean,
        # Against the exact posterior at the learned prior mean (c depends on it).
        "a_error": params["a"] - target.a,
        "c_error": params["c"] - target.c,
        "scale_error": params["scale"] - target.scale,
        "final_loss": state["running"],
        "seconds": seconds,
        "plot": str(plot),
    }
    if progress:
        print(f"plot: {plot}")
        print(
            f"{stem} K={num_particles}: a={params['a']:.3f} (0.64) c={params['c']:.3f} "
            f"({target.c:.2f}) scale={params['scale']:.3f} (0.6) guess={params['guess']:.3f} "
            f"(data mean {data_mean:.3f}); {seconds:.0f} s"
        )
    return metrics


GRID_INSOMNIA = (1.0, 0.5, 0.0)


def grid(
    *,
    insomnia: tuple[float, ...] = GRID_INSOMNIA,
    layouts: tuple[str, ...] = ("vectorized", "sequential"),
    seeds: tuple[int, ...] = (0, 1, 2, 3),
    num_particles: int = 5,
    batch_size: int = 32,
    steps: int = 1000,
    lr: float = 0.05,
    learn_prior: bool = True,
    progress: bool = True,
    report: Callable[[str], None] = print,
) -> list[dict]:
    """Train with :class:`~batchplate.ReweightedWakeSleep` over insomnia, layouts and seeds.

    Every run subsamples ``batch_size`` of the 1000 measurements per step.
    Returns one row per (insomnia, layout) with the mean and the run-to-run
    standard deviation of the learned ``a``, ``c``, ``scale``, ``guess`` and
    of ``guess - data mean``, and prints them as a table.
    """
    from tqdm.auto import tqdm

    data = make_dataset(DEFAULTS["dataset_size"])
    data_mean = data.mean().item()
    configs = [(lam, layout, seed) for lam in insomnia for layout in layouts for seed in seeds]
    runs: dict[tuple, list[dict]] = {}
    for lam, layout, seed in tqdm(configs, desc="scale grid", disable=not progress):
        objective = batchplate.ReweightedWakeSleep(
            num_particles=num_particles, insomnia=lam, max_plate_nesting=1
        )
        t0 = time.perf_counter()
        params = train(
            objective,
            data,
            layout=layout,
            batch_size=batch_size,
            steps=steps,
            lr=lr,
            learn_prior=learn_prior,
            seed=seed,
        )
        params["seconds"] = time.perf_counter() - t0
        runs.setdefault((lam, layout), []).append(params)
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
    exact = Posterior.exact(m=data_mean if learn_prior else GUESS)
    report(
        f"scale example, RWS, K={num_particles}, B={batch_size} of N={len(data)}, {steps} steps, "
        f"Adam lr={lr}, seeds {list(seeds)}; mean ± run-to-run sd"
    )
    report(
        f"exact: a={exact.a:.3f} c={exact.c:.3f} scale={exact.scale:.3f}"
        + (f" guess=data mean={data_mean:.3f}" if learn_prior else "")
    )
    header = f"{'insomnia':>8} {'layout':>10} " + " ".join(f"{k:>15}" for k in keys) + "  s/run"
    report(header)
    for row in rows:
        cells = " ".join(f"{row[k]:>7.3f} ± {row[k + '_sd']:<5.3f}" for k in keys)
        report(f"{row['insomnia']:>8} {row['layout']:>10} {cells}  {row['seconds']:.1f}")
    return rows


def main(argv: list[str] | None = None) -> None:
    """``python -m batchplate.examples.scale [--grid] [--steps N] [--seeds S]``."""
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
