"""Reparameterized gradients and the ELBO's per-datum gradient scale, against exact values.

Contract page (docs/contract.md), "Gradients". Ground truth never comes from
batchplate: it is a closed form for the conjugate Gaussian (the expected ELBO
gradient, ``oracles.expected_elbo_grad``), or the gradient of a hand-written
formula for ``l[k, b]`` when the guide's noise is fixed (a reparameterized guide
that is deterministic given its noise: ``oracles.fixed_noise_elbo_grad``,
``oracles.fixed_noise_log_weights``).

Monte Carlo means are compared within 4 standard errors, and every statistical
test also asserts that its standard error is small enough for the comparison to
have power. Replicates of a vectorized batch plate are ``R`` copies of the
``B``-datum problem in one minibatch, each with its own parameter entries (see
``test_gradients_score.py``).
"""

from __future__ import annotations

import functools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import batchplate
from batchplate import batch_plate
from oracles import (
    F64,
    assert_matches,
    bound,
    conjugate_log_evidence,
    evidence_grad_prior_mean,
    expected_elbo_grad,
    fixed_noise_elbo_grad,
    fixed_noise_log_weights,
    mc,
    pop_param_grads,
    report,
)
from programs import Conjugate, fixed_noise_guide

# ---------------------------------------------------------------------------
# 1. ELBO gradient scale (Pyro issue #2220, problem 2)
# ---------------------------------------------------------------------------

CONJ = Conjugate()  # w ~ N(8.5, 1), x | w ~ N(w, 0.75)


@pytest.mark.parametrize("layout", ["vectorized", "sequential"])
def test_elbo_gradient_scale_fixed_noise(layout):
    """Exact (fixed noise): batch mean = one datum's gradient; Pyro's plate gives B times."""
    LOC, LOG_SCALE, B, N = 9.0, -0.3, 4, 12

    def grad(objective, x, eps, plate=batch_plate, **plate_kwargs):
        loc = torch.tensor(LOC, requires_grad=True)
        log_scale = torch.tensor(LOG_SCALE, requires_grad=True)
        model = CONJ.model(layout, plate=plate, **plate_kwargs)
        guide = fixed_noise_guide(
            layout, lambda xb: loc, lambda: log_scale, eps, plate=plate, **plate_kwargs
        )
        loss = objective.differentiable_loss(model, guide, x)
        return -torch.stack(torch.autograd.grad(loss, (loc, log_scale))).double()

    mean = batchplate.Trace_ELBO()
    total = batchplate.Trace_ELBO(reduction="sum")
    stock = pyro.infer.Trace_ELBO()

    # B identical data with identical noise: exactly one datum's gradient.
    x0, e0 = 9.6, 0.4
    one = fixed_noise_elbo_grad(CONJ, x0, e0, LOC, LOG_SCALE)
    same_x, same_e = torch.full((B,), x0), torch.full((B,), e0)
    assert torch.allclose(grad(mean, x0 * torch.ones(1), torch.tensor([e0])), one, rtol=1e-5)
    assert torch.allclose(grad(mean, same_x, same_e), one, rtol=1e-5)
    assert torch.allclose(grad(total, same_x, same_e), B * one, rtol=1e-5)
    assert torch.allclose(grad(stock, same_x, same_e, plate=pyro.plate), B * one, rtol=1e-5)

    # Distinct data and noise: the mean (sum) of per-datum gradients.
    x = CONJ.data(B, seed=1)
    eps = torch.tensor([0.4, -1.2, 0.7, 2.0])
    pairs = zip(x, eps, strict=True)
    per_datum = torch.stack([fixed_noise_elbo_grad(CONJ, xb, e, LOC, LOG_SCALE) for xb, e in pairs])
    assert torch.allclose(grad(mean, x, eps), per_datum.mean(0), rtol=1e-5)
    assert torch.allclose(grad(total, x, eps), per_datum.sum(0), rtol=1e-5)
    assert torch.allclose(grad(stock, x, eps, plate=pyro.plate), per_datum.sum(0), rtol=1e-5)

    # Subsampling B of N identical data: mean unchanged, sum (and Pyro) N/B * sum_b.
    full = torch.full((N,), x0)
    sub = {"subsample_size": B}
    assert torch.allclose(grad(mean, full, same_e, **sub), one, rtol=1e-5)
    assert torch.allclose(grad(total, full, same_e, **sub), N * one, rtol=1e-5)
    stock_sub = grad(stock, full, same_e, plate=pyro.plate, **sub)
    assert torch.allclose(stock_sub, N * one, rtol=1e-5)


@pytest.mark.parametrize("layout", ["vectorized", "sequential"])
def test_elbo_expected_gradient_scale(layout):
    """Monte Carlo, real Normal guide: the mean reduction's expected gradient is one
    datum's closed form; Pyro's plate and ``reduction="sum"`` give B (N) times it."""
    LOC, LOG_SCALE, x0 = 9.0, -0.3, 10.5
    B, N, calls = (200, 800, 40) if layout == "vectorized" else (10, 40, 60)
    exact = expected_elbo_grad(CONJ, x0, LOC, LOG_SCALE)

    def guide(x, plate, **plate_kwargs):
        loc = pyro.param("loc", torch.tensor(LOC))
        scale = pyro.param("log_scale", torch.tensor(LOG_SCALE)).exp()
        if layout == "vectorized":
            with plate("data", len(x), **plate_kwargs):
                pyro.sample("w", dist.Normal(loc, scale))
        else:
            for i in plate("data", len(x), **plate_kwargs):
                pyro.sample(f"w_{i}", dist.Normal(loc, scale))

    def run_mc(objective, plate, **plate_kwargs):
        x = torch.full((N if plate_kwargs else B,), x0)
        model = CONJ.model(layout, plate=plate, **plate_kwargs)
        bound_guide = functools.partial(guide, plate=plate, **plate_kwargs)
        replicates = []
        for _ in range(calls):
            objective.loss_and_grads(model, bound_guide, x)
            replicates.append(-pop_param_grads(("loc", "log_scale")))
        return mc(torch.stack(replicates))

    cases = [
        (batchplate.Trace_ELBO(), batch_plate, {}, 1),
        (batchplate.Trace_ELBO(reduction="sum"), batch_plate, {}, B),
        (pyro.infer.Trace_ELBO(), pyro.plate, {}, B),
        (batchplate.Trace_ELBO(), batch_plate, {"subsample_size": B}, 1),
        (batchplate.Trace_ELBO(reduction="sum"), batch_plate, {"subsample_size": B}, N),
        (pyro.infer.Trace_ELBO(), pyro.plate, {"subsample_size": B}, N),
    ]
    for objective, plate, plate_kwargs, factor in cases:
        mean, se = run_mc(objective, plate, **plate_kwargs)
        label = f"{type(objective).__module__} {plate_kwargs} x{factor}"
        assert_matches(mean, se, factor * exact, label)
        if factor != 1:  # the other scale is far away
            assert ((mean - exact).abs() / se).max() > 8


# ---------------------------------------------------------------------------
# 2. Reparameterized IWAE / Rényi gradients
# ---------------------------------------------------------------------------

IW_PARAMS = (0.5, 4.0, -0.2)  # (a, c, log_scale) of a guide N(a x + c, scale), not exact


@pytest.mark.parametrize("layout", ["vectorized", "sequential"])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_reparameterized_renyi_gradient_per_datum(layout, alpha):
    """With fixed noise, the surrogate gradient equals the gradient of
    ``mean_b L_b(l[:, b])``, ``l`` written by hand (value too)."""
    B, Kp = 3, 4
    x = CONJ.data(B, seed=2)
    eps = torch.randn(Kp, B, generator=torch.Generator().manual_seed(3))

    def expected(joint):
        params = [torch.tensor(v, dtype=F64, requires_grad=True) for v in IW_PARAMS]
        l = fixed_noise_log_weights(CONJ, x.double(), eps.double(), *params)  # [K, B]
        if joint:
            value = bound(l.sum(-1), alpha)
        else:
            value = bound(l.T, alpha).mean()
        return value.detach(), torch.stack(torch.autograd.grad(value, params))

    names = ("a", "c", "log_scale")

    def run(objective, plate=batch_plate):
        for name, v in zip(names, IW_PARAMS, strict=True):
            pyro.param(name, torch.tensor(v))
        model = CONJ.model(layout, plate=plate)
        guide = fixed_noise_guide(
            layout,
            lambda xb: pyro.param("a") * xb + pyro.param("c"),
            lambda: pyro.param("log_scale"),
            eps,
            plate=plate,
        )
        value = -objective.loss_and_grads(model, guide, x)
        return torch.tensor(value, dtype=F64), -pop_param_grads(names).double()

    vectorize = layout == "vectorized"
    kw = dict(num_particles=Kp, vectorize_particles=vectorize, max_plate_nesting=int(vectorize))
    value, grad = run(batchplate.RenyiELBO(alpha=alpha, **kw))
    exact_value, exact_grad = expected(joint=False)
    assert torch.allclose(value, exact_value, rtol=1e-5)
    assert torch.allclose(grad, exact_grad, rtol=1e-4, atol=1e-5)
    _, sum_grad = run(batchplate.RenyiELBO(alpha=alpha, reduction="sum", **kw))
    assert torch.allclose(sum_grad, B * exact_grad, rtol=1e-4, atol=1e-5)
    if alpha == 0:  # VIMCO's reparameterized gradient is IWAE's
        _, vimco_grad = run(batchplate.VIMCO(**kw))
        assert torch.allclose(vimco_grad, exact_grad, rtol=1e-4, atol=1e-5)

    # Stock Pyro: with both plate and particles vectorized it keeps the batch dim
    # (per-datum weights) but sums over it, B times the gradient; with a
    # sequential plate it sums the batch into one weight before the logsumexp.
    _, stock_grad = run(pyro.infer.RenyiELBO(alpha=alpha, **kw), plate=pyro.plate)
    _, joint_grad = expected(joint=True)
    stock_expected = B * exact_grad if vectorize else joint_grad
    assert torch.allclose(stock_grad, stock_expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(joint_grad, B * exact_grad, rtol=1e-2)


def test_iwae_gradient_at_exact_posterior():
    """Guide = exact amortized posterior ``N(a (x - m) + c, r)`` (``c = m``): the
    weights are constant, the IWAE value is ``log p(x_b)`` exactly, the expected
    guide gradient is zero, and the expected gradient for the prior mean ``m`` is
    ``mean_b (x_b - m) / (s^2 + t^2)``."""
    B, R, Kp = 3, 20000, 4
    m, s, t = CONJ.m, CONJ.s, CONJ.t
    a = s**2 / (s**2 + t**2)
    log_r = math.log(s * t / math.sqrt(s**2 + t**2))
    x = CONJ.data(B, seed=4)

    params = [torch.full((R,), v, requires_grad=True) for v in (m, a, m, log_r)]

    def model(x):
        with batch_plate("data", len(x)):
            w = pyro.sample("w", dist.Normal(params[0].repeat_interleave(B), s))
            pyro.sample("x", dist.Normal(w, t), obs=x)

    def guide(x):
        pa, pc, plog_r = (p.repeat_interleave(B) for p in params[1:])
        with batch_plate("data", len(x)):
            pyro.sample("w", dist.Normal(pa * (x - m) + pc, plog_r.exp()))

    objective = batchplate.RenyiELBO(alpha=0, num_particles=Kp, vectorize_particles=True)
    loss = objective.differentiable_loss(model, guide, x.repeat(R))
    grads = -R * torch.stack(torch.autograd.grad(loss, params), -1)  # [R, 4]

    log_px = conjugate_log_evidence(CONJ, x.double())
    assert torch.allclose(-loss.double(), log_px.mean(), rtol=1e-5)
    exact = torch.tensor([evidence_grad_prior_mean(CONJ, x), 0.0, 0.0, 0.0])
    mean, se = mc(grads)
    z = (mean - exact) / se
    report("exact posterior", exact=exact, mc=mean, se=se, z=z)
    assert (z.abs() <= 4).all(), f"exact {exact}, MC {mean} +- {se}"
    assert (se < 0.01).all()  # an expected gradient of 0.05 would be caught
