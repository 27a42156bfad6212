r"""A Gaussian mixture with stochastic control flow, after Le et al. (UAI 2019).

The model of Le, Kosiorek, Siddharth, Teh & Wood, *Revisiting reweighted
wake-sleep for models with stochastic control flow* (UAI 2019), section on
the Gaussian mixture: `C = 20` components,

$$
c_b \sim \mathrm{Categorical}(\mathrm{softmax}(\theta)), \qquad
x_b \mid c_b \sim \mathcal{N}(\mu_{c_b}, \sigma^2),
$$

with `mu_c = 10 c` and `sigma = 5`. The mixture weights `softmax(theta)`
are learned; the true ones are non-uniform, `pi_c ∝ c + 5` (as in the
paper). The guide is amortized, `q_phi(c_b | x_b) = Categorical(logits =
MLP(x_b))`, an MLP `1-16-C` with `tanh` (its input is standardized by
the fixed constants `(x - 95) / 60`, so `tanh` does not saturate). The
latent is discrete, so nothing is reparameterized: the model branches on
`c_b` (which mean, hence which likelihood), the situation RWS targets.

Both programs use a vectorized `batchplate.batch_plate` over the
minibatch and are run with vectorized particles. Objectives (`OBJECTIVES`):

- `rws`: `ReweightedWakeSleep`, `insomnia = 1` (wake-wake);
- `ws`: `insomnia = 0` (wake-sleep: the guide learns from fantasies);
- `iwae`: `RenyiELBO` (`alpha = 0`) with its per-datum
  score-function term;
- `vimco`: `VIMCO`, leave-one-out baselines;
- `elbo`: `Trace_ELBO`, REINFORCE with a leave-one-out
  particle baseline per datum.

Tracked every `eval_every` steps on a fixed test set (drawn from the true
model): the L2 error `||softmax(theta) - pi||_2` of the mixture weights, and
the average `KL(p_theta(c | x) || q_phi(c | x))` between the current model's
exact posterior, computed by enumerating the `C` components, and the guide.

`run()` trains one objective (`batchplate run gmm`); `sweep()` (`python
-m batchplate.examples.gmm --sweep`) trains every objective for every `K`
and draws their curves in one PNG.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch

import batchplate
from batchplate.examples import _common as common
from batchplate.examples import _runner as runner
from batchplate.examples._gmm_programs import (
    GMM,
    SIGMA,
    C,
    GuideNet,
    means,
    sample_data,
    true_weights,
)

# The model's names are part of this example's API (`gmm.GMM`, ...).
__all__ = ["C", "GMM", "SIGMA", "GuideNet", "Options", "format_table", "make_objective"]
__all__ += ["means", "run", "sample_data", "sweep", "train", "true_weights"]

NAME = "gmm"
OBJECTIVES = ("rws", "ws", "iwae", "vimco", "elbo")


@dataclass(frozen=True, kw_only=True)
class Options(runner.Options):
    """The keywords of `run()`: the shared ones, then this example's.

    :param lr_final: Adam's learning rate at the last step (decaying
        geometrically from `lr`; constant when None).
    :param eval_every: steps between two evaluations on the test set.
    :param dataset_size: number of training draws.
    :param test_size: number of test draws.
    :param hidden: width of the guide network.
    """

    OBJECTIVES = OBJECTIVES

    objective: str = "rws"
    num_particles: int = 10
    batch_size: int = 100
    steps: int = 3000
    lr: float = 1e-2
    lr_final: float | None = 1e-3
    eval_every: int = 50
    dataset_size: int = 100000
    test_size: int = 500
    hidden: int = 16


DEFAULTS = runner.defaults(Options)


def make_objective(name: str, num_particles: int) -> batchplate.BatchObjective:
    """The batchplate objective called `name`, with vectorized particles."""
    return common.make_objective(name, num_particles, allowed=OBJECTIVES)


def train(
    objective: str,
    num_particles: int,
    *,
    batch_size: int = DEFAULTS["batch_size"],
    steps: int = DEFAULTS["steps"],
    lr: float = DEFAULTS["lr"],
    lr_final: float | None = DEFAULTS["lr_final"],
    seed: int = 0,
    eval_every: int = DEFAULTS["eval_every"],
    dataset_size: int = DEFAULTS["dataset_size"],
    test_size: int = DEFAULTS["test_size"],
    hidden: int = DEFAULTS["hidden"],
    gmm: GMM | None = None,
    bar: Any = None,
) -> tuple[GMM, dict]:
    """Train `gmm` (a fresh `GMM` by default); return it and the history.

    Minibatches of `batch_size` are subsampled from a fixed training set of
    `dataset_size` draws (seed 0); the test set (`test_size` draws, seed 1)
    is fixed too. Adam's learning rate decays geometrically from `lr` to
    `lr_final` over the run (constant when `lr_final` is None). The
    history holds `step`, `weight_error`, `kl` and the running `loss`
    (the wake-theta loss for `rws`/`ws`).
    """
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    gmm = GMM(hidden) if gmm is None else gmm
    data, test = sample_data(dataset_size, seed=0), sample_data(test_size, seed=1)
    optim = common.decaying_adam(lr, lr_final, steps)
    svi = pyro.infer.SVI(gmm.model, gmm.guide, optim, make_objective(objective, num_particles))
    history: dict = {"step": [], "weight_error": [], "kl": [], "loss": []}

    def record(step: int, running: float) -> dict[str, str]:
        history["step"].append(step)
        history["weight_error"].append(gmm.weight_error().item())
        history["kl"].append(gmm.posterior_kl(test).item())
        history["loss"].append(running)
        return {
            "loss": f"{running:.3f}",
            "w_err": f"{history['weight_error'][-1]:.3f}",
            "kl": f"{history['kl'][-1]:.3f}",
        }

    def step(_: int):
        idx = torch.randperm(dataset_size)[:batch_size]
        return svi.step(observations={"x": data[idx]}, size=dataset_size, subsample=idx)

    record(0, float("nan"))
    runner.train_loop(step, steps, every=eval_every, record=record, bar=bar, smoothing=0.02)
    return gmm, history


def _tail_mean(values: Sequence[float], fraction: float = 0.1) -> float:
    """Mean of the last `fraction` of the recorded values (smooths SGD noise)."""
    n = max(1, int(round(len(values) * fraction)))
    return sum(values[-n:]) / n


def _log_axes(ax: Any, ylabel: str | None = None) -> None:
    ax.set_yscale("log")
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")


WEIGHT_ERROR_LABEL = "||softmax(theta) - pi||_2"
KL_LABEL = "mean KL(p(c|x) || q(c|x))"


def _train_run(o: Options, bar: Any) -> dict:
    keys = ("batch_size", "steps", "lr", "lr_final", "seed", "eval_every")
    keys += ("dataset_size", "test_size", "hidden")
    return train(o.objective, o.num_particles, **o.pick(*keys), bar=bar)[1]


def _figures(history: dict, o: Options) -> dict[str, Any]:
    fig, axes = common.pyplot().subplots(1, 2, figsize=(9, 3.5))
    axes[0].plot(history["step"], history["weight_error"])
    _log_axes(axes[0], WEIGHT_ERROR_LABEL)
    axes[1].plot(history["step"], history["kl"])
    _log_axes(axes[1], KL_LABEL)
    for ax in axes:
        ax.set_xlabel("step")
    title = f"GMM (C={C}), {o.objective}, K={o.num_particles}, B={o.batch_size}"
    fig.suptitle(title, fontsize=10)
    return {"plot": fig}


def _metrics(history: dict, o: Options, seconds: float, paths: dict[str, Path]) -> dict:
    return {
        "example": NAME,
        **o.pick("objective", "num_particles", "batch_size", "steps", "lr", "lr_final", "seed"),
        "weight_error": history["weight_error"][-1],
        "kl": history["kl"][-1],
        "weight_error_tail": _tail_mean(history["weight_error"][1:]),
        "kl_tail": _tail_mean(history["kl"][1:]),
        "initial_weight_error": history["weight_error"][0],
        "initial_kl": history["kl"][0],
        "final_loss": history["loss"][-1],
        "seconds": seconds,
        "plot": str(paths["plot"]),
    }


def _summary(m: dict) -> str:
    return (
        f"K={m['num_particles']}: weight error {m['weight_error']:.4f} "
        f"(start {m['initial_weight_error']:.4f}), KL(p||q) {m['kl']:.4f} "
        f"(start {m['initial_kl']:.3f}); {m['seconds']:.0f} s"
    )


EXAMPLE = runner.Example(NAME, _train_run, _figures, _metrics, _summary)


def run(**options: Any) -> dict:
    """Train the mixture with one objective; plot weight error and posterior KL.

    :param options: the fields of `Options` (defaults there).
    :returns: the final `weight_error` and `kl`, their means over the last
        10% of the evaluations (`weight_error_tail`, `kl_tail`), the initial
        values, `final_loss`, `seconds`, `plot` and the options of the run.
    """
    return runner.run_example(EXAMPLE, Options(**options))


def sweep(
    Ks: Sequence[int] = (2, 5, 10, 20),
    objectives: Sequence[str] = OBJECTIVES,
    steps: int = DEFAULTS["steps"],
    out_dir: str | Path = "batchplate-runs",
    *,
    lr: float = DEFAULTS["lr"],
    lr_final: float | None = DEFAULTS["lr_final"],
    batch_size: int = DEFAULTS["batch_size"],
    eval_every: int = DEFAULTS["eval_every"],
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Train every objective for every `K`; one PNG, one row per run.

    The PNG (`out_dir/gmm-sweep.png`) has one column per objective: weight
    error (top) and posterior KL (bottom) over steps, one curve per `K`.
    Rows report the final values and their means over the last 10% of the
    evaluations (`*_tail`, less noisy), and seconds per run.
    """
    configs = [(o, K) for o in objectives for K in Ks]
    bar = common.progress_bar(steps * len(configs), "gmm sweep", progress, mininterval=1)
    rows, histories = [], {}
    settings = {"batch_size": batch_size, "steps": steps, "lr": lr, "lr_final": lr_final}
    for objective, K in configs:
        bar.set_description(f"gmm sweep {objective} K={K}")
        t0 = time.perf_counter()
        _, history = train(objective, K, **settings, seed=seed, eval_every=eval_every, bar=bar)
        histories[objective, K] = history
        rows.append(
            {
                "objective": objective,
                "K": K,
                "weight_error": history["weight_error"][-1],
                "weight_error_tail": _tail_mean(history["weight_error"][1:]),
                "kl": history["kl"][-1],
                "kl_tail": _tail_mean(history["kl"][1:]),
                "seconds": time.perf_counter() - t0,
            }
        )
    bar.close()
    fig = _sweep_figure(histories, Ks, objectives)
    title = f"GMM (C={C}), B={batch_size}, {steps} steps, Adam lr {lr} -> {lr_final}, seed {seed}"
    fig.suptitle(title, fontsize=10)
    plot = common.save_figure(fig, common.output_dir(out_dir) / f"{NAME}-sweep.png")
    for row in rows:
        row["plot"] = str(plot)
    return rows


def _sweep_figure(histories: dict, Ks: Sequence[int], objectives: Sequence[str]) -> Any:
    """One column per objective: weight error over KL, one curve per `K`."""
    plt = common.pyplot()
    n = len(objectives)
    fig, axes = plt.subplots(2, n, figsize=(3.2 * n, 6), sharex=True, sharey="row")
    axes = axes.reshape(2, n)
    for j, objective in enumerate(objectives):
        for i, K in enumerate(Ks):
            h = histories[objective, K]
            color = plt.cm.viridis(i / max(1, len(Ks) - 1))
            axes[0, j].plot(h["step"], h["weight_error"], color=color, label=f"K={K}")
            axes[1, j].plot(h["step"], h["kl"], color=color, label=f"K={K}")
        axes[0, j].set_title(objective)
        axes[1, j].set_xlabel("step")
        for ax in axes[:, j]:
            _log_axes(ax)
    axes[0, 0].set_ylabel(WEIGHT_ERROR_LABEL)
    axes[1, 0].set_ylabel(KL_LABEL)
    axes[0, -1].legend(fontsize=8)
    return fig


def format_table(rows: Sequence[dict]) -> str:
    """A Markdown table of `sweep`'s rows."""
    lines = [
        "| objective | K | weight error (final) | weight error (last 10%) "
        "| KL (final) | KL (last 10%) | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['objective']} | {r['K']} | {r['weight_error']:.4f} | "
            f"{r['weight_error_tail']:.4f} | {r['kl']:.4f} | {r['kl_tail']:.4f} | "
            f"{r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m batchplate.examples.gmm [--sweep] [--steps N] [--out DIR]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="every objective, K in 2,5,10,20")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--objective", default=DEFAULTS["objective"], choices=OBJECTIVES)
    parser.add_argument("-K", type=int, default=DEFAULTS["num_particles"])
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--lr-final", type=float, default=DEFAULTS["lr_final"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="batchplate-runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.sweep:
        rows = sweep(
            steps=args.steps, out_dir=args.out, lr=args.lr, lr_final=args.lr_final, seed=args.seed
        )
        print(f"plot: {rows[0]['plot']}")
        print(format_table(rows))
    else:
        run(
            objective=args.objective,
            num_particles=args.K,
            steps=args.steps,
            lr=args.lr,
            lr_final=args.lr_final,
            seed=args.seed,
            out_dir=args.out,
        )


if __name__ == "__main__":
    main()
