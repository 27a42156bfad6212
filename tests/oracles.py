"""Exact values the tests compare batchplate against (Contract page, docs/contract.md).

Nothing here calls batchplate: every value is either a closed form, a finite sum
that is the exact expectation (all ``K``-tuples of a discrete latent), a formula
for ``l[k, b]`` written by hand from known latent values, or the Monte Carlo
machinery (means, standard errors, a z-test with power) used to compare an
estimator's replicates with one of those exact values.

The programs these values belong to are in ``programs.py``; functions here take
the program's description (``Conjugate``, ``Mixture``) as their first argument
and only read its fields.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import pyro
import pyro.distributions as dist
import torch

if TYPE_CHECKING:  # only for annotations: programs.py imports this module
    from programs import Conjugate, Mixture

F64 = torch.float64

# ---------------------------------------------------------------------------
# Per-datum objectives from given log weights
# ---------------------------------------------------------------------------


def bound(log_w: torch.Tensor, alpha: float) -> torch.Tensor:
    """The per-datum objective ``L_b`` from its ``K`` log weights (particles in the
    last dim): ``mean_k l`` for ``alpha = 1`` (ELBO), else the Rényi bound
    ``log mean_k exp((1 - alpha) l) / (1 - alpha)`` (IWAE at ``alpha = 0``).
    Exact: the definition of the objectives, evaluated on the given weights."""
    K = log_w.shape[-1]
    if alpha == 1:
        return log_w.mean(-1)
    a = 1.0 - alpha
    return (torch.logsumexp(a * log_w, -1) - math.log(K)) / a


def exact_grad(fn: Callable[..., torch.Tensor], values: Sequence[float]) -> torch.Tensor:
    """Gradient of the scalar ``fn(*params)`` at ``values``, by autograd in float64.
    Exact when ``fn`` is an exact (closed-form or finite-sum) function of the params."""
    params = [torch.tensor(v, dtype=F64, requires_grad=True) for v in values]
    return torch.stack(torch.autograd.grad(fn(*params), params))


# ---------------------------------------------------------------------------
# Discrete models: expectations over all K-tuples are finite sums
# ---------------------------------------------------------------------------


def tuples(length: int) -> torch.Tensor:
    """All binary tuples of the given length, ``[2**length, length]`` (float64)."""
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=length)), dtype=F64)


def mixture_exact(
    mix: Mixture, theta, a, c, x: torch.Tensor, K: int, alpha: float, score=True, scale=1.0
) -> torch.Tensor:
    """``mean_b E[L_b]`` of the Bernoulli mixture (``programs.Mixture``) as a
    differentiable function of the prior logit ``theta`` and the guide's ``(a, c)``.

    Exact: ``z_b`` takes two values, so the expectation over the ``K`` particles
    of datum ``b`` is a sum over all ``2**K`` tuples weighted by their guide
    probability. With ``score=False`` the tuple probabilities are detached: the
    gradient is then the expectation of an estimator that drops the
    score-function term. ``scale`` is a user ``poutine.scale`` on every site of a
    datum: it scales the log weights ``l``, not the distribution the particles
    are drawn from.
    """
    z = tuples(K)
    total = 0.0
    for xb in x.to(F64):
        log_q = dist.Bernoulli(logits=a * xb + c).log_prob(z)
        log_p = dist.Bernoulli(logits=theta).log_prob(z)
        log_p = log_p + dist.Normal(mix.loc(z), mix.sigma).log_prob(xb)
        prob = log_q.sum(-1).exp()
        if not score:
            prob = prob.detach()
        total = total + (prob * bound(scale * (log_p - log_q), alpha)).sum()
    return total / len(x)


def inner_plate_elbo_exact(
    mix: Mixture, y: torch.Tensor, eta, theta, g, a, c, d, score=True
) -> torch.Tensor:
    """``mean_b E_q[l_b]`` of the mixture with an inner plate
    (``programs.inner_plate_programs``) as a function of its six parameters.

    Exact: datum ``b`` has ``1 + n`` binary latents ``(u_b, z_b1..z_bn)``, so
    ``E_q[l_b]`` is a sum over all ``2**(1+n)`` configurations (``score=False``:
    probabilities detached, as in :func:`mixture_exact`)."""
    n = y.shape[1]
    config = tuples(1 + n)
    u, z = config[:, :1], config[:, 1:]
    total = 0.0
    for yb in y.to(F64):
        log_q = dist.Bernoulli(logits=g).log_prob(u).sum(-1)
        log_q = log_q + dist.Bernoulli(logits=a * yb + c + d * u).log_prob(z).sum(-1)
        log_p = dist.Bernoulli(logits=eta).log_prob(u).sum(-1)
        log_p = log_p + dist.Bernoulli(logits=theta).log_prob(z).sum(-1)
        loc = mix.loc(z) + mix.delta * u
        log_p = log_p + dist.Normal(loc, mix.sigma).log_prob(yb).sum(-1)
        prob = log_q.exp() if score else log_q.exp().detach()
        total = total + (prob * (log_p - log_q)).sum()
    return total / len(y)


def geometric_log_evidence(obs: torch.Tensor) -> torch.Tensor:
    """``log p(obs_b)`` of the geometric program of Pyro issue #2220 at model logits 0.

    Exact: ``P(g = o) = 0.5**(o + 1)`` and ``p(obs_b | g)`` is 0.99 if ``g = o_b``
    else 0.01, so ``p(obs_b) = 0.01 + 0.98 * 0.5**(o_b + 1)``."""
    return torch.log(0.01 + 0.98 * 0.5 ** (obs.double() + 1)).float()


def geometric_iwae_se(obs: torch.Tensor, K: int) -> torch.Tensor:
    """Standard error of the per-datum IWAE estimate of the geometric program with
    the prior as guide, ``K`` particles (float64).

    The weights are ``0.99`` with probability ``h = 0.5**(o_b + 1)``, else ``0.01``,
    so ``sd(w) = 0.98 sqrt(h (1 - h))`` in closed form; the delta method gives
    ``sd(w) / (sqrt(K) p(obs_b))`` for ``log mean_k w``."""
    hit = 0.5 ** (obs.double() + 1)
    return 0.98 * torch.sqrt(hit * (1 - hit) / K) / geometric_log_evidence(obs).double().exp()


# ---------------------------------------------------------------------------
# The conjugate Gaussian: closed forms
# ---------------------------------------------------------------------------


def conjugate_log_evidence(conj: Conjugate, x: torch.Tensor) -> torch.Tensor:
    """``log p(x_b)``; ``x`` is ``[B]`` (``n == 1``) or ``[B, n]``.

    Exact: ``x_b`` is Gaussian, ``N(m, s^2 + t^2)`` for one observation, and for
    ``n`` a multivariate Normal with covariance ``t^2 I + s^2 11^T``."""
    if conj.n == 1:
        return dist.Normal(conj.m, math.sqrt(conj.s**2 + conj.t**2)).log_prob(x)
    cov = conj.t**2 * torch.eye(conj.n) + conj.s**2 * torch.ones(conj.n, conj.n)
    return dist.MultivariateNormal(torch.full((conj.n,), conj.m), cov).log_prob(x)


def conjugate_posterior(conj: Conjugate, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The posterior ``N(loc_b, scale)`` of ``w_b`` (precision-weighted means).

    Exact: Normal prior, Normal likelihood; with this as the guide every log
    weight equals ``log p(x_b)``."""
    precision = 1 / conj.s**2 + conj.n / conj.t**2
    total = x if conj.n == 1 else x.sum(-1)
    loc = (conj.m / conj.s**2 + total / conj.t**2) / precision
    return loc, 1 / math.sqrt(precision)


def conjugate_log_weights(
    conj: Conjugate,
    w: torch.Tensor,
    x: torch.Tensor,
    q: dist.Distribution,
    scale: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``l[k, b] = log N(w; m, s) + mask_b * scale * sum_j log N(x_bj; w, t) - log q(w)``
    at given latents ``w`` (``[K, B]``) and guide ``q`` (batch shape ``[B]``).

    Exact: the definition of the log weight, written by hand from latent values
    that are known (drawn by the test, or recorded by the guide). ``scale`` and
    ``mask`` are a user ``poutine.scale``/``poutine.mask`` on the observations."""
    if conj.n == 1:
        obs = dist.Normal(w, conj.t).log_prob(x)
    else:
        obs = dist.Normal(w.unsqueeze(-1), conj.t).log_prob(x).sum(-1)
    if mask is not None:
        obs = obs * mask
    return dist.Normal(conj.m, conj.s).log_prob(w) + scale * obs - q.log_prob(w)


def fixed_noise_log_weights(conj: Conjugate, x, eps, a, c, log_scale) -> torch.Tensor:
    """``l[k, b]`` of the guide ``N(a x + c, exp(log_scale))`` whose draws are
    ``w = a x + c + exp(log_scale) eps`` at fixed noise ``eps`` (``[K, B]``), as a
    differentiable function of ``(a, c, log_scale)``. Exact: fixed noise makes the
    reparameterized guide deterministic."""
    loc = a * x + c
    q = dist.Normal(loc, log_scale.exp())
    return conjugate_log_weights(conj, loc + q.scale * eps, x, q)


def fixed_noise_elbo_grad(conj: Conjugate, x, eps, loc: float, log_scale: float) -> torch.Tensor:
    """``d l / d(loc, log_scale)`` per datum for ``w = loc + exp(log_scale) eps`` at
    fixed noise ``eps``, by hand: ``dl/dw = -(w - m)/s^2 + (x - w)/t^2``, and
    ``-log N(w; loc, r) = log r + eps^2/2 + const`` at fixed ``eps``."""
    x, eps = torch.as_tensor(x, dtype=F64), torch.as_tensor(eps, dtype=F64)
    scale = math.exp(log_scale)
    w = loc + scale * eps
    dl_dw = -(w - conj.m) / conj.s**2 + (x - w) / conj.t**2
    return torch.stack([dl_dw, scale * (eps * dl_dw) + 1.0])


def expected_elbo_grad(conj: Conjugate, x: float, loc: float, log_scale: float) -> torch.Tensor:
    """Gradient of ``E_q[l]`` wrt ``(loc, log_scale)`` for ``q = N(loc, exp(log_scale))``,
    one datum. Exact: the expectation is in closed form,
    ``E[l] = -((loc-m)^2 + r^2)/(2 s^2) - ((x-loc)^2 + r^2)/(2 t^2) + log r + const``."""
    r2 = math.exp(2 * log_scale)
    d_loc = -(loc - conj.m) / conj.s**2 + (x - loc) / conj.t**2
    d_log_scale = 1.0 - r2 * (1 / conj.s**2 + 1 / conj.t**2)
    return torch.tensor([d_loc, d_log_scale], dtype=F64)


def point_mass_grad(conj: Conjugate, x0: float, m: float, loc: float) -> torch.Tensor:
    """``d l / d(m, loc)`` for one datum under the point-mass guide ``w = loc``:
    ``l = log N(loc; m, s) + log N(x0; loc, t)``, differentiated by hand. Exact:
    the guide has no randomness."""
    return torch.tensor([(loc - m) / conj.s**2, -(loc - m) / conj.s**2 + (x0 - loc) / conj.t**2])


def evidence_grad_prior_mean(conj: Conjugate, x: torch.Tensor) -> torch.Tensor:
    """``d/dm mean_b log p(x_b) = mean_b (x_b - m) / (s^2 + t^2)`` (``n == 1``), the
    expected IWAE gradient for the prior mean when the guide is the exact
    posterior. Exact: derivative of the closed-form evidence."""
    return ((x.double() - conj.m) / (conj.s**2 + conj.t**2)).mean()


# ---------------------------------------------------------------------------
# Monte Carlo against exact values
# ---------------------------------------------------------------------------


def mc(replicates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error over independent replicates (rows), in float64."""
    replicates = replicates.double()
    return replicates.mean(0), replicates.std(0) / math.sqrt(replicates.shape[0])


def pop_param_grads(names: Sequence[str]) -> torch.Tensor:
    """The accumulated ``.grad`` of the named ``pyro.param``s (zero where none), cleared
    afterwards: one replicate of an estimator run through ``loss_and_grads``."""
    grads = []
    for name in names:
        leaf = pyro.param(name).unconstrained()
        grads.append(torch.zeros(()) if leaf.grad is None else leaf.grad.clone())
        leaf.grad = None
    return torch.stack(grads)


def importance_se(log_w: torch.Tensor) -> torch.Tensor:
    """Standard error of ``log mean_k exp l[k, b]`` per datum from its own weights
    ``[K, B]``, by the delta method: ``sd(w) / (sqrt(K) mean(w))`` (float64)."""
    log_w = log_w.double()
    w = (log_w - log_w.max(0).values).exp()
    return w.std(0) / (math.sqrt(log_w.shape[0]) * w.mean(0))


def report(label: str, **values: torch.Tensor) -> None:
    """Print the numbers behind a comparison when GRAD_REPORT is set (run with -s)."""
    if os.environ.get("GRAD_REPORT"):
        print(f"\n{label}:", *(f"{k} {v.numpy().round(4)}" for k, v in values.items()))


def assert_matches(mean, se, exact, label: str, *, max_rel_se: float = 0.1) -> None:
    """A Monte Carlo mean within 4 standard errors of the exact value, and a standard
    error small enough (``max_rel_se`` of the largest exact entry) for the test to
    have power."""
    scale = exact.abs().max()
    assert (se <= max_rel_se * scale).all(), f"{label}: s.e. {se} too large for {exact}"
    z = (mean - exact) / se
    report(label, exact=exact, mc=mean, se=se, z=z)
    assert (z.abs() <= 4).all(), f"{label}: exact {exact}, MC {mean} +- {se} (z = {z})"
