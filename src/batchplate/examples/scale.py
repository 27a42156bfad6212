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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch

from batchplate import batch_plate

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
    with batch_plate("data", size or len(x), subsample=subsample):
        weight = pyro.sample("weight", dist.Normal(guess, GUESS_SCALE))
        pyro.sample("measurement", dist.Normal(weight, OBS_SCALE), obs=x)


def guide(observations=None, size=None, subsample=None, learn_prior=False):
    x = observations["measurement"]
    a, c, scale = _guide_params()
    with batch_plate("data", size or len(x), subsample=subsample):
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
