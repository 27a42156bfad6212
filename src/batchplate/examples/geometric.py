"""The seed's geometric program, sequential and padded, trained at batch size > 1.

The program of the seed discussion (``seed/batching-and-plating.txt``): for
each datum ``b`` a geometric count ``G_b`` (failures before the first success
of ``Bernoulli(sigmoid(theta))``) is drawn flip by flip, a recursion whose
length depends on the sampled values, and the observation is the event
``G_b = o_b``, seen through a noisy channel::

    p(obs_b = 1 | G_b) = 0.99 if G_b == o_b else 0.01,
    p(o_b) = 0.01 + 0.98 * (1 - p)^o_b * p,      p = sigmoid(theta).

The guide is the seed's too (``guide="seed"``): the same recursion with its
own logit ``phi`` (not amortized). Note that under RWS this guide moves in
lockstep with the model (``theta`` and ``phi`` receive the same wake
gradient, as ``grad_theta log p(z) = grad_phi log q(z)`` at ``theta = phi``).
``guide="amortized"`` conditions each flip on the datum: logit ``phi_0``
before ``o_b``, ``phi_0 + phi_1`` at flip ``o_b``, ``phi_0 + phi_2`` after,
which can put most of its mass on ``G_b = o_b`` (close to the posterior).
Both ``theta`` and the guide's parameters are learned.

Two forms of the same program:

- ``"sequential"``: the seed's code with a sequential
  :func:`~batchplate.batch_plate`; one Python recursion per datum and
  particle, ``vectorize_particles=False``. Sites ``f"{b}_{i}"`` and ``f"obs_{b}"``.
- ``"padded"``: one loop over all lanes (particles x data) with
  :class:`~batchplate.Lanes`, finished lanes masked; a vectorized batch plate
  and ``vectorize_particles=True``. Sites ``f"g_{t}"`` and ``"obs"``.

On the same flips both give the same per-datum log weights (tested in
``tests/test_padded.py``); the padded form is orders of magnitude faster
(``batchplate bench --only padded``).

Data: ``o_b ~ Geometric(p_true)`` (failure counts). Tracked: the learned
``p = sigmoid(theta)``, the exact average log evidence of the training set
under the current model, and the gap to its maximum (found by a grid search
over ``p`` on the exact formula): ``evidence_gap = max_p mean log p(o) -
mean log p_theta(o)``, zero at the maximum-likelihood ``theta``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

from batchplate import batch_plate
from batchplate.examples import _common as common
from batchplate.padded import Lanes

NAME = "geometric"
OBJECTIVES = ("rws", "iwae", "vimco", "elbo")
FORMS = ("padded", "sequential")
GUIDES = ("seed", "amortized")
DEFAULTS: dict = {
    "objective": "rws",
    "num_particles": 16,
    "batch_size": 64,
    "steps": 1000,
    "lr": 0.02,
    "form": "padded",
    "guide": "seed",
    "p_true": 0.3,
    "dataset_size": 1000,
    "max_steps": 1000,
    "eval_every": 10,
}

MATCH = 0.99  # p(obs = 1 | G == o)


# -- sequential form (the seed's program) ---------------------------------------


def geometric_sequential(prefix: str, i: int, logits: torch.Tensor) -> int:
    """The seed's recursion: ``G`` failures before the first success, one site per flip."""
    if pyro.sample(f"{prefix}_{i}", dist.Bernoulli(logits=logits)).item() == 1:
        return 0
    return geometric_sequential(prefix, i + 1, logits) + 1


def model_sequential(obs: torch.Tensor, observations: dict | None = None) -> None:
    logits = pyro.param("model_logits", lambda: torch.tensor(0.0, device=obs.device))
    for b in batch_plate("batch", len(obs)):
        g = geometric_sequential(f"{b}", 0, logits)
        pyro.sample(
            f"obs_{b}",
            dist.Bernoulli(probs=torch.tensor(MATCH, device=obs.device)),
            obs=torch.tensor(float(g == int(obs[b])), device=obs.device),
        )


def guide_sequential(obs: torch.Tensor, observations: dict | None = None) -> None:
    logits = pyro.param("guide_logits", lambda: torch.tensor(0.0, device=obs.device))
    for b in batch_plate("batch", len(obs)):
        geometric_sequential(f"{b}", 0, logits)


def amortized_logits(weights: torch.Tensor, t: int, o: torch.Tensor) -> torch.Tensor:
    """The amortized guide's logit of flip ``t`` for observation ``o``:
    ``w_0`` before ``o``, ``w_0 + w_1`` at ``o``, ``w_0 + w_2`` after."""
    return weights[0] + weights[1] * (o == t) + weights[2] * (o < t)


def _amortized_sequential(prefix: str, i: int, weights: torch.Tensor, o: torch.Tensor) -> int:
    flip = pyro.sample(f"{prefix}_{i}", dist.Bernoulli(logits=amortized_logits(weights, i, o)))
    if flip.item() == 1:
        return 0
    return _amortized_sequential(prefix, i + 1, weights, o) + 1


def guide_sequential_amortized(obs: torch.Tensor, observations: dict | None = None) -> None:
    weights = pyro.param("guide_weights", lambda: torch.zeros(3, device=obs.device))
    for b in batch_plate("batch", len(obs)):
        _amortized_sequential(f"{b}", 0, weights, obs[b])


# -- padded form -----------------------------------------------------------------


def geometric_padded(name: str, logits: torch.Tensor, max_steps: int) -> torch.Tensor:
    """``G`` for every lane at once: site ``f"{name}_{t}"`` is flip ``t`` of every lane,
    masked once the lane has had its success."""
    lanes = Lanes(name, max_steps, device=logits.device)
    g = lanes.zeros(dtype=torch.long)
    for _ in lanes:
        flip = lanes.sample(dist.Bernoulli(logits=logits))
        g = lanes.where(g + (1 - flip.long()), g)  # a failure counts on running lanes
        lanes.finish(flip == 1)
    return g


def model_padded(
    obs: torch.Tensor, observations: dict | None = None, max_steps: int = DEFAULTS["max_steps"]
) -> None:
    logits = pyro.param("model_logits", lambda: torch.tensor(0.0, device=obs.device))
    with batch_plate("batch", len(obs)):
        g = geometric_padded("g", logits, max_steps)
        pyro.sample(
            "obs",
            dist.Bernoulli(probs=torch.tensor(MATCH, device=obs.device)),
            obs=(g == obs).float(),
        )


def guide_padded(
    obs: torch.Tensor, observations: dict | None = None, max_steps: int = DEFAULTS["max_steps"]
) -> None:
    logits = pyro.param("guide_logits", lambda: torch.tensor(0.0, device=obs.device))
    with batch_plate("batch", len(obs)):
        geometric_padded("g", logits, max_steps)


def guide_padded_amortized(
    obs: torch.Tensor, observations: dict | None = None, max_steps: int = DEFAULTS["max_steps"]
) -> None:
    weights = pyro.param("guide_weights", lambda: torch.zeros(3, device=obs.device))
    with batch_plate("batch", len(obs)):
        lanes = Lanes("g", max_steps, device=obs.device)
        for t in lanes:
            flip = lanes.sample(dist.Bernoulli(logits=amortized_logits(weights, t, obs)))
            lanes.finish(flip == 1)


def program(form: str, guide: str = "seed"):
    """``(model, guide)`` of the given form; ``guide="seed"`` (one logit, as in the seed)
    or ``"amortized"`` (:func:`amortized_logits`, conditioned on the datum)."""
    common.check_choice("guide", guide, GUIDES)
    if form == "padded":
        return model_padded, (guide_padded if guide == "seed" else guide_padded_amortized)
    if form == "sequential":
        return model_sequential, (
            guide_sequential if guide == "seed" else guide_sequential_amortized
        )
    raise ValueError(f"unknown form {form!r}; choose one of {FORMS}")


# -- exact values ---------------------------------------------------------------------


def log_evidence(obs: torch.Tensor, model_logits: torch.Tensor | float) -> torch.Tensor:
    """Exact ``log p(o_b) = log(0.01 + 0.98 (1-p)^o_b p)``, ``p = sigmoid(theta)``."""
    theta = torch.as_tensor(model_logits, dtype=torch.float64)
    log_geom = obs.double() * torch.nn.functional.logsigmoid(-theta) + (
        torch.nn.functional.logsigmoid(theta)
    )
    return torch.logaddexp(
        torch.tensor(math.log(1 - MATCH), dtype=torch.float64),
        math.log(2 * MATCH - 1) + log_geom,
    )


def best_mean_log_evidence(obs: torch.Tensor) -> tuple[float, float]:
    """``(max_p mean_b log p(o_b), argmax p)`` by a fine grid over ``p``."""
    p = torch.linspace(1e-3, 1 - 1e-3, 4001, dtype=torch.float64)
    values = log_evidence(obs.unsqueeze(0), torch.logit(p).unsqueeze(1)).mean(1)
    i = int(values.argmax())
    return float(values[i]), float(p[i])


def sample_data(n: int, p: float, seed: int = 0) -> torch.Tensor:
    """``n`` failure counts ``o ~ Geometric(p)``."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    return torch.floor(torch.log1p(-u) / math.log1p(-p)).long()


def make_objective(name: str, num_particles: int, form: str):
    """The batchplate objective called ``name``; particles vectorized for the padded form."""
    return common.make_objective(
        name, num_particles, vectorize_particles=form == "padded", allowed=OBJECTIVES
    )


def train(
    objective: str,
    num_particles: int,
    *,
    batch_size: int,
    steps: int,
    lr: float,
    form: str = "padded",
    guide_kind: str = "seed",
    seed: int = 0,
    p_true: float = DEFAULTS["p_true"],
    dataset_size: int = DEFAULTS["dataset_size"],
    max_steps: int = DEFAULTS["max_steps"],
    eval_every: int = DEFAULTS["eval_every"],
    bar=None,
) -> dict:
    """Train ``theta`` and ``phi`` on minibatches of a fixed dataset; return the history."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    data = sample_data(dataset_size, p_true, seed=seed)
    best, p_best = best_mean_log_evidence(data)
    model, guide = program(form, guide_kind)
    kwargs = {"max_steps": max_steps} if form == "padded" else {}
    svi = pyro.infer.SVI(
        model, guide, pyro.optim.Adam({"lr": lr}), make_objective(objective, num_particles, form)
    )
    history: dict = {"step": [], "p": [], "q": [], "evidence_gap": [], "loss": []}

    def record(step: int, running: float) -> None:
        theta = pyro.param("model_logits").detach()
        history["step"].append(step)
        history["p"].append(float(torch.sigmoid(theta)))
        phi = pyro.param("guide_logits" if guide_kind == "seed" else "guide_weights")
        history["q"].append(float(torch.sigmoid(phi.detach().reshape(-1)[0])))
        history["evidence_gap"].append(best - float(log_evidence(data, theta).mean()))
        history["loss"].append(running)

    # The programs' initial values, created here so step 0 can be recorded.
    pyro.param("model_logits", torch.tensor(0.0))
    if guide_kind == "seed":
        pyro.param("guide_logits", torch.tensor(0.0))
    else:
        pyro.param("guide_weights", torch.zeros(3))
    record(0, math.nan)
    running = math.nan
    for step in range(1, steps + 1):
        idx = torch.randint(dataset_size, (batch_size,))
        loss = svi.step(data[idx], **kwargs)
        loss = loss[0] if isinstance(loss, tuple) else loss  # RWS: (wake-theta, phi)
        running = loss if math.isnan(running) else 0.95 * running + 0.05 * loss
        if step % eval_every == 0 or step == steps:
            record(step, running)
            if bar is not None:
                bar.set_postfix(loss=f"{running:.3f}", p=f"{history['p'][-1]:.3f}")
        if bar is not None:
            bar.update(1)
    history["best_mean_log_evidence"] = best
    history["p_mle"] = p_best
    return history


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
    form: str = DEFAULTS["form"],
    guide: str = DEFAULTS["guide"],
    p_true: float = DEFAULTS["p_true"],
    dataset_size: int = DEFAULTS["dataset_size"],
    max_steps: int = DEFAULTS["max_steps"],
    eval_every: int = DEFAULTS["eval_every"],
) -> dict:
    """Train the geometric program in one form; plot ``p``, the guide's ``q`` and the
    evidence gap. Returns ``p``, ``p_mle``, ``q``, ``evidence_gap``, ``final_loss``,
    ``seconds``, ``ms_per_step`` and ``plot``."""

    common.check_choice("objective", objective, OBJECTIVES)
    common.check_choice("form", form, FORMS)
    common.check_choice("guide", guide, GUIDES)
    out = common.output_dir(out_dir)
    stem = f"{NAME}-{objective}"
    bar = common.progress_bar(steps, f"{stem} ({form})", progress)
    t0 = time.perf_counter()
    history = train(
        objective,
        num_particles,
        batch_size=batch_size,
        steps=steps,
        lr=lr,
        form=form,
        guide_kind=guide,
        seed=seed,
        p_true=p_true,
        dataset_size=dataset_size,
        max_steps=max_steps,
        eval_every=eval_every,
        bar=bar,
    )
    seconds = time.perf_counter() - t0
    bar.close()

    plt = common.pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].plot(history["step"], history["p"], label="model p = sigmoid(theta)")
    axes[0].plot(history["step"], history["q"], label="guide q = sigmoid(phi_0)")
    axes[0].axhline(history["p_mle"], color="k", ls="--", lw=0.8, label="maximum likelihood p")
    axes[0].axhline(p_true, color="gray", ls=":", lw=0.8, label="p_true")
    axes[0].set_ylabel("success probability")
    axes[0].legend(fontsize=7)
    axes[1].plot(history["step"], [max(v, 1e-6) for v in history["evidence_gap"]])
    axes[1].set_yscale("log")
    axes[1].set_ylabel("max mean log p(o) - mean log p_theta(o)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"geometric ({form}, {guide} guide), {objective}, K={num_particles}, B={batch_size}",
        fontsize=10,
    )
    plot = common.save_figure(fig, out / f"{stem}.png")

    metrics = {
        "example": NAME,
        "objective": objective,
        "form": form,
        "guide": guide,
        "num_particles": num_particles,
        "batch_size": batch_size,
        "steps": steps,
        "lr": lr,
        "seed": seed,
        "p": history["p"][-1],
        "p_mle": history["p_mle"],
        "p_true": p_true,
        "q": history["q"][-1],
        "evidence_gap": history["evidence_gap"][-1],
        "initial_evidence_gap": history["evidence_gap"][0],
        "final_loss": history["loss"][-1],
        "seconds": seconds,
        "ms_per_step": 1000 * seconds / max(1, steps),
        "plot": str(plot),
    }
    if progress:
        print(f"plot: {plot}")
        print(
            f"{stem} ({form}) K={num_particles} B={batch_size}: p {metrics['p']:.3f} "
            f"(MLE {metrics['p_mle']:.3f}), evidence gap {metrics['evidence_gap']:.4f} "
            f"(start {metrics['initial_evidence_gap']:.4f}); {seconds:.0f} s"
        )
    return metrics
