"""Gradient estimators against exact gradients (design.md, "Gradients").

Ground truth never comes from batchplate: it is either

- the exact expected gradient of a small discrete model, where the expectation
  of an objective over all ``K``-tuples of latent values per datum is a finite
  sum, written as a differentiable function of the parameters and
  differentiated with autograd (in float64); or
- a closed form for the conjugate Gaussian (expected ELBO gradient), or the
  gradient of a hand-written formula for ``l[k, b]`` when the guide's noise is
  fixed (a reparameterized guide that is deterministic given its noise).

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
import itertools
import math
import os

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

import batchplate
from batchplate import batch_plate
from programs import Conjugate

F64 = torch.float64


def _tuples(length: int) -> torch.Tensor:
    """All binary tuples of the given length, ``[2**length, length]`` (float64)."""
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=length)), dtype=F64)


def _bound(log_w: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-datum objective from ``l`` with particles in the last dim (alpha=1: ELBO)."""
    K = log_w.shape[-1]
    if alpha == 1:
        return log_w.mean(-1)
    a = 1.0 - alpha
    return (torch.logsumexp(a * log_w, -1) - math.log(K)) / a


def _exact_grad(fn, values) -> torch.Tensor:
    params = [torch.tensor(v, dtype=F64, requires_grad=True) for v in values]
    return torch.stack(torch.autograd.grad(fn(*params), params))


def _mc(grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error over replicates (rows)."""
    grads = grads.double()
    return grads.mean(0), grads.std(0) / math.sqrt(grads.shape[0])


def _report(label, **values):
    """Print the numbers behind a comparison when GRAD_REPORT is set (run with -s)."""
    if os.environ.get("GRAD_REPORT"):
        print(f"\n{label}:", *(f"{k} {v.numpy().round(4)}" for k, v in values.items()))


def _assert_matches(mean, se, exact, label, *, max_rel_se=0.1):
    """MC mean within 4 s.e. of the exact value, and an s.e. small enough to matter."""
    scale = exact.abs().max()
    assert (se <= max_rel_se * scale).all(), f"{label}: s.e. {se} too large for {exact}"
    z = (mean - exact) / se
    _report(label, exact=exact, mc=mean, se=se, z=z)
    assert (z.abs() <= 4).all(), f"{label}: exact {exact}, MC {mean} +- {se} (z = {z})"


# ---------------------------------------------------------------------------
# 1. Score-function gradients on a discrete model
# ---------------------------------------------------------------------------
#
# z_b ~ Bernoulli(logits=theta), x_b | z_b ~ N(MU[z_b], SIGMA); guide
# q(z_b | x_b) = Bernoulli(logits=a * x_b + c). The guide is far from the
# posterior, so all three gradients are clearly non-zero.

MU0, MU1, SIGMA = -1.0, 1.5, 1.0
X = torch.tensor([-0.8, 0.6, 2.0])
THETA, A, C = 2.0, 0.0, -2.0
K = 3


def _mixture_loc(z):
    return MU0 + (MU1 - MU0) * z


def mixture_exact(theta, a, c, x, K, alpha, score=True, scale=1.0):
    """``mean_b E[L_b]`` over all ``K``-tuples of ``z_b``, as a function of the parameters.

    With ``score=False`` the tuple probabilities are detached: its gradient is
    then the expectation of an estimator that drops the score-function term.
    ``scale`` is a user ``poutine.scale`` on every site of a datum: it scales the
    log weights ``l``, not the distribution the particles are drawn from.
    """
    z = _tuples(K)
    total = 0.0
    for xb in x.to(F64):
        log_q = dist.Bernoulli(logits=a * xb + c).log_prob(z)
        log_p = dist.Bernoulli(logits=theta).log_prob(z)
        log_p = log_p + dist.Normal(_mixture_loc(z), SIGMA).log_prob(xb)
        prob = log_q.sum(-1).exp()
        if not score:
            prob = prob.detach()
        total = total + (prob * _bound(scale * (log_p - log_q), alpha)).sum()
    return total / len(x)


def mixture_programs(layout, theta, a, c, scale=1.0):
    """Model and guide for ``R = len(theta)`` copies of the ``B``-datum problem."""
    B = len(X)
    if layout == "vectorized":

        def model(x):
            with batch_plate("data", len(x)), poutine.scale(scale=scale):
                z = pyro.sample("z", dist.Bernoulli(logits=theta.repeat_interleave(B)))
                pyro.sample("x", dist.Normal(_mixture_loc(z), SIGMA), obs=x)

        def guide(x):
            with batch_plate("data", len(x)), poutine.scale(scale=scale):
                logits = a.repeat_interleave(B) * x + c.repeat_interleave(B)
                pyro.sample("z", dist.Bernoulli(logits=logits))

    else:

        def model(x):
            for i in batch_plate("data", len(x)):
                with poutine.scale(scale=scale):
                    z = pyro.sample(f"z_{i}", dist.Bernoulli(logits=theta[i // B]))
                    pyro.sample(f"x_{i}", dist.Normal(_mixture_loc(z), SIGMA), obs=x[i])

        def guide(x):
            for i in batch_plate("data", len(x)):
                with poutine.scale(scale=scale):
                    logits = a[i // B] * x[i] + c[i // B]
                    pyro.sample(f"z_{i}", dist.Bernoulli(logits=logits))

    return model, guide


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
    model, guide = mixture_programs(layout, *params, scale=scale)
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
    exact = _exact_grad(lambda *p: mixture_exact(*p, X, K, alpha), (THETA, A, C))
    no_score = _exact_grad(lambda *p: mixture_exact(*p, X, K, alpha, score=False), (THETA, A, C))

    mean, se = _mc(mixture_mc_grads(make(vectorize_particles=vectorize), layout, R, calls))

    _assert_matches(mean, se, exact, f"{name}/{layout}")
    # Power: the estimator without its score-function term is far off.
    assert ((exact - no_score).abs() / se)[1:].max() > 8


@pytest.mark.parametrize("layout", ["vectorized", "sequential"])
@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_score_function_gradient_with_user_scale(name, layout):
    """A user ``poutine.scale(2)`` on a datum's sites scales its log weights
    (design.md: user scales keep their meaning) but not the guide the particles
    are drawn from, so the score function is that of the unscaled ``log q``
    (Pyro's convention: ``ScoreParts.scale_and_mask`` leaves it unscaled)."""
    scale = 2.0
    alpha, make = OBJECTIVES[name]
    vectorize, R, calls = REPLICATION[layout]
    calls = min(calls, 400)
    exact = _exact_grad(lambda *p: mixture_exact(*p, X, K, alpha, scale=scale), (THETA, A, C))
    grads = mixture_mc_grads(make(vectorize_particles=vectorize), layout, R, calls, scale=scale)
    mean, se = _mc(grads)
    _assert_matches(mean, se, exact, f"{name}/{layout}/scale={scale}", max_rel_se=0.15)


# ---------------------------------------------------------------------------
# 2. Stock Pyro's RenyiELBO(alpha=0) gives a discrete guide zero gradient
# ---------------------------------------------------------------------------

X0, THETA0, PHI0 = -2.0, -1.0, 1.0


def one_site_model(x, plate=batch_plate):
    theta = pyro.param("prior_logit", torch.tensor(THETA0))
    with plate("data", len(x)):
        z = pyro.sample("z", dist.Bernoulli(logits=theta))
        pyro.sample("x", dist.Normal(_mixture_loc(z), SIGMA), obs=x)


def one_site_guide(x, plate=batch_plate):
    phi = pyro.param("guide_logit", torch.tensor(PHI0))
    with plate("data", len(x)):
        pyro.sample("z", dist.Bernoulli(logits=phi))


def _param_grads(names):
    grads = []
    for name in names:
        leaf = pyro.param(name).unconstrained()
        grads.append(torch.zeros(()) if leaf.grad is None else leaf.grad.clone())
        leaf.grad = None
    return torch.stack(grads)


@pytest.mark.parametrize("vectorize", [True, False])
def test_stock_renyi_alpha0_zero_guide_gradient(vectorize):
    x = torch.tensor([X0])
    exact = _exact_grad(
        lambda theta, phi: mixture_exact(theta, torch.zeros((), dtype=F64), phi, x, K, 0.0),
        (THETA0, PHI0),
    )
    assert exact[1].abs() > 0.5  # clearly non-zero: the guide should move

    names = ("prior_logit", "guide_logit")
    stock = pyro.infer.RenyiELBO(
        alpha=0, num_particles=K, vectorize_particles=vectorize, max_plate_nesting=1
    )
    for _ in range(20):
        stock.loss_and_grads(one_site_model, one_site_guide, x, plate=pyro.plate)
        grads = _param_grads(names)
        assert grads[0] != 0  # gradients were computed...
        assert grads[1] == 0  # ...but the guide gets exactly none

    objective = batchplate.RenyiELBO(alpha=0, num_particles=K, vectorize_particles=vectorize)
    replicates = []
    for _ in range(2500):
        objective.loss_and_grads(one_site_model, one_site_guide, x)
        replicates.append(-_param_grads(names))
    mean, se = _mc(torch.stack(replicates))
    _assert_matches(mean, se, exact, "batchplate one-site")
    assert mean[1].abs() > 8 * se[1]  # and it is not zero


# ---------------------------------------------------------------------------
# 3. ELBO gradient scale (seed Problem 2)
# ---------------------------------------------------------------------------

CONJ = Conjugate()  # w ~ N(8.5, 1), x | w ~ N(w, 0.75)


def _conj_log_joint(w, x):
    return dist.Normal(CONJ.m, CONJ.s).log_prob(w) + dist.Normal(w, CONJ.t).log_prob(x)


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


def conj_elbo_grad(x, eps, loc, log_scale):
    """Per-datum gradient of ``l`` wrt ``(loc, log_scale)`` at noise ``eps`` (by hand)."""
    x, eps = torch.as_tensor(x, dtype=F64), torch.as_tensor(eps, dtype=F64)
    scale = math.exp(log_scale)
    w = loc + scale * eps
    dl_dw = -(w - CONJ.m) / CONJ.s**2 + (x - w) / CONJ.t**2
    # -log N(w; loc, scale) = log scale + eps**2 / 2 + const at fixed eps.
    return torch.stack([dl_dw, scale * (eps * dl_dw) + 1.0])


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
    one = conj_elbo_grad(x0, e0, LOC, LOG_SCALE)
    same_x, same_e = torch.full((B,), x0), torch.full((B,), e0)
    assert torch.allclose(grad(mean, x0 * torch.ones(1), torch.tensor([e0])), one, rtol=1e-5)
    assert torch.allclose(grad(mean, same_x, same_e), one, rtol=1e-5)
    assert torch.allclose(grad(total, same_x, same_e), B * one, rtol=1e-5)
    assert torch.allclose(grad(stock, same_x, same_e, plate=pyro.plate), B * one, rtol=1e-5)

    # Distinct data and noise: the mean (sum) of per-datum gradients.
    x = CONJ.data(B, seed=1)
    eps = torch.tensor([0.4, -1.2, 0.7, 2.0])
    pairs = zip(x, eps, strict=True)
    per_datum = torch.stack([conj_elbo_grad(xb, e, LOC, LOG_SCALE) for xb, e in pairs])
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


def conj_expected_elbo_grad(x, loc, log_scale):
    """Closed-form gradient of ``E_q[l]`` for ``q = N(loc, exp(log_scale))``:
    ``E[l] = -((loc-m)^2 + r^2)/(2 s^2) - ((x-loc)^2 + r^2)/(2 t^2) + log r + const``."""
    r2 = math.exp(2 * log_scale)
    d_loc = -(loc - CONJ.m) / CONJ.s**2 + (x - loc) / CONJ.t**2
    d_log_scale = 1.0 - r2 * (1 / CONJ.s**2 + 1 / CONJ.t**2)
    return torch.tensor([d_loc, d_log_scale], dtype=F64)


@pytest.mark.parametrize("layout", ["vectorized", "sequential"])
def test_elbo_expected_gradient_scale(layout):
    """Monte Carlo, real Normal guide: the mean reduction's expected gradient is one
    datum's closed form; Pyro's plate and ``reduction="sum"`` give B (N) times it."""
    LOC, LOG_SCALE, x0 = 9.0, -0.3, 10.5
    B, N, calls = (200, 800, 40) if layout == "vectorized" else (10, 40, 60)
    exact = conj_expected_elbo_grad(x0, LOC, LOG_SCALE)

    def guide(x, plate, **plate_kwargs):
        loc = pyro.param("loc", torch.tensor(LOC))
        scale = pyro.param("log_scale", torch.tensor(LOG_SCALE)).exp()
        if layout == "vectorized":
            with plate("data", len(x), **plate_kwargs):
                pyro.sample("w", dist.Normal(loc, scale))
        else:
            for i in plate("data", len(x), **plate_kwargs):
                pyro.sample(f"w_{i}", dist.Normal(loc, scale))

    def mc(objective, plate, **plate_kwargs):
        x = torch.full((N if plate_kwargs else B,), x0)
        model = CONJ.model(layout, plate=plate, **plate_kwargs)
        bound_guide = functools.partial(guide, plate=plate, **plate_kwargs)
        replicates = []
        for _ in range(calls):
            objective.loss_and_grads(model, bound_guide, x)
            replicates.append(-_param_grads(("loc", "log_scale")))
        return _mc(torch.stack(replicates))

    cases = [
        (batchplate.Trace_ELBO(), batch_plate, {}, 1),
        (batchplate.Trace_ELBO(reduction="sum"), batch_plate, {}, B),
        (pyro.infer.Trace_ELBO(), pyro.plate, {}, B),
        (batchplate.Trace_ELBO(), batch_plate, {"subsample_size": B}, 1),
        (batchplate.Trace_ELBO(reduction="sum"), batch_plate, {"subsample_size": B}, N),
        (pyro.infer.Trace_ELBO(), pyro.plate, {"subsample_size": B}, N),
    ]
    for objective, plate, plate_kwargs, factor in cases:
        mean, se = mc(objective, plate, **plate_kwargs)
        label = f"{type(objective).__module__} {plate_kwargs} x{factor}"
        _assert_matches(mean, se, factor * exact, label)
        if factor != 1:  # the other scale is far away
            assert ((mean - exact).abs() / se).max() > 8


# ---------------------------------------------------------------------------
# 4. Reparameterized IWAE / Rényi gradients
# ---------------------------------------------------------------------------

IW_PARAMS = (0.5, 4.0, -0.2)  # (a, c, log_scale) of a guide N(a x + c, scale), not exact


def conj_log_weights(x, eps, a, c, log_scale):
    """``l[k, b]`` by hand for the fixed-noise guide, as a function of its parameters."""
    loc = a * x + c
    scale = log_scale.exp()
    w = loc + scale * eps
    return _conj_log_joint(w, x) - dist.Normal(loc, scale).log_prob(w)


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
        l = conj_log_weights(x.double(), eps.double(), *params)  # [K, B]
        if joint:
            value = _bound(l.sum(-1), alpha)
        else:
            value = _bound(l.T, alpha).mean()
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
        return torch.tensor(value, dtype=F64), -_param_grads(names).double()

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

    log_px = dist.Normal(m, math.sqrt(s**2 + t**2)).log_prob(x.double())
    assert torch.allclose(-loss.double(), log_px.mean(), rtol=1e-5)
    exact = torch.tensor([((x.double() - m) / (s**2 + t**2)).mean(), 0.0, 0.0, 0.0])
    mean, se = _mc(grads)
    z = (mean - exact) / se
    _report("exact posterior", exact=exact, mc=mean, se=se, z=z)
    assert (z.abs() <= 4).all(), f"exact {exact}, MC {mean} +- {se}"
    assert (se < 0.01).all()  # an expected gradient of 0.05 would be caught


# ---------------------------------------------------------------------------
# 5. Trace_ELBO's Rao-Blackwellized score term with an inner plate
# ---------------------------------------------------------------------------
#
# Datum b: u_b ~ Bernoulli(eta); for each of n items z_bj ~ Bernoulli(theta),
# y_bj ~ N(MU[z_bj] + DELTA * u_b, SIGMA). Guide: u_b ~ Bernoulli(g),
# z_bj ~ Bernoulli(a y_bj + c + d u_b), the z_bj in an inner pyro.plate.

Y = torch.tensor([[-1.0, 0.5, 2.0], [1.5, 2.5, -0.5]])
DELTA = 1.0
INNER = {"eta": 0.5, "theta": 1.0, "g": -0.5, "a": 0.5, "c": -1.0, "d": 1.0}


def inner_exact(eta, theta, g, a, c, d, score=True):
    """``mean_b E_q[l_b]`` over all ``2**(1+n)`` values of ``(u_b, z_b1..z_bn)``
    (``score=False``: probabilities detached, as in ``mixture_exact``)."""
    n = Y.shape[1]
    config = _tuples(1 + n)
    u, z = config[:, :1], config[:, 1:]
    total = 0.0
    for yb in Y.to(F64):
        log_q = dist.Bernoulli(logits=g).log_prob(u).sum(-1)
        log_q = log_q + dist.Bernoulli(logits=a * yb + c + d * u).log_prob(z).sum(-1)
        log_p = dist.Bernoulli(logits=eta).log_prob(u).sum(-1)
        log_p = log_p + dist.Bernoulli(logits=theta).log_prob(z).sum(-1)
        log_p = log_p + dist.Normal(_mixture_loc(z) + DELTA * u, SIGMA).log_prob(yb).sum(-1)
        prob = log_q.exp() if score else log_q.exp().detach()
        total = total + (prob * (log_p - log_q)).sum()
    return total / len(Y)


def inner_programs(layout, eta, theta, g, a, c, d):
    B, n = Y.shape
    if layout == "vectorized":
        rep = [p.repeat_interleave(B) for p in (eta, theta, g, a, c, d)]
        eta_, theta_, g_, a_, c_, d_ = rep

        def model(y):
            with batch_plate("data", len(y)):
                u = pyro.sample("u", dist.Bernoulli(logits=eta_))
                with pyro.plate("items", n, dim=-2):
                    z = pyro.sample("z", dist.Bernoulli(logits=theta_))
                    loc = _mixture_loc(z) + DELTA * u
                    pyro.sample("y", dist.Normal(loc, SIGMA), obs=y.T)

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
                    loc = _mixture_loc(z) + DELTA * u
                    pyro.sample(f"y_{i}", dist.Normal(loc, SIGMA), obs=y[i])

        def guide(y):
            for i in batch_plate("data", len(y)):
                r = i // B
                u = pyro.sample(f"u_{i}", dist.Bernoulli(logits=g[r]))
                with pyro.plate(f"items_{i}", n):
                    logits = a[r] * y[i] + c[r] + d[r] * u
                    pyro.sample(f"z_{i}", dist.Bernoulli(logits=logits))

    return model, guide


@pytest.mark.parametrize("layout, R, calls", [("vectorized", 20000, 1), ("sequential", 1, 1000)])
def test_elbo_rao_blackwellized_inner_plate(layout, R, calls):
    """Vectorized particles, K = 3 (leave-one-out baseline active): the MC mean of
    the gradient wrt all model and guide parameters matches exact enumeration."""
    exact = _exact_grad(inner_exact, tuple(INNER.values()))
    no_score = _exact_grad(functools.partial(inner_exact, score=False), tuple(INNER.values()))
    params = [torch.full((R,), v, requires_grad=True) for v in INNER.values()]
    model, guide = inner_programs(layout, *params)
    objective = batchplate.Trace_ELBO(num_particles=K, vectorize_particles=True)
    data = Y.repeat(R, 1)
    replicates = []
    for _ in range(calls):
        loss = objective.differentiable_loss(model, guide, data)
        replicates.append(-R * torch.stack(torch.autograd.grad(loss, params), -1))
    mean, se = _mc(torch.cat(replicates))
    _assert_matches(mean, se, exact, f"inner/{layout}")
    assert ((exact - no_score).abs() / se)[2:].min() > 8  # every guide parameter
