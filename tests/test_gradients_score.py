"""Score-function gradient estimators against exact expected gradients.

Contract page (docs/contract.md), "Gradients". Ground truth never comes from
batchplate: it is the exact expected gradient of a small discrete model, where
the expectation of an objective over all ``K``-tuples of latent values per
datum is a finite sum (``oracles.mixture_exact``, ``oracles.inner_plate_elbo_exact``),
written as a differentiable function of the parameters and differentiated with
autograd (in float64).

Monte Carlo means are compared within 4 standard errors, and every statistical
test also asserts that its standard error is small enough for the comparison to
have power (a wrong estimator, e.g. one without its score-function term, is
many standard errors away).

Replicates: with a sequential batch plate, replicates are independent calls of
the objective. With a vectorized batch plate they are ``R`` copies of the
``B``-datum problem inside one minibatch of ``R * B`` data, each copy with its
own parameter tensors (entry ``r`` of a length-``R`` parameter). Since the
objective is the batch mean of per-datum objectives, ``R`` times the gradient
for entry ``r`` is copy ``r``'s estimator of the ``B``-datum gradient, and the
copies are independent. An estimator that coupled data would show up as a
biased mean or as a blown-up standard error.
"""

from __future__ import annotations

import functools

import pyro
import pytest
import torch

import batchplate
from oracles import (
    F64,
    assert_matches,
    exact_grad,
    inner_plate_elbo_exact,
    mc,
    mixture_exact,
    pop_param_grads,
)
from programs import MIX, inner_plate_programs, mixture_programs, one_site_guide, one_site_model

# ---------------------------------------------------------------------------
# 1. Score-function gradients on a discrete model
# ---------------------------------------------------------------------------
#
# z_b ~ Bernoulli(logits=theta), x_b | z_b ~ N(MU[z_b], SIGMA); guide
# q(z_b | x_b) = Bernoulli(logits=a * x_b + c) (programs.mixture_programs). The
# guide is far from the posterior, so all three gradients are clearly non-zero.

X = torch.tensor([-0.8, 0.6, 2.0])
THETA, A, C = 2.0, 0.0, -2.0
K = 3

# layout -> (vectorize_particles, copies per call, calls)
REPLICATION = {"vectorized": (True, 20000, 1), "sequential": (False, 1, 1000)}

OBJECTIVES = {
    "iwae": (0.0, lambda **kw: batchplate.RenyiELBO(alpha=0, num_particles=K, **kw)),
    "renyi_0.5": (0.5, lambda **kw: batchplate.RenyiELBO(alpha=0.5, num_particles=K, **kw)),
    "vimco": (0.0, lambda **kw: batchplate.VIMCO(num_particles=K, **kw)),
    "elbo": (1.0, lambda **kw: batchplate.Trace_ELBO(num_particles=K, **kw)),
}


def mixture_mc_grads(objective, layout, R, calls, scale=1.0):
    """``[R * calls, 3]`` replicates of the estimated gradient of ``mean_b L_b``."""
    params = [torch.full((R,), v, requires_grad=True) for v in (THETA, A, C)]
    model, guide = mixture_programs(layout, *params, B=len(X), scale=scale)
    data = X.repeat(R)
    out = []
    for _ in range(calls):
        loss = objective.differentiable_loss(model, guide, data)
        out.append(-R * torch.stack(torch.autograd.grad(loss, params), -1))
    return torch.cat(out)


@pytest.mark.parametrize("layout", ["vectorized", "sequential"])
@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_score_function_gradient_is_unbiased(name, layout):
    """Gradients wrt the prior logit theta and guide parameters (a, c) match the
    exact expected gradient of ``mean_b E[L_b]``."""
    alpha, make = OBJECTIVES[name]
    vectorize, R, calls = REPLICATION[layout]
    exact = exact_grad(lambda *p: mixture_exact(MIX, *p, X, K, alpha), (THETA, A, C))
    no_score = exact_grad(
        lambda *p: mixture_exact(MIX, *p, X, K, alpha, score=False), (THETA, A, C)
    )

    mean, se = mc(mixture_mc_grads(make(vectorize_particles=vectorize), layout, R, calls))

    assert_matches(mean, se, exact, f"{name}/{layout}")
    # Power: the estimator without its score-function term is far off.
    assert ((exact - no_score).abs() / se)[1:].max() > 8


@pytest.mark.parametrize("layout", ["vectorized", "sequential"])
@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_score_function_gradient_with_user_scale(name, layout):
    """A user ``poutine.scale(2)`` on a datum's sites scales its log weights
    (Contract page, docs/contract.md: user scales keep their meaning) but not the
    guide the particles are drawn from, so the score function is that of the
    unscaled ``log q`` (Pyro's convention: ``ScoreParts.scale_and_mask`` leaves it
    unscaled)."""
    scale = 2.0
    alpha, make = OBJECTIVES[name]
    vectorize, R, calls = REPLICATION[layout]
    calls = min(calls, 400)
    exact = exact_grad(lambda *p: mixture_exact(MIX, *p, X, K, alpha, scale=scale), (THETA, A, C))
    grads = mixture_mc_grads(make(vectorize_particles=vectorize), layout, R, calls, scale=scale)
    mean, se = mc(grads)
    assert_matches(mean, se, exact, f"{name}/{layout}/scale={scale}", max_rel_se=0.15)


# ---------------------------------------------------------------------------
# 2. Stock Pyro's RenyiELBO(alpha=0) gives a discrete guide zero gradient
# ---------------------------------------------------------------------------

X0, THETA0, PHI0 = -2.0, -1.0, 1.0


@pytest.mark.parametrize("vectorize", [True, False])
def test_stock_renyi_alpha0_zero_guide_gradient(vectorize):
    x = torch.tensor([X0])
    exact = exact_grad(
        lambda theta, phi: mixture_exact(MIX, theta, torch.zeros((), dtype=F64), phi, x, K, 0.0),
        (THETA0, PHI0),
    )
    assert exact[1].abs() > 0.5  # clearly non-zero: the guide should move

    model = functools.partial(one_site_model, theta0=THETA0)
    guide = functools.partial(one_site_guide, phi0=PHI0)
    names = ("prior_logit", "guide_logit")
    stock = pyro.infer.RenyiELBO(
        alpha=0, num_particles=K, vectorize_particles=vectorize, max_plate_nesting=1
    )
    for _ in range(20):
        stock.loss_and_grads(model, guide, x, plate=pyro.plate)
        grads = pop_param_grads(names)
        assert grads[0] != 0  # gradients were computed...
        assert grads[1] == 0  # ...but the guide gets exactly none

    objective = batchplate.RenyiELBO(alpha=0, num_particles=K, vectorize_particles=vectorize)
    replicates = []
    for _ in range(2500):
        objective.loss_and_grads(model, guide, x)
        replicates.append(-pop_param_grads(names))
    mean, se = mc(torch.stack(replicates))
    assert_matches(mean, se, exact, "batchplate one-site")
    assert mean[1].abs() > 8 * se[1]  # and it is not zero


# ---------------------------------------------------------------------------
# 3. Trace_ELBO's Rao-Blackwellized score term with an inner plate
# ---------------------------------------------------------------------------
#
# Datum b: u_b ~ Bernoulli(eta); for each of n items z_bj ~ Bernoulli(theta),
# y_bj ~ N(MU[z_bj] + DELTA * u_b, SIGMA). Guide: u_b ~ Bernoulli(g),
# z_bj ~ Bernoulli(a y_bj + c + d u_b), the z_bj in an inner pyro.plate
# (programs.inner_plate_programs).

Y = torch.tensor([[-1.0, 0.5, 2.0], [1.5, 2.5, -0.5]])
INNER = {"eta": 0.5, "theta": 1.0, "g": -0.5, "a": 0.5, "c": -1.0, "d": 1.0}


@pytest.mark.parametrize("layout, R, calls", [("vectorized", 20000, 1), ("sequential", 1, 1000)])
def test_elbo_rao_blackwellized_inner_plate(layout, R, calls):
    """Vectorized particles, K = 3 (leave-one-out baseline active): the MC mean of
    the gradient wrt all model and guide parameters matches exact enumeration."""
    exact = exact_grad(functools.partial(inner_plate_elbo_exact, MIX, Y), tuple(INNER.values()))
    no_score = exact_grad(
        functools.partial(inner_plate_elbo_exact, MIX, Y, score=False), tuple(INNER.values())
    )
    params = [torch.full((R,), v, requires_grad=True) for v in INNER.values()]
    model, guide = inner_plate_programs(layout, *Y.shape, *params)
    objective = batchplate.Trace_ELBO(num_particles=K, vectorize_particles=True)
    data = Y.repeat(R, 1)
    replicates = []
    for _ in range(calls):
        loss = objective.differentiable_loss(model, guide, data)
        replicates.append(-R * torch.stack(torch.autograd.grad(loss, params), -1))
    mean, se = mc(torch.cat(replicates))
    assert_matches(mean, se, exact, f"inner/{layout}")
    assert ((exact - no_score).abs() / se)[2:].min() > 8  # every guide parameter
