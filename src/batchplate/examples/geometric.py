r"""The geometric program of Pyro issue #2220, sequential and padded, trained at batch size > 1.

The program of the Pyro discussion "Batching and plating" (issue #2220): for
each datum `b` a geometric count `G_b` (failures before the first success of
`Bernoulli(sigmoid(theta))`) is drawn flip by flip, a recursion whose length
depends on the sampled values, and the observation is the event `G_b = o_b`,
seen through a noisy channel:

$$
p(\mathrm{obs}_b = 1 \mid G_b) = \begin{cases} 0.99 & G_b = o_b \\ 0.01 & \text{otherwise,}
\end{cases}
\qquad p(o_b) = 0.01 + 0.98\,(1 - p)^{o_b}\, p, \quad p = \mathrm{sigmoid}(\theta).
$$

`guide="unamortized"` is that discussion's guide: the same recursion with its
own logit `phi`, shared by all data. Under RWS it moves in lockstep with the
model (`theta` and `phi` receive the same wake gradient, as
$\nabla_\theta \log p(z) = \nabla_\phi \log q(z)$ at $\theta = \phi$).
`guide="amortized"` conditions each flip on the datum: logit `phi_0` before
`o_b`, `phi_0 + phi_1` at flip `o_b`, `phi_0 + phi_2` after, which can put
most of its mass on `G_b = o_b` (close to the posterior). Both `theta` and the
guide's parameters are learned.

Two forms of the same program:

- `"sequential"`: the discussion's code with a sequential `batch_plate`; one
  Python recursion per datum and particle, `vectorize_particles=False`. Sites
  `f"{b}_{i}"` and `f"obs_{b}"`.
- `"padded"`: one loop over all lanes (particles x data) with `Lanes`,
  finished lanes masked; a vectorized batch plate and
  `vectorize_particles=True`. Sites `f"g_{t}"` and `"obs"`.
- `"autobatch"`: the sequential program, run by the objective with
  `autobatch=True` and `vectorize_particles=True`: all `K * B` recursions at
  once, each round of flips one tensor operation (`batchplate.autobatch`).

On the same flips both give the same per-datum log weights (tested in
`tests/test_padded.py`); the padded form is orders of magnitude faster
(`batchplate bench --only padded`).

Data: `o_b ~ Geometric(p_true)` (failure counts). Tracked: the learned
`p = sigmoid(theta)`, the exact average log evidence of the training set
under the current model, and the gap to its maximum (found by a grid search
over `p` on the exact formula): `evidence_gap = max_p mean log p(o) -
mean log p_theta(o)`, zero at the maximum-likelihood `theta`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import torch

import batchplate
from batchplate import batch_plate
from batchplate.examples import _common as common
from batchplate.examples import _runner as runner
from batchplate.padded import Lanes

NAME = "geometric"
OBJECTIVES = ("rws", "iwae", "vimco", "elbo")
FORMS = ("padded", "sequential", "autobatch")
#: `"unamortized"`: one logit for all data; `"amortized"`: logits that depend on the datum.
GUIDES = ("unamortized", "amortized")
MATCH = 0.99  # p(obs = 1 | G == o)


@dataclass(frozen=True, kw_only=True)
class Options(runner.Options):
    """The keywords of `run()`: the shared ones, then this example's.

    :param form: `"padded"`, `"sequential"` or `"autobatch"` (the sequential
        program with `autobatch=True`).
    :param guide: one of `GUIDES`.
    :param p_true: success probability of the data's geometric distribution.
    :param dataset_size: number of counts in the training set.
    :param max_steps: the padded loop's step limit.
    :param eval_every: steps between two records of the history.
    """

    OBJECTIVES = OBJECTIVES
    CHOICES = {"form": FORMS, "guide": GUIDES}

    objective: str = "rws"
    num_particles: int = 16
    batch_size: int = 64
    steps: int = 1000
    lr: float = 0.02
    form: str = "padded"
    guide: str = "unamortized"
    p_true: float = 0.3
    dataset_size: int = 1000
    max_steps: int = 1000
    eval_every: int = 10


DEFAULTS = runner.defaults(Options)

# -- sequential form (the program of Pyro issue #2220) ------------------------------


def geometric_sequential(prefix: str, i: int, logits: torch.Tensor) -> int:
    """`G` failures before the first success, one site `f"{prefix}_{i}"` per flip."""
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


def amortized_logits(weights: torch.Tensor, t: int | torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """The amortized guide's logit of flip `t` for observation `o`:
    `w_0` before `o`, `w_0 + w_1` at `o`, `w_0 + w_2` after."""
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
    """`G` for every lane at once: site `f"{name}_{t}"` is flip `t` of every lane,
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


PROGRAMS: dict[tuple[str, str], tuple[Callable, Callable]] = {
    ("padded", "unamortized"): (model_padded, guide_padded),
    ("padded", "amortized"): (model_padded, guide_padded_amortized),
    ("sequential", "unamortized"): (model_sequential, guide_sequential),
    ("sequential", "amortized"): (model_sequential, guide_sequential_amortized),
}


def program(form: str, guide: str = "unamortized") -> tuple[Callable, Callable]:
    """`(model, guide)` of the given form; `guide="unamortized"` (one logit for all
    data) or `"amortized"` (`amortized_logits`, conditioned on the datum)."""
    common.check_choice("form", form, FORMS)
    common.check_choice("guide", guide, GUIDES)
    return PROGRAMS["sequential" if form == "autobatch" else form, guide]


# -- exact values ---------------------------------------------------------------------


def log_evidence(obs: torch.Tensor, model_logits: torch.Tensor | float) -> torch.Tensor:
    """Exact `log p(o_b) = log(0.01 + 0.98 (1-p)^o_b p)`, `p = sigmoid(theta)`."""
    theta = torch.as_tensor(model_logits, dtype=torch.float64)
    log_geom = obs.double() * torch.nn.functional.logsigmoid(-theta) + (
        torch.nn.functional.logsigmoid(theta)
    )
    return torch.logaddexp(
        torch.tensor(math.log(1 - MATCH), dtype=torch.float64),
        math.log(2 * MATCH - 1) + log_geom,
    )


def best_mean_log_evidence(obs: torch.Tensor) -> tuple[float, float]:
    """`(max_p mean_b log p(o_b), argmax p)` by a fine grid over `p`."""
    p = torch.linspace(1e-3, 1 - 1e-3, 4001, dtype=torch.float64)
    values = log_evidence(obs.unsqueeze(0), torch.logit(p).unsqueeze(1)).mean(1)
    i = int(values.argmax())
    return float(values[i]), float(p[i])


def sample_data(n: int, p: float, seed: int = 0) -> torch.Tensor:
    """`n` failure counts `o ~ Geometric(p)`."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    return torch.floor(torch.log1p(-u) / math.log1p(-p)).long()


def make_objective(name: str, num_particles: int, form: str) -> batchplate.BatchObjective:
    """The batchplate objective called `name`; particles vectorized for the padded
    and autobatch forms (for the latter: all `K * B` lanes in one run)."""
    return common.make_objective(
        name,
        num_particles,
        vectorize_particles=form != "sequential",
        allowed=OBJECTIVES,
        autobatch=form == "autobatch",
    )


# -- training -------------------------------------------------------------------------


def train(options: Options, bar: Any = None) -> dict:
    """Train `theta` and the guide on minibatches of a fixed dataset; return the history.

    Every `eval_every` steps the history records the model's `p`, the guide's
    first probability `q` and the exact `evidence_gap`.
    """
    o = options
    pyro.clear_param_store()
    pyro.set_rng_seed(o.seed)
    data = sample_data(o.dataset_size, o.p_true, seed=o.seed)
    best, p_best = best_mean_log_evidence(data)
    model, guide = program(o.form, o.guide)
    kwargs = {"max_steps": o.max_steps} if o.form == "padded" else {}
    objective = make_objective(o.objective, o.num_particles, o.form)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": o.lr}), objective)
    history: dict = {"step": [], "p": [], "q": [], "evidence_gap": [], "loss": []}
    guide_param = "guide_logits" if o.guide == "unamortized" else "guide_weights"

    def record(step: int, running: float) -> dict[str, str]:
        theta = pyro.param("model_logits").detach()
        history["step"].append(step)
        history["p"].append(float(torch.sigmoid(theta)))
        phi = pyro.param(guide_param).detach().reshape(-1)[0]
        history["q"].append(float(torch.sigmoid(phi)))
        history["evidence_gap"].append(best - float(log_evidence(data, theta).mean()))
        history["loss"].append(running)
        return {"loss": f"{running:.3f}", "p": f"{history['p'][-1]:.3f}"}

    # The programs' initial values, created here so step 0 can be recorded.
    pyro.param("model_logits", torch.tensor(0.0))
    pyro.param(guide_param, torch.tensor(0.0) if o.guide == "unamortized" else torch.zeros(3))
    record(0, math.nan)

    def step(_: int):
        idx = torch.randint(o.dataset_size, (o.batch_size,))
        return svi.step(data[idx], **kwargs)

    runner.train_loop(step, o.steps, every=o.eval_every, record=record, bar=bar)
    history["best_mean_log_evidence"] = best
    history["p_mle"] = p_best
    return history


def _figures(history: dict, o: Options) -> dict[str, Any]:
    fig, axes = common.pyplot().subplots(1, 2, figsize=(9, 3.5))
    axes[0].plot(history["step"], history["p"], label="model p = sigmoid(theta)")
    axes[0].plot(history["step"], history["q"], label="guide q = sigmoid(phi_0)")
    axes[0].axhline(history["p_mle"], color="k", ls="--", lw=0.8, label="maximum likelihood p")
    axes[0].axhline(o.p_true, color="gray", ls=":", lw=0.8, label="p_true")
    axes[0].set_ylabel("success probability")
    axes[0].legend(fontsize=7)
    axes[1].plot(history["step"], [max(v, 1e-6) for v in history["evidence_gap"]])
    axes[1].set_yscale("log")
    axes[1].set_ylabel("max mean log p(o) - mean log p_theta(o)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"geometric ({o.form}, {o.guide} guide), {o.objective}, "
        f"K={o.num_particles}, B={o.batch_size}",
        fontsize=10,
    )
    return {"plot": fig}


def _metrics(history: dict, o: Options, seconds: float, paths: dict[str, Path]) -> dict:
    return {
        "example": NAME,
        **o.pick(
            "objective", "form", "guide", "num_particles", "batch_size", "steps", "lr", "seed"
        ),
        "p": history["p"][-1],
        "p_mle": history["p_mle"],
        "p_true": o.p_true,
        "q": history["q"][-1],
        "evidence_gap": history["evidence_gap"][-1],
        "initial_evidence_gap": history["evidence_gap"][0],
        "final_loss": history["loss"][-1],
        **runner.timing(seconds, o.steps),
        "plot": str(paths["plot"]),
    }


def _summary(m: dict) -> str:
    return (
        f"K={m['num_particles']} B={m['batch_size']}: p {m['p']:.3f} "
        f"(MLE {m['p_mle']:.3f}), evidence gap {m['evidence_gap']:.4f} "
        f"(start {m['initial_evidence_gap']:.4f}); {m['seconds']:.0f} s"
    )


EXAMPLE = runner.Example(NAME, train, _figures, _metrics, _summary, label=lambda o: f" ({o.form})")


def run(**options: Any) -> dict:
    """Train the geometric program in one form; plot `p`, the guide's `q` and the
    evidence gap.

    :param options: the fields of `Options` (defaults there).
    :returns: `p`, `p_mle`, `q`, `evidence_gap`, `final_loss`, `seconds`,
        `ms_per_step`, `plot` and the options of the run.
    """
    return runner.run_example(EXAMPLE, Options(**options))
