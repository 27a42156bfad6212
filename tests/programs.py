"""Test programs with exact answers (design.md, "Exact values to test against").

Every program comes in the layouts a user may write: a vectorized or a
sequential batch plate, optionally with an inner plate (a datum that is itself
a small dataset). ``plate`` can be swapped for ``pyro.plate`` to run the same
program under stock Pyro.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch

from batchplate import batch_plate

LAYOUTS = ("vectorized", "sequential")


@dataclass(frozen=True)
class Conjugate:
    """``w ~ N(m, s)``, and ``n`` observations ``x_j | w ~ N(w, t)`` per datum."""

    m: float = 8.5
    s: float = 1.0
    t: float = 0.75
    n: int = 1  # observations per datum (an inner plate when n > 1)

    def log_evidence(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``log p(x_b)``; ``x`` is ``[B]`` (n == 1) or ``[B, n]``."""
        if self.n == 1:
            return dist.Normal(self.m, math.sqrt(self.s**2 + self.t**2)).log_prob(x)
        cov = self.t**2 * torch.eye(self.n) + self.s**2 * torch.ones(self.n, self.n)
        return dist.MultivariateNormal(torch.full((self.n,), self.m), cov).log_prob(x)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Exact posterior ``N(loc_b, scale)`` of ``w_b``."""
        precision = 1 / self.s**2 + self.n / self.t**2
        total = x if self.n == 1 else x.sum(-1)
        loc = (self.m / self.s**2 + total / self.t**2) / precision
        return loc, 1 / math.sqrt(precision)

    def data(self, B: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        w = self.m + self.s * torch.randn(B, generator=g)
        shape = (B,) if self.n == 1 else (B, self.n)
        noise = torch.randn(shape, generator=g)
        return (w if self.n == 1 else w[:, None]) + self.t * noise

    # -- programs ------------------------------------------------------------

    def model(self, layout: str, plate=batch_plate, **plate_kwargs):
        def vectorized(x):
            with plate("data", len(x), **plate_kwargs) as idx:
                w = pyro.sample("w", dist.Normal(self.m, self.s))
                xb = x[idx]
                if self.n == 1:
                    pyro.sample("x", dist.Normal(w, self.t), obs=xb)
                else:
                    with pyro.plate("obs", self.n, dim=-2):
                        pyro.sample("x", dist.Normal(w, self.t), obs=xb.T)

        def sequential(x):
            for i in plate("data", len(x), **plate_kwargs):
                w = pyro.sample(f"w_{i}", dist.Normal(self.m, self.s))
                if self.n == 1:
                    pyro.sample(f"x_{i}", dist.Normal(w, self.t), obs=x[i])
                else:
                    with pyro.plate(f"obs_{i}", self.n):
                        pyro.sample(f"x_{i}", dist.Normal(w, self.t), obs=x[i])

        return {"vectorized": vectorized, "sequential": sequential}[layout]

    def guide(
        self, layout: str, plate=batch_plate, shift: float = 0.0, widen: float = 1.0, **plate_kwargs
    ):
        """The exact posterior, optionally shifted and widened (then no longer exact)."""

        def vectorized(x):
            with plate("data", len(x), **plate_kwargs) as idx:
                loc, scale = self.posterior(x[idx])
                pyro.sample("w", dist.Normal(loc + shift, scale * widen))

        def sequential(x):
            for i in plate("data", len(x), **plate_kwargs):
                loc, scale = self.posterior(x[i])
                pyro.sample(f"w_{i}", dist.Normal(loc + shift, scale * widen))

        return {"vectorized": vectorized, "sequential": sequential}[layout]


# -- the seed's geometric program ---------------------------------------------


def geometric(prefix: str, i: int, logits: torch.Tensor) -> int:
    """``G`` failures before the first success of ``Bernoulli(logits)``, site by site."""
    if pyro.sample(f"{prefix}_{i}", dist.Bernoulli(logits=logits)).item() == 1:
        return 0
    return geometric(prefix, i + 1, logits) + 1


def geometric_model(obs: torch.Tensor, plate=batch_plate) -> None:
    logits = pyro.param("model_logits", torch.tensor(0.0))
    for b in plate("batch", len(obs)):
        g = geometric(f"{b}", 0, logits)
        pyro.sample(
            f"obs_{b}",
            dist.Bernoulli(probs=torch.tensor(0.99)),
            obs=torch.tensor(float(g == int(obs[b]))),
        )


def geometric_guide(obs: torch.Tensor, plate=batch_plate) -> None:
    logits = pyro.param("guide_logits", torch.tensor(0.0))
    for b in plate("batch", len(obs)):
        geometric(f"{b}", 0, logits)


def geometric_log_evidence(obs: torch.Tensor) -> torch.Tensor:
    """Exact ``log p(obs_b)`` at model logits 0: ``0.01 + 0.98 * 0.5**(o+1)``."""
    return torch.log(0.01 + 0.98 * 0.5 ** (obs.double() + 1)).float()
