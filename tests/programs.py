"""Test programs (models and guides) with exact answers; the answers are in ``oracles.py``.

Every program comes in the layouts a user may write: a vectorized or a
sequential batch plate, optionally with an inner plate (a datum that is itself
a small dataset). ``plate`` can be swapped for ``pyro.plate`` to run the same
program under stock Pyro. The exact values they are tested against are listed
on the Contract page (docs/contract.md).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

from batchplate import batch_plate
from oracles import conjugate_log_evidence, conjugate_posterior
from oracles import geometric_log_evidence as geometric_log_evidence  # re-exported

LAYOUTS = ("vectorized", "sequential")


@dataclass(frozen=True)
class Conjugate:
    """``w ~ N(m, s)``, and ``n`` observations ``x_j | w ~ N(w, t)`` per datum."""

    m: float = 8.5
    s: float = 1.0
    t: float = 0.75
    n: int = 1  # observations per datum (an inner plate when n > 1)

    def log_evidence(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``log p(x_b)`` (:func:`oracles.conjugate_log_evidence`)."""
        return conjugate_log_evidence(self, x)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Exact posterior ``N(loc_b, scale)`` of ``w_b`` (:func:`oracles.conjugate_posterior`)."""
        return conjugate_posterior(self, x)

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

    def scaled_masked_programs(self, layout: str, record: list, scale=1.0, mask=None):
        """The model whose observation site is under ``poutine.scale(scale)`` and
        ``poutine.mask(mask[b])`` (``n == 1``); the exact guide appends its draws to ``record``."""

        def obs_mask(b):
            return True if mask is None else (mask if layout == "vectorized" else bool(mask[b]))

        def model(x):
            if layout == "vectorized":
                with batch_plate("data", len(x)):
                    w = pyro.sample("w", dist.Normal(self.m, self.s))
                    with poutine.scale(scale=scale), poutine.mask(mask=obs_mask(None)):
                        pyro.sample("x", dist.Normal(w, self.t), obs=x)
            else:
                for i in batch_plate("data", len(x)):
                    w = pyro.sample(f"w_{i}", dist.Normal(self.m, self.s))
                    with poutine.scale(scale=scale), poutine.mask(mask=obs_mask(i)):
                        pyro.sample(f"x_{i}", dist.Normal(w, self.t), obs=x[i])

        def guide(x):
            loc, r = self.posterior(x)
            if layout == "vectorized":
                with batch_plate("data", len(x)):
                    record.append(pyro.sample("w", dist.Normal(loc, r)))
            else:
                for i in batch_plate("data", len(x)):
                    record.append(pyro.sample(f"w_{i}", dist.Normal(loc[i], r)))

        return model, guide


def fixed_noise_guide(layout, loc, log_scale, eps, plate=batch_plate, **plate_kwargs):
    """``w_b = loc_b + exp(log_scale) * eps_b`` with fixed ``eps``, scored under
    ``N(loc_b, exp(log_scale))``: a reparameterized Normal guide whose draws we know.

    ``loc`` is a function of the datum and ``log_scale`` a function of nothing
    (so that they may read ``pyro.param``s inside the guide); ``eps`` is indexed by position
    in the minibatch (and has a leading particle dim for vectorized particles).
    A sequential guide traced once per particle takes ``eps[k]`` in turn.
    """
    calls = itertools.count()

    def site(name, xb, e):
        scale = log_scale().exp()
        w = loc(xb) + scale * e
        pyro.sample(name, dist.Delta(w, log_density=dist.Normal(loc(xb), scale).log_prob(w)))

    def vectorized(x):
        with plate("data", len(x), **plate_kwargs) as idx:
            site("w", x[idx], eps)

    def sequential(x):
        e = eps[next(calls) % len(eps)] if eps.dim() == 2 else eps
        for pos, i in enumerate(plate("data", len(x), **plate_kwargs)):
            site(f"w_{i}", x[i], e[pos])

    return {"vectorized": vectorized, "sequential": sequential}[layout]


# -- w ~ N(0, 1), x | w ~ N(w, 1): the smallest program, for the structural rules --

TOY_X = torch.tensor([1.0, 2.0, 3.0])


def vec_model(x):
    with batch_plate("data", len(x)):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(w, 1.0), obs=x)


def vec_guide(x):
    with batch_plate("data", len(x)):
        pyro.sample("w", dist.Normal(0.0, 1.0))


def seq_model(x):
    for i in batch_plate("data", len(x)):
        w = pyro.sample(f"w_{i}", dist.Normal(0.0, 1.0))
        pyro.sample(f"x_{i}", dist.Normal(w, 1.0), obs=x[i])


def seq_guide(x):
    for i in batch_plate("data", len(x)):
        pyro.sample(f"w_{i}", dist.Normal(0.0, 1.0))


# -- a Bernoulli mixture: discrete latents, exact expectations by enumeration --


@dataclass(frozen=True)
class Mixture:
    """``z ~ Bernoulli(logits)``, ``x | z ~ N(mu0 + (mu1 - mu0) z, sigma)``; with an
    inner plate, a datum-level ``u`` shifts every item's mean by ``delta * u``."""

    mu0: float = -1.0
    mu1: float = 1.5
    sigma: float = 1.0
    delta: float = 1.0

    def loc(self, z):
        return self.mu0 + (self.mu1 - self.mu0) * z


MIX = Mixture()


def mixture_programs(layout, theta, a, c, B, scale=1.0):
    """Model ``z_b ~ Bernoulli(logits=theta)``, ``x_b ~ N(MIX.loc(z_b), sigma)`` and guide
    ``q(z_b | x_b) = Bernoulli(logits=a x_b + c)`` for ``R = len(theta)`` copies of a
    ``B``-datum problem (copy ``r`` has parameters ``theta[r], a[r], c[r]``). ``scale``
    is a user ``poutine.scale`` on every site of a datum."""
    if layout == "vectorized":

        def model(x):
            with batch_plate("data", len(x)), poutine.scale(scale=scale):
                z = pyro.sample("z", dist.Bernoulli(logits=theta.repeat_interleave(B)))
                pyro.sample("x", dist.Normal(MIX.loc(z), MIX.sigma), obs=x)

        def guide(x):
            with batch_plate("data", len(x)), poutine.scale(scale=scale):
                logits = a.repeat_interleave(B) * x + c.repeat_interleave(B)
                pyro.sample("z", dist.Bernoulli(logits=logits))

    else:

        def model(x):
            for i in batch_plate("data", len(x)):
                with poutine.scale(scale=scale):
                    z = pyro.sample(f"z_{i}", dist.Bernoulli(logits=theta[i // B]))
                    pyro.sample(f"x_{i}", dist.Normal(MIX.loc(z), MIX.sigma), obs=x[i])

        def guide(x):
            for i in batch_plate("data", len(x)):
                with poutine.scale(scale=scale):
                    logits = a[i // B] * x[i] + c[i // B]
                    pyro.sample(f"z_{i}", dist.Bernoulli(logits=logits))

    return model, guide


def inner_plate_programs(layout, B, n, eta, theta, g, a, c, d):
    """Datum ``b``: ``u_b ~ Bernoulli(eta)``; for each of ``n`` items
    ``z_bj ~ Bernoulli(theta)``, ``y_bj ~ N(MIX.loc(z_bj) + delta u_b, sigma)``. Guide:
    ``u_b ~ Bernoulli(g)``, ``z_bj ~ Bernoulli(a y_bj + c + d u_b)``, the ``z_bj`` in an
    inner ``pyro.plate``. ``R = len(eta)`` copies of a ``B``-datum problem."""
    if layout == "vectorized":
        rep = [p.repeat_interleave(B) for p in (eta, theta, g, a, c, d)]
        eta_, theta_, g_, a_, c_, d_ = rep

        def model(y):
            with batch_plate("data", len(y)):
                u = pyro.sample("u", dist.Bernoulli(logits=eta_))
                with pyro.plate("items", n, dim=-2):
                    z = pyro.sample("z", dist.Bernoulli(logits=theta_))
                    loc = MIX.loc(z) + MIX.delta * u
                    pyro.sample("y", dist.Normal(loc, MIX.sigma), obs=y.T)

        def guide(y):
            with batch_plate("data", len(y)):
                u = pyro.sample("u", dist.Bernoulli(logits=g_))
                with pyro.plate("items", n, dim=-2):
                    pyro.sample("z", dist.Bernoulli(logits=a_ * y.T + c_ + d_ * u))

    else:

        def model(y):
            for i in batch_plate("data", len(y)):
                r = i // B
                u = pyro.sample(f"u_{i}", dist.Bernoulli(logits=eta[r]))
                with pyro.plate(f"items_{i}", n):
                    z = pyro.sample(f"z_{i}", dist.Bernoulli(logits=theta[r]))
                    loc = MIX.loc(z) + MIX.delta * u
                    pyro.sample(f"y_{i}", dist.Normal(loc, MIX.sigma), obs=y[i])

        def guide(y):
            for i in batch_plate("data", len(y)):
                r = i // B
                u = pyro.sample(f"u_{i}", dist.Bernoulli(logits=g[r]))
                with pyro.plate(f"items_{i}", n):
                    logits = a[r] * y[i] + c[r] + d[r] * u
                    pyro.sample(f"z_{i}", dist.Bernoulli(logits=logits))

    return model, guide


def one_site_model(x, plate=batch_plate, theta0=-1.0):
    """The mixture with a learnable prior logit ``prior_logit`` (one site per datum)."""
    theta = pyro.param("prior_logit", torch.tensor(theta0))
    with plate("data", len(x)):
        z = pyro.sample("z", dist.Bernoulli(logits=theta))
        pyro.sample("x", dist.Normal(MIX.loc(z), MIX.sigma), obs=x)


def one_site_guide(x, plate=batch_plate, phi0=1.0):
    """``z_b ~ Bernoulli(logits=guide_logit)``, one learnable logit for all data."""
    phi = pyro.param("guide_logit", torch.tensor(phi0))
    with plate("data", len(x)):
        pyro.sample("z", dist.Bernoulli(logits=phi))


# -- the geometric program of Pyro issue #2220 ---------------------------------


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
