"""STL, DReG (IWAE, Rényi, RWS), defensive wake-phi and tail-adaptive estimators.

Estimators page (docs/estimators.md). Ground truth never comes from batchplate:

- per draw: the guide records its draws, and the estimator's gradient is
  recomputed by hand from the conjugate model's log weight
  (`oracles.conjugate_log_weights`) at those draws, in every layout;
- exactness: at the exact posterior `l[k, b] = log p(x_b)` for every draw, so the
  sample-path estimators' guide gradients are zero draw by draw;
- unbiasedness: Monte Carlo means over independent per-datum replicates (a guide
  with its own parameters per datum), within 4 standard errors of an exact value
  or of the standard estimator's mean;
- defensive wake-phi: the exact expectation over every `K`-tuple of a binary
  latent drawn from the mixture.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

import batchplate
from batchplate import batch_plate
from oracles import F64, assert_matches, conjugate_log_weights, expected_elbo_grad, mc, tuples
from programs import MIX, Conjugate, mixture_programs

CONJ = Conjugate()
A, C, R = 0.64, 3.06, 0.6  # the exact posterior N(a x + c, r) of the scale model


def per_datum_programs(
    layout, N, B=None, shift=0.0, widen=1.0, scale=1.0, mask=None, rec=None, coin=False
):
    """The scale model; the guide `N(loc_n, exp(log_scale_n))` has its own parameters per
    datum `n` (exact posterior at `shift=0, widen=1`) and records `(indices, draws)`.
    `coin=True` (vectorized layout) adds a Bernoulli(0.3) site to both, which leaves
    `l` unchanged but makes the guide non-reparameterized in part."""
    rec = [] if rec is None else rec
    kw = {} if B is None else {"subsample_size": B}

    def params(x):
        loc = pyro.param("loc", lambda: A * x + C + shift)
        log_scale = pyro.param("log_scale", lambda: torch.full_like(x, math.log(R * widen)))
        return loc, log_scale

    def obs(site, w, xb, keep):
        with poutine.scale(scale=scale), poutine.mask(mask=keep):
            pyro.sample(site, dist.Normal(w, CONJ.t), obs=xb)

    def model(x):
        if layout == "vectorized":
            with batch_plate("data", N, **kw) as idx:
                w = pyro.sample("w", dist.Normal(CONJ.m, CONJ.s))
                if coin:
                    pyro.sample("coin", dist.Bernoulli(0.3))
                obs("x", w, x[idx], True if mask is None else mask[idx])
        else:
            for i in batch_plate("data", N, **kw):
                w = pyro.sample(f"w_{i}", dist.Normal(CONJ.m, CONJ.s))
                obs(f"x_{i}", w, x[i], True if mask is None else bool(mask[i]))

    def guide(x):
        loc, log_scale = params(x)
        if layout == "vectorized":
            with batch_plate("data", N, **kw) as idx:
                w = pyro.sample("w", dist.Normal(loc[idx], log_scale[idx].exp()))
                if coin:
                    pyro.sample("coin", dist.Bernoulli(0.3))
                rec.append((idx, w))
        else:
            for i in batch_plate("data", N, **kw):
                w = pyro.sample(f"w_{i}", dist.Normal(loc[i], log_scale[i].exp()))
                rec.append((torch.tensor([i]), w.reshape(-1, 1)))

    return model, guide, rec


def recorded(rec, B):
    """The recorded draws as `(indices [B], w [K, B])`."""
    if len(rec[0][0]) == B:  # vectorized plate: one record per trace
        return rec[0][0], torch.cat([w.reshape(-1, B) for _, w in rec]).detach()
    cols = [rec[j::B] for j in range(B)]  # sequential: one record per datum and trace
    idx = torch.cat([col[0][0] for col in cols])
    return idx, torch.cat([torch.cat([w for _, w in col]) for col in cols], 1).detach()


def hand_grads(x, idx, w, coef, scale=1.0, mask=None):
    """`-(sum_k c[k, b] dl/dz dz/dphi)` per datum for `(loc, log_scale)` at the draws
    `w`, with `dl/dz` by autograd on the hand-written log weight at fixed parameters
    and `c = coef(l)`; `dz/dloc = 1`, `dz/dlog_scale = z - loc`."""
    loc, log_scale = pyro.param("loc").detach()[idx], pyro.param("log_scale").detach()[idx]
    z = w.clone().requires_grad_()
    q = dist.Normal(loc, log_scale.exp())
    m = None if mask is None else mask[idx].to(w.dtype)
    log_w = conjugate_log_weights(CONJ, z, x[idx], q, scale=scale, mask=m)
    (dl_dz,) = torch.autograd.grad(log_w.sum(), z)
    c = coef(log_w.detach())
    return -(c * dl_dz).sum(0), -(c * dl_dz * (w - loc)).sum(0)


def guide_grads():
    grads = [pyro.param(n).unconstrained().grad for n in ("loc", "log_scale")]
    return [torch.zeros(1) if g is None else g for g in grads]


def softmax(l):
    return torch.softmax(l, 0)


COEFS = {  # the sample-path weight c[k, b] of each estimator
    "stl": lambda l: torch.full_like(l, 1 / l.shape[0]),
    "iwae-dreg": lambda l: softmax(l) ** 2,
    "renyi-dreg": lambda l: 0.5 * softmax(0.5 * l) + 0.5 * softmax(0.5 * l) ** 2,
    "rws-dreg": lambda l: softmax(l) - softmax(l) ** 2,
}


def objective(name, K, vectorize, reduction="mean"):
    # max_plate_nesting given: no extra guide run to guess it (the guide records its draws)
    kw = dict(num_particles=K, vectorize_particles=vectorize, reduction=reduction)
    kw["max_plate_nesting"] = 1
    if name == "stl":
        return batchplate.Trace_ELBO(estimator="stl", **kw)
    if name in ("iwae-dreg", "iwae"):
        return batchplate.RenyiELBO(alpha=0, estimator=name[5:] or "standard", **kw)
    if name == "renyi-dreg":
        return batchplate.RenyiELBO(alpha=0.5, estimator="dreg", **kw)
    if name == "elbo":
        return batchplate.Trace_ELBO(**kw)
    return batchplate.ReweightedWakeSleep(estimator=name[4:] or "standard", **kw)


LAYOUTS = [("vectorized", True), ("vectorized", False), ("sequential", True), ("sequential", False)]


CASES = [(layout, vectorize, name, False) for layout, vectorize in LAYOUTS for name in COEFS]
CASES += [("vectorized", vectorize, "rws-dreg", True) for vectorize in (True, False)]


@pytest.mark.parametrize("layout,vectorize,name,coin", CASES)
def test_sample_path_gradient_matches_hand_formula_per_draw(layout, vectorize, name, coin):
    """Off the posterior, with subsampling, a user scale and a mask, `reduction="sum"`.
    `coin`: a guide with a discrete site too (RWS-DReG's other way to the density path)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    N, B, K = 6, 4, 3
    x = CONJ.data(N, seed=2).to(F64)
    mask = torch.tensor([True, False, True, True, False, True])
    options = dict(shift=0.4, widen=1.3, scale=2.0, mask=mask, coin=coin)
    model, guide, rec = per_datum_programs(layout, N, B, **options)
    obj = objective(name, K, vectorize, reduction="sum")
    rec.clear()
    obj.loss_and_grads(model, guide, x)
    idx, w = recorded(rec, B)
    want = hand_grads(x, idx, w, COEFS[name], scale=2.0, mask=mask)
    for got, exp in zip(guide_grads(), want, strict=True):
        assert torch.allclose(got[idx], exp * N / B, atol=1e-9), (got[idx], exp * N / B)


@pytest.mark.parametrize("layout,vectorize", LAYOUTS)
@pytest.mark.parametrize("name", ["stl", "iwae-dreg", "rws-dreg"])
def test_zero_guide_gradient_at_the_exact_posterior_for_every_draw(layout, vectorize, name):
    N, K = 5, 4
    x = CONJ.data(N, seed=3).to(F64)
    for seed in range(3):
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        model, guide, _ = per_datum_programs(layout, N)
        objective(name, K, vectorize).loss_and_grads(model, guide, x)
        assert max(g.abs().max() for g in guide_grads()) < 1e-12
        pyro.clear_param_store()  # the standard estimator's are not zero
        objective(name.split("-")[0].replace("stl", "elbo"), K, vectorize).loss_and_grads(
            model, guide, x
        )
        assert max(g.abs().max() for g in guide_grads()) > 1e-3


def test_model_parameter_gradients_are_the_standard_estimators():
    x = CONJ.data(5, seed=4).to(F64)

    def model(x):
        m = pyro.param("m", torch.tensor(8.0, dtype=F64))
        with batch_plate("data", len(x)):
            w = pyro.sample("w", dist.Normal(m, CONJ.s))
            pyro.sample("x", dist.Normal(w, CONJ.t), obs=x)

    _, guide, _ = per_datum_programs("vectorized", 5, shift=0.3)
    for est, std in [("dreg", "iwae"), ("stl", "elbo"), ("rws-dreg", "rws")]:
        grads = []
        for name in (est if est != "dreg" else "iwae-dreg", std):
            pyro.clear_param_store()
            pyro.set_rng_seed(5)
            objective(name, 4, True).loss_and_grads(model, guide, x)
            grads.append(pyro.param("m").unconstrained().grad.clone())
        assert torch.allclose(grads[0], grads[1], atol=1e-12)


def replicate_grads(name, N, K, shift, widen, seed):
    """Per-datum guide gradients `[N, 2]`: `N` iid replicates (one datum, its own
    parameters, `N` copies of the same observation)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    x = torch.full((N,), 10.0, dtype=F64)
    model, guide, _ = per_datum_programs("vectorized", N, shift=shift, widen=widen)
    objective(name, K, True).loss_and_grads(model, guide, x)
    return torch.stack([g * N for g in guide_grads()], -1)  # undo the batch mean


def assert_same_mean(a, b, label):
    (ma, sa), (mb, sb) = mc(a), mc(b)
    z = (ma - mb) / (sa**2 + sb**2).sqrt()
    assert (z.abs() <= 4).all(), f"{label}: {ma} +- {sa} vs {mb} +- {sb} (z = {z})"
    assert ((sa**2 + sb**2).sqrt() <= 0.1 * mb.abs().max()).all(), f"{label}: no power"


@pytest.mark.parametrize("new,old", [("iwae-dreg", "iwae"), ("rws-dreg", "rws")])
def test_dreg_is_unbiased_off_the_posterior(new, old):
    N, K = 20000, 4
    a = replicate_grads(new, N, K, shift=0.8, widen=1.6, seed=6)
    b = replicate_grads(old, N, K, shift=0.8, widen=1.6, seed=7)
    assert_same_mean(a, b, f"{new} vs {old}")


def test_stl_is_unbiased_against_the_closed_form():
    N, K, shift, widen = 20000, 2, 0.8, 1.6
    g = replicate_grads("stl", N, K, shift, widen, seed=8)
    loc = A * 10.0 + C + shift
    exact = -expected_elbo_grad(CONJ, 10.0, loc, math.log(R * widen))
    mean, se = mc(g)
    assert_matches(mean, se, exact, "stl")


def test_hierarchical_reparameterized_guide_is_refused_and_independent_sites_work():
    x = CONJ.data(3, seed=9)

    def model(x, hierarchical):
        with batch_plate("data", len(x)):
            u = pyro.sample("u", dist.Normal(0.0, 1.0))
            w = pyro.sample("w", dist.Normal(u, 1.0))
            pyro.sample("x", dist.Normal(w, 1.0), obs=x)

    def guide(x, hierarchical):
        loc = pyro.param("g_loc", torch.zeros(()))
        with batch_plate("data", len(x)):
            u = pyro.sample("u", dist.Normal(loc, 1.0))
            pyro.sample("w", dist.Normal(u if hierarchical else loc + 1, 1.0))

    for name in ("stl", "iwae-dreg", "rws-dreg"):
        with pytest.raises(batchplate.BatchPlateError, match="hierarchical guide"):
            objective(name, 3, True).loss_and_grads(model, guide, x, True)
        objective(name, 3, True).loss_and_grads(model, guide, x, False)


def test_estimator_names_and_refusals():
    with pytest.raises(ValueError, match="unknown estimator 'drag'"):
        batchplate.RenyiELBO(estimator="drag")
    with pytest.raises(ValueError, match="unbiased only for the ELBO"):
        batchplate.RenyiELBO(estimator="stl")
    with pytest.raises(ValueError, match="nothing to doubly"):
        batchplate.Trace_ELBO(estimator="dreg")
    with pytest.raises(ValueError, match="no sample path"):
        batchplate.ReweightedWakeSleep(estimator="stl")
    with pytest.raises(ValueError, match="cannot be combined"):
        batchplate.ReweightedWakeSleep(estimator="dreg", defensive=0.1)
    with pytest.raises(ValueError, match="no wake-phi phase"):
        batchplate.ReweightedWakeSleep(insomnia=0.0, defensive=0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        batchplate.ReweightedWakeSleep(defensive=1.0)
    for cls in (batchplate.Trace_ELBO, batchplate.RenyiELBO, batchplate.VIMCO):
        with pytest.raises(TypeError, match="tail_adaptive_beta"):
            cls(num_particles=2, tail_adaptive_beta=-0.5)


def defensive_exact(x, theta, a, c, K, eps):
    """`mean_b E[sum_k w~_k log q(z_k)]` as a function of `(a, c)` with the tuple
    probabilities and weights held fixed: its gradient is the defensive wake-phi
    estimator's expectation, a finite sum over the `2**K` tuples of the mixture."""
    z = tuples(K)
    total = 0.0
    for xb in x.to(F64):
        log_q = dist.Bernoulli(logits=a * xb + c).log_prob(z)
        log_prior = dist.Bernoulli(logits=torch.tensor(theta, dtype=F64)).log_prob(z)
        log_joint = log_prior + dist.Normal(MIX.loc(z), MIX.sigma).log_prob(xb)
        log_mix = torch.logaddexp(math.log1p(-eps) + log_q, math.log(eps) + log_prior).detach()
        w = torch.softmax(log_joint - log_mix, -1).detach()
        total = total + (log_mix.sum(-1).exp() * (w * log_q).sum(-1)).sum()
    return total / len(x)


@pytest.mark.parametrize("layout,vectorize", [("vectorized", True), ("sequential", False)])
def test_defensive_wake_phi_expectation_matches_enumeration(layout, vectorize):
    B, reps, K, eps = 2, 4000 if vectorize else 400, 2, 0.3
    x0 = torch.tensor([-0.5, 1.2])
    theta, a0, c0 = -1.0, 2.0, -3.0  # a guide far from the posterior: the prior matters
    a = torch.full((reps,), a0, requires_grad=True)
    c = torch.full((reps,), c0, requires_grad=True)
    model, guide = mixture_programs(layout, torch.full((reps,), theta), a, c, B)
    obj = batchplate.ReweightedWakeSleep(
        num_particles=K, defensive=eps, vectorize_particles=vectorize
    )
    pyro.set_rng_seed(10)
    _, phi = obj.losses(model, guide, x0.repeat(reps))
    grads = torch.stack(torch.autograd.grad(phi, [a, c]), -1) * reps  # per-copy means
    mean, se = mc(grads)
    params = [torch.tensor(v, dtype=F64, requires_grad=True) for v in (a0, c0)]
    exact = torch.stack(torch.autograd.grad(-defensive_exact(x0, theta, *params, K, eps), params))
    assert_matches(mean, se, exact, f"defensive {layout}", max_rel_se=0.15)


def test_tail_adaptive_weights_rank_per_datum_and_its_gradient():
    log_w = torch.tensor([[0.0, 5.0], [2.0, 1.0], [1.0, 3.0]])
    gamma = batchplate.objectives.tail_adaptive.tail_weights(log_w, -1.0)
    assert torch.allclose(gamma, torch.tensor([[1 / 3, 1.0], [1.0, 1 / 3], [0.5, 0.5]]))
    N, K = 4, 3
    x = CONJ.data(N, seed=11).to(F64)
    pyro.clear_param_store()
    pyro.set_rng_seed(12)
    model, guide, rec = per_datum_programs("vectorized", N, shift=0.5)
    obj = batchplate.TraceTailAdaptive_ELBO(
        num_particles=K, vectorize_particles=True, max_plate_nesting=1
    )
    loss = obj.loss_and_grads(model, guide, x)
    idx, w = recorded(rec, N)
    loc, log_scale = (pyro.param(n).detach().requires_grad_() for n in ("loc", "log_scale"))
    eps = (
        (w - loc) / log_scale.exp()
    ).detach()  # the draws' noise, then l as a function of the params
    z = loc + log_scale.exp() * eps
    log_w = conjugate_log_weights(CONJ, z, x, dist.Normal(loc, log_scale.exp()))
    gamma = batchplate.objectives.tail_adaptive.tail_weights(log_w.detach(), -1.0)
    surrogate = ((gamma * log_w).sum(0) / gamma.sum(0)).mean()
    want = torch.autograd.grad(-surrogate, [loc, log_scale])
    for got, exp in zip(guide_grads(), want, strict=True):
        assert torch.allclose(got, exp, atol=1e-9)
    assert loss == pytest.approx(-log_w.mean().item())
    with pytest.raises(ValueError, match=r"\[-1, 0\)"):
        batchplate.TraceTailAdaptive_ELBO(tail_adaptive_beta=0.5)


def model_with_prior_mean(layout, N):
    """The scale model with a learned prior mean `m` (a model parameter for wake-theta)."""

    def model(x):
        m = pyro.param("m", torch.tensor(8.0, dtype=F64))
        if layout == "vectorized":
            with batch_plate("data", N):
                w = pyro.sample("w", dist.Normal(m, CONJ.s))
                pyro.sample("x", dist.Normal(w, CONJ.t), obs=x)
        else:
            for i in batch_plate("data", N):
                w = pyro.sample(f"w_{i}", dist.Normal(m, CONJ.s))
                pyro.sample(f"x_{i}", dist.Normal(w, CONJ.t), obs=x[i])

    return model


@pytest.mark.parametrize("layout,vectorize", LAYOUTS)
def test_rws_dreg_phases_reach_only_their_parameters_and_report_the_standard_values(
    layout, vectorize
):
    """Wake-theta alone moves only the model, phi alone only the guide (the DReG
    gradient, by hand), and both values are the standard estimator's on the same draws."""
    N, K = 4, 3
    x = CONJ.data(N, seed=13).to(F64)

    model = model_with_prior_mean(layout, N)

    _, guide, _ = per_datum_programs(layout, N, shift=0.4, widen=1.3)
    values = {}
    for name in ("rws", "rws-dreg"):
        pyro.clear_param_store()
        pyro.set_rng_seed(14)
        theta, phi = objective(name, K, vectorize).losses(model, guide, x)
        values[name] = (theta.item(), phi.item())
        params = [pyro.param(n).unconstrained() for n in ("m", "loc", "log_scale")]
        g_theta = torch.autograd.grad(theta, params, retain_graph=True, allow_unused=True)
        g_phi = torch.autograd.grad(phi, params, allow_unused=True)
        leaks = [g_theta[1], g_theta[2], g_phi[0]]  # rounding only (the weights' exp)
        assert all(g is None or g.abs().max() < 1e-12 for g in leaks), (name, leaks)
        assert g_theta[0].abs().max() > 1e-3 and g_phi[1].abs().max() > 1e-3, name
    assert values["rws-dreg"] == pytest.approx(values["rws"], rel=1e-12)


@pytest.mark.parametrize("layout,vectorize", LAYOUTS)
@pytest.mark.parametrize("insomnia", [1.0, 0.5, 0.0])
def test_rws_dreg_one_backward_of_the_sum_equals_the_two_losses_own_gradients(
    layout, vectorize, insomnia
):
    """`loss_and_grads` shares the pass through the model between the two losses
    (only their sum is differentiated); on the same draws its gradients and values
    must be those of `losses`, whose two losses are each differentiated alone."""
    N, K = 4, 3
    x = CONJ.data(N, seed=15).to(F64)

    model = model_with_prior_mean(layout, N)

    _, per_datum_guide, _ = per_datum_programs(layout, N, shift=0.4, widen=1.3)

    def guide(x, observations=None):  # the sleep phase's fantasies: the guide ignores x
        per_datum_guide(x)

    names = ("m", "loc", "log_scale")
    kw = dict(num_particles=K, vectorize_particles=vectorize, max_plate_nesting=1)
    kw.update(estimator="dreg", insomnia=insomnia)
    pyro.clear_param_store()
    pyro.set_rng_seed(16)
    values = batchplate.ReweightedWakeSleep(**kw).loss_and_grads(model, guide, x)
    fused = [pyro.param(n).unconstrained().grad.clone() for n in names]
    pyro.clear_param_store()
    pyro.set_rng_seed(16)
    theta, phi = batchplate.ReweightedWakeSleep(**kw).losses(model, guide, x)
    params = [pyro.param(n).unconstrained() for n in names]
    separate = torch.autograd.grad(theta + phi, params)
    assert values == pytest.approx((theta.item(), phi.item()), rel=1e-12)
    for a, b in zip(fused, separate, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (a, b)
    assert fused[1].abs().max() > 1e-3 or insomnia == 0


OBJECTIVES = [
    getattr(batchplate, name)
    for name in batchplate.__all__
    if isinstance(getattr(batchplate, name), type)
    and issubclass(getattr(batchplate, name), batchplate.BatchObjective)
    and name != "BatchObjective"
]


@pytest.mark.parametrize("cls", OBJECTIVES, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("estimator", ["stl", "dreg"])
def test_every_objective_takes_estimator_and_refuses_the_others_with_the_reason(cls, estimator):
    """`"standard"` everywhere; a name an objective does not take is refused with its
    reason and the objectives that take it, as both `ValueError` (a refused option)
    and `TypeError` (what the unknown keyword raised before)."""
    takers = batchplate.objectives.pathwise.TAKEN_BY[estimator]
    assert cls(num_particles=2, estimator="standard").estimator == "standard"
    if cls.__name__ in takers:
        assert cls(num_particles=2, estimator=estimator).estimator == estimator
        return
    with pytest.raises(ValueError) as info:
        cls(num_particles=2, estimator=estimator)
    assert isinstance(info.value, TypeError)
    message = str(info.value)
    assert f"{cls.__name__} does not support estimator={estimator!r}: " in message
    assert all(name in message for name in takers), message


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_renyi_dreg_shared_model_pass_equals_the_separate_one(alpha):
    """The uncompiled step shares the model's backward pass between the bound and the
    DReG path (a hook on the draws); the compiled one, which cannot record a hook,
    takes a second pass to the draws. On the same draws: the same value and gradients."""
    N, K = 4, 3
    x = CONJ.data(N, seed=17).to(F64)
    model = model_with_prior_mean("vectorized", N)
    _, guide, _ = per_datum_programs("vectorized", N, shift=0.4, widen=1.3)
    names = ("m", "loc", "log_scale")
    kw = dict(alpha=alpha, num_particles=K, vectorize_particles=True, max_plate_nesting=1)
    results = []
    for cls in (batchplate.RenyiELBO, batchplate.JitRenyiELBO):
        pyro.clear_param_store()
        obj = cls(estimator="dreg", **kw)
        pyro.set_rng_seed(0)
        obj.loss_and_grads(model, guide, x)  # (compiles)
        for name in names:
            pyro.param(name).unconstrained().grad = None
        pyro.set_rng_seed(18)
        loss = obj.loss_and_grads(model, guide, x)
        results.append((loss, [pyro.param(n).unconstrained().grad.clone() for n in names]))
    (loss, grads), (jit_loss, jit_grads) = results
    assert loss == pytest.approx(jit_loss, rel=1e-12)
    for a, b in zip(grads, jit_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (a, b)
    assert grads[1].abs().max() > 1e-3


@pytest.mark.parametrize("estimator", ["dreg", "stl"])
def test_a_point_mass_site_keeps_the_standard_gradient(estimator):
    """A MAP site (`dist.Delta` at a parameter) has no density parameter to
    reparameterize: its gradient is the standard estimator's, draw by draw, while
    the random site's is the sample-path one."""
    N, K = 4, 3
    x = CONJ.data(N, seed=19).to(F64)

    def model(x):
        m = pyro.sample("m", dist.Normal(torch.tensor(8.0, dtype=F64), 2.0))
        with batch_plate("data", N):
            w = pyro.sample("w", dist.Normal(m, CONJ.s))
            pyro.sample("x", dist.Normal(w, CONJ.t), obs=x)

    def guide(x):
        m = pyro.param("m_map", torch.tensor(7.0, dtype=F64))
        pyro.sample("m", dist.Delta(m))
        loc = pyro.param("loc", A * x + C + 0.4)
        with batch_plate("data", N):
            pyro.sample("w", dist.Normal(loc, R * 1.3))

    grads = {}
    for est in ("standard", estimator):
        pyro.clear_param_store()
        pyro.set_rng_seed(20)
        kw = dict(num_particles=K, vectorize_particles=True, max_plate_nesting=1, estimator=est)
        cls = batchplate.RenyiELBO if estimator == "dreg" else batchplate.Trace_ELBO
        cls(**kw).loss_and_grads(model, guide, x)
        grads[est] = [pyro.param(n).unconstrained().grad.clone() for n in ("m_map", "loc")]
    assert torch.allclose(grads[estimator][0], grads["standard"][0], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(grads[estimator][1], grads["standard"][1], rtol=1e-3)


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("form", ["loss_and_grads", "losses"])
def test_rws_dreg_gives_a_local_point_mass_the_standard_rws_gradient(vectorize, form):
    """A MAP site in the batch plate (`dist.Delta` at a per-datum parameter): standard
    RWS detaches its draw, and its `log q` does not depend on its parameter, so its
    gradient is zero; RWS-DReG's must be too (not `(w~ - w~^2) dl/dz`), on the same
    draws, while the random site's stays the DReG one, by hand. Both forms: the
    shared model pass (`loss_and_grads`) and the two losses (`losses`)."""
    N, K = 4, 3
    x = CONJ.data(N, seed=21).to(F64)
    offset = torch.linspace(-0.3, 0.3, N, dtype=F64)

    def model(x):
        with batch_plate("data", N):
            w = pyro.sample("w", dist.Normal(CONJ.m, CONJ.s))
            b = pyro.sample("b", dist.Normal(torch.zeros(N, dtype=F64), 1.0))
            pyro.sample("x", dist.Normal(w + b, CONJ.t), obs=x)

    rec = []

    def guide(x):
        loc = pyro.param("loc", A * x + C + 0.4)
        log_scale = pyro.param("log_scale", torch.full_like(x, math.log(R * 1.3)))
        b = pyro.param("b_map", offset.clone())
        with batch_plate("data", N) as idx:
            rec.append((idx, pyro.sample("w", dist.Normal(loc, log_scale.exp()))))
            pyro.sample("b", dist.Delta(b))

    names = ("b_map", "loc", "log_scale")
    grads = {}
    for name in ("rws", "rws-dreg"):
        pyro.clear_param_store()
        pyro.set_rng_seed(22)
        rec.clear()
        obj = objective(name, K, vectorize)
        if form == "loss_and_grads":
            obj.loss_and_grads(model, guide, x)
            got = [pyro.param(n).unconstrained().grad for n in names]
        else:
            theta, phi = obj.losses(model, guide, x)
            params = [pyro.param(n).unconstrained() for n in names]
            got = torch.autograd.grad(theta + phi, params, allow_unused=True)
        grads[name] = [torch.zeros(N, dtype=F64) if g is None else g for g in got]
    assert grads["rws"][0].abs().max() == 0  # standard RWS: no gradient at all
    assert grads["rws-dreg"][0].abs().max() < 1e-12, grads["rws-dreg"][0]
    idx, w = recorded(rec, N)  # the draws of the DReG run; b shifts x by its value
    want = hand_grads(x - offset, idx, w, COEFS["rws-dreg"])
    for got, exp in zip(grads["rws-dreg"][1:], want, strict=True):
        assert torch.allclose(got[idx], exp / N, atol=1e-12), (got[idx], exp / N)
    assert grads["rws-dreg"][1].abs().max() > 1e-3
