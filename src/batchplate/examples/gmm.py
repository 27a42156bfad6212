"""A Gaussian mixture with stochastic control flow, after Le et al. (UAI 2019).

The model of Le, Kosiorek, Siddharth, Teh & Wood, *Revisiting reweighted
wake-sleep for models with stochastic control flow* (UAI 2019), section on
the Gaussian mixture: ``C = 20`` components,

    c_b ~ Categorical(softmax(theta)),     x_b | c_b ~ N(mu_{c_b}, sigma^2),

with ``mu_c = 10 c`` and ``sigma = 5``. The mixture weights ``softmax(theta)``
are learned; the true ones are non-uniform, ``pi_c ∝ c + 5`` (as in the
paper). The guide is amortized, ``q_phi(c_b | x_b) = Categorical(logits =
MLP(x_b))``, an MLP ``1-16-C`` with ``tanh`` (its input is standardized by
the fixed constants ``(x - 95) / 60``, so ``tanh`` does not saturate). The
latent is discrete, so nothing is reparameterized: the model branches on
``c_b`` (which mean, hence which likelihood), the situation RWS targets.

Both programs use a vectorized :func:`~batchplate.batch_plate` over the
minibatch and are run with vectorized particles. Objectives (``OBJECTIVES``):

- ``rws``: :class:`~batchplate.ReweightedWakeSleep`, ``insomnia = 1`` (wake-wake);
- ``ws``: ``insomnia = 0`` (wake-sleep: the guide learns from fantasies);
- ``iwae``: :class:`~batchplate.RenyiELBO` (``alpha = 0``) with its per-datum
  score-function term;
- ``vimco``: :class:`~batchplate.VIMCO`, leave-one-out baselines;
- ``elbo``: :class:`~batchplate.Trace_ELBO`, REINFORCE with a leave-one-out
  particle baseline per datum.

Tracked every ``eval_every`` steps on a fixed test set (drawn from the true
model): the L2 error ``||softmax(theta) - pi||_2`` of the mixture weights, and
the average ``KL(p_theta(c | x) || q_phi(c | x))`` between the current model's
exact posterior, computed by enumerating the ``C`` components, and the guide.

``run()`` trains one objective (``batchplate run gmm``); ``sweep()`` (``python
-m batchplate.examples.gmm --sweep``) trains every objective for every ``K``
and draws their curves in one PNG.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from batchplate import batch_plate
from batchplate.examples import _common as common

NAME = "gmm"
OBJECTIVES = ("rws", "ws", "iwae", "vimco", "elbo")
DEFAULTS: dict = {
    "objective": "rws",
    "num_particles": 10,
    "batch_size": 100,
    "steps": 3000,
    "lr": 1e-2,
    "lr_final": 1e-3,
    "eval_every": 50,
    "dataset_size": 100000,
    "test_size": 500,
    "hidden": 16,
}

C = 20  # components
SIGMA = 5.0
X_SHIFT, X_SCALE = 95.0, 60.0  # standardizes x for the guide network (mu spans 0..190)


def means(device: torch.device | str | None = None) -> torch.Tensor:
    """``mu_c = 10 c`` for ``c = 0 .. C-1``."""
    return 10.0 * torch.arange(C, dtype=torch.get_default_dtype(), device=device)


def true_weights(device: torch.device | str | None = None) -> torch.Tensor:
    """The true mixture weights ``pi_c ∝ c + 5``."""
    w = torch.arange(C, dtype=torch.get_default_dtype(), device=device) + 5.0
    return w / w.sum()


def sample_data(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` draws of ``x`` from the true model (fixed generator)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.multinomial(true_weights(), n, replacement=True, generator=g)
    return means()[c] + SIGMA * torch.randn(n, generator=g)


class GuideNet(nn.Module):
    """``x -> logits`` of ``q(c | x)``: an MLP ``1-hidden-C`` with ``tanh``."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(((x - X_SHIFT) / X_SCALE).unsqueeze(-1))


class GMM:
    """The model and its amortized guide, sharing ``theta`` and the guide network.

    Data come in Pyro's RWS convention, ``observations={"x": minibatch [B]}``,
    so the sleep phase can hand the guide its fantasies (then ``[S, B]``).
    """

    def __init__(self, hidden: int = 16, theta: torch.Tensor | None = None) -> None:
        self.net = GuideNet(hidden)
        self.theta_init = torch.zeros(C) if theta is None else theta

    def theta(self) -> torch.Tensor:
        return pyro.param("theta", self.theta_init.clone())

    def model(self, observations=None, size=None, subsample=None) -> None:
        x = observations["x"]
        theta = self.theta()
        with batch_plate("data", size or x.shape[-1], subsample=subsample):
            c = pyro.sample("c", dist.Categorical(logits=theta))
            # The branch: which component's mean (and likelihood) the datum uses.
            loc = means(x.device)[c]
            pyro.sample("x", dist.Normal(loc, SIGMA), obs=x)

    def guide(self, observations=None, size=None, subsample=None) -> None:
        x = observations["x"]
        net = pyro.module("guide_net", self.net)
        with batch_plate("data", size or x.shape[-1], subsample=subsample):
            pyro.sample("c", dist.Categorical(logits=net(x)))

    # -- exact quantities, by enumeration -----------------------------------

    def log_posterior(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, C]`` exact ``log p_theta(c | x_t)``."""
        log_joint = torch.log_softmax(self.theta(), -1) + dist.Normal(
            means(x.device), SIGMA
        ).log_prob(x.unsqueeze(-1))
        return torch.log_softmax(log_joint, -1)

    def log_evidence(self, x: torch.Tensor) -> torch.Tensor:
        """``[T]`` exact ``log p_theta(x_t)``."""
        log_joint = torch.log_softmax(self.theta(), -1) + dist.Normal(
            means(x.device), SIGMA
        ).log_prob(x.unsqueeze(-1))
        return torch.logsumexp(log_joint, -1)

    def posterior_kl(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over ``x`` of ``KL(p_theta(c | x) || q_phi(c | x))``, by enumeration."""
        with torch.no_grad():
            log_p = self.log_posterior(x)
            log_q = torch.log_softmax(self.net(x), -1)
            return (log_p.exp() * (log_p - log_q)).sum(-1).mean()

    def weight_error(self) -> torch.Tensor:
        """``||softmax(theta) - pi||_2``."""
        with torch.no_grad():
            theta = self.theta()
            return torch.linalg.vector_norm(torch.softmax(theta, -1) - true_weights(theta.device))


def make_objective(name: str, num_particles: int):
    """The batchplate objective called ``name``, with vectorized particles."""
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
    bar=None,
) -> tuple[GMM, dict]:
    """Train ``gmm`` (a fresh :class:`GMM` by default); return it and the history.

    Minibatches of ``batch_size`` are subsampled from a fixed training set of
    ``dataset_size`` draws (seed 0); the test set (``test_size`` draws, seed 1)
    is fixed too. Adam's learning rate decays geometrically from ``lr`` to
    ``lr_final`` over the run (constant when ``lr_final`` is None). The
    history holds ``step``, ``weight_error``, ``kl`` and the running ``loss``
    (the wake-theta loss for ``rws``/``ws``).
    """
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    gmm = GMM(hidden) if gmm is None else gmm
    data, test = sample_data(dataset_size, seed=0), sample_data(test_size, seed=1)
    # Adam whose learning rate decays geometrically from lr to lr_final, so
    # short runs end with little SGD noise in theta (no gradient clipping).
    decay = 1.0 if lr_final is None else (lr_final / lr) ** (1.0 / max(1, steps))
    optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": decay, "clip_norm": math.inf})
    svi = pyro.infer.SVI(gmm.model, gmm.guide, optim, make_objective(objective, num_particles))
    history: dict = {"step": [], "weight_error": [], "kl": [], "loss": []}

    def record(step: int, running: float) -> None:
        history["step"].append(step)
        history["weight_error"].append(gmm.weight_error().item())
        history["kl"].append(gmm.posterior_kl(test).item())
        history["loss"].append(running)

    record(0, math.nan)
    running = math.nan
    for step in range(1, steps + 1):
        idx = torch.randperm(dataset_size)[:batch_size]
        loss = svi.step(observations={"x": data[idx]}, size=dataset_size, subsample=idx)
        loss = loss[0] if isinstance(loss, tuple) else loss  # RWS: (wake-theta, phi)
        running = loss if math.isnan(running) else 0.98 * running + 0.02 * loss
        if step % eval_every == 0 or step == steps:
            record(step, running)
            if bar is not None:
                bar.set_postfix(
                    loss=f"{running:.3f}",
                    w_err=f"{history['weight_error'][-1]:.3f}",
                    kl=f"{history['kl'][-1]:.3f}",
                )
        if bar is not None:
            bar.update(1)
    return gmm, history


def _tail_mean(values: Sequence[float], fraction: float = 0.1) -> float:
    """Mean of the last ``fraction`` of the recorded values (smooths SGD noise)."""
    n = max(1, int(round(len(values) * fraction)))
    return sum(values[-n:]) / n


def _axes_style(ax, ylabel: str) -> None:
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")


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
    lr_final: float | None = DEFAULTS["lr_final"],
    eval_every: int = DEFAULTS["eval_every"],
    dataset_size: int = DEFAULTS["dataset_size"],
    test_size: int = DEFAULTS["test_size"],
    hidden: int = DEFAULTS["hidden"],
) -> dict:
    """Train the mixture with one objective; plot weight error and posterior KL.

    Returns the final ``weight_error`` and ``kl``, their means over the last
    10% of the evaluations (``weight_error_tail``, ``kl_tail``), the initial
    values, ``final_loss``, ``seconds`` and ``plot``.
    """

    common.check_choice("objective", objective, OBJECTIVES)
    out = common.output_dir(out_dir)
    stem = f"{NAME}-{objective}"
    bar = common.progress_bar(steps, stem, progress)
    t0 = time.perf_counter()
    _, history = train(
        objective,
        num_particles,
        batch_size=batch_size,
        steps=steps,
        lr=lr,
        lr_final=lr_final,
        seed=seed,
        eval_every=eval_every,
        dataset_size=dataset_size,
        test_size=test_size,
        hidden=hidden,
        bar=bar,
    )
    seconds = time.perf_counter() - t0
    bar.close()

    plt = common.pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].plot(history["step"], history["weight_error"])
    _axes_style(axes[0], "||softmax(theta) - pi||_2")
    axes[1].plot(history["step"], history["kl"])
    _axes_style(axes[1], "mean KL(p(c|x) || q(c|x))")
    for ax in axes:
        ax.set_xlabel("step")
    fig.suptitle(f"GMM (C={C}), {objective}, K={num_particles}, B={batch_size}", fontsize=10)
    plot = common.save_figure(fig, out / f"{stem}.png")

    metrics = {
        "example": NAME,
        "objective": objective,
        "num_particles": num_particles,
        "batch_size": batch_size,
        "steps": steps,
        "lr": lr,
        "lr_final": lr_final,
        "seed": seed,
        "weight_error": history["weight_error"][-1],
        "kl": history["kl"][-1],
        "weight_error_tail": _tail_mean(history["weight_error"][1:]),
        "kl_tail": _tail_mean(history["kl"][1:]),
        "initial_weight_error": history["weight_error"][0],
        "initial_kl": history["kl"][0],
        "final_loss": history["loss"][-1],
        "seconds": seconds,
        "plot": str(plot),
    }
    if progress:
        print(f"plot: {plot}")
        print(
            f"{stem} K={num_particles}: weight error {metrics['weight_error']:.4f} "
            f"(start {metrics['initial_weight_error']:.4f}), KL(p||q) {metrics['kl']:.4f} "
            f"(start {metrics['initial_kl']:.3f}); {seconds:.0f} s"
        )
    return metrics


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
    """Train every objective for every ``K``; one PNG, one row per run.

    The PNG (``out_dir/gmm-sweep.png``) has one column per objective: weight
    error (top) and posterior KL (bottom) over steps, one curve per ``K``.
    Rows report the final values and their means over the last 10% of the
    evaluations (``*_tail``, less noisy), and seconds per run.
    """
    from tqdm.auto import tqdm

    out = common.output_dir(out_dir)
    configs = [(o, K) for o in objectives for K in Ks]
    bar = tqdm(total=steps * len(configs), desc="gmm sweep", disable=not progress, mininterval=1)
    rows, histories = [], {}
    for objective, K in configs:
        bar.set_description(f"gmm sweep {objective} K={K}")
        t0 = time.perf_counter()
        _, history = train(
            objective,
            K,
            batch_size=batch_size,
            steps=steps,
            lr=lr,
            lr_final=lr_final,
            seed=seed,
            eval_every=eval_every,
            bar=bar,
        )
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

    plt = common.pyplot()

    fig, axes = plt.subplots(
        2, len(objectives), figsize=(3.2 * len(objectives), 6), sharex=True, sharey="row"
    )
    axes = axes.reshape(2, len(objectives))
    for j, objective in enumerate(objectives):
        for i, K in enumerate(Ks):
            h = histories[objective, K]
            color = plt.cm.viridis(i / max(1, len(Ks) - 1))
            axes[0, j].plot(h["step"], h["weight_error"], color=color, label=f"K={K}")
            axes[1, j].plot(h["step"], h["kl"], color=color, label=f"K={K}")
        axes[0, j].set_title(objective)
        axes[1, j].set_xlabel("step")
        for ax in axes[:, j]:
            ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both")
    axes[0, 0].set_ylabel("||softmax(theta) - pi||_2")
    axes[1, 0].set_ylabel("mean KL(p(c|x) || q(c|x))")
    axes[0, -1].legend(fontsize=8)
    fig.suptitle(
        f"GMM (C={C}), B={batch_size}, {steps} steps, Adam lr {lr} -> {lr_final}, seed {seed}",
        fontsize=10,
    )
    plot = common.save_figure(fig, out / f"{NAME}-sweep.png")
    for row in rows:
        row["plot"] = str(plot)
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """A Markdown table of :func:`sweep`'s rows."""
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
    """``python -m batchplate.examples.gmm [--sweep] [--steps N] [--out DIR]``."""
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
