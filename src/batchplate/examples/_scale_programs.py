"""The scale example's model and guide, vectorized and sequential, and the exact
posterior they are checked against."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch

from batchplate import batch_plate

LAYOUTS = ("vectorized", "sequential")

GUESS, GUESS_SCALE, OBS_SCALE = 8.5, 1.0, 0.75


@dataclass(frozen=True)
class Posterior:
    """The exact amortized posterior `N(a x + c, scale)` for prior mean `m`."""

    a: float
    c: float
    scale: float

    @classmethod
    def exact(cls, m: float = GUESS, s: float = GUESS_SCALE, t: float = OBS_SCALE) -> Posterior:
        v = s**2 + t**2
        return cls(s**2 / v, m * t**2 / v, s * t / math.sqrt(v))


def make_dataset(n: int = 1000, seed: int = 0) -> torch.Tensor:
    """Measurements of `n` objects drawn from the model with prior mean 8.5."""
    g = torch.Generator().manual_seed(seed)
    weight = GUESS + GUESS_SCALE * torch.randn(n, generator=g)
    return weight + OBS_SCALE * torch.randn(n, generator=g)


def _prior_mean(learn_prior: bool) -> torch.Tensor:
    """The prior mean: learned (starting 3 below its true value) or fixed."""
    if learn_prior:
        return pyro.param("guess", torch.tensor(GUESS - 3.0))
    return torch.tensor(GUESS)


def guide_params() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The guide's `a`, `c` and `scale` (parameters `a`, `c`, `log_scale`)."""
    a = pyro.param("a", torch.tensor(0.0))
    c = pyro.param("c", torch.tensor(0.0))
    log_scale = pyro.param("log_scale", torch.tensor(0.0))
    return a, c, log_scale.exp()


# Observations are keyed by site name (Pyro's RWS convention), so the sleep
# phase can hand the guide its fantasies in the same form as real data.
Observations = dict[str, torch.Tensor]
Subsample = torch.Tensor | None


def model(
    observations: Observations,
    size: int | None = None,
    subsample: Subsample = None,
    learn_prior: bool = False,
) -> None:
    """Vectorized: `observations = {"measurement": minibatch [B]}`."""
    x = observations["measurement"]
    guess = _prior_mean(learn_prior)
    with batch_plate("data", size or x.shape[-1], subsample=subsample):
        weight = pyro.sample("weight", dist.Normal(guess, GUESS_SCALE))
        pyro.sample("measurement", dist.Normal(weight, OBS_SCALE), obs=x)


def guide(
    observations: Observations,
    size: int | None = None,
    subsample: Subsample = None,
    learn_prior: bool = False,
) -> None:
    x = observations["measurement"]
    a, c, scale = guide_params()
    with batch_plate("data", size or x.shape[-1], subsample=subsample):
        pyro.sample("weight", dist.Normal(a * x + c, scale))


def sequential_model(
    observations: Observations,
    size: int | None = None,
    subsample: Subsample = None,
    learn_prior: bool = False,
) -> None:
    """Sequential: `observations = {"measurement_0": x_0, ...}`, one site per datum."""
    guess = _prior_mean(learn_prior)
    B = len(observations)
    data = batch_plate("data", size or B, subsample=subsample)
    for _ in data:
        b = data.datum  # the position in the minibatch (enumerate would miss it under autobatch)
        weight = pyro.sample(f"weight_{b}", dist.Normal(guess, GUESS_SCALE))
        pyro.sample(
            f"measurement_{b}",
            dist.Normal(weight, OBS_SCALE),
            obs=observations[f"measurement_{b}"],
        )


def sequential_guide(
    observations: Observations,
    size: int | None = None,
    subsample: Subsample = None,
    learn_prior: bool = False,
) -> None:
    a, c, scale = guide_params()
    B = len(observations)
    data = batch_plate("data", size or B, subsample=subsample)
    for _ in data:
        b = data.datum
        x = observations[f"measurement_{b}"]
        pyro.sample(f"weight_{b}", dist.Normal(a * x + c, scale))


def observations_of(batch: torch.Tensor, layout: str) -> Observations:
    """A minibatch of measurements keyed as the programs of `layout` read them."""
    if layout == "vectorized":
        return {"measurement": batch}
    return {f"measurement_{b}": x for b, x in enumerate(batch)}


PROGRAMS: dict[str, tuple[Callable, Callable]] = {
    "vectorized": (model, guide),
    "sequential": (sequential_model, sequential_guide),
}
