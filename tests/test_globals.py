"""Global sites (outside the batch plate): their term `G` enters once.

ELBO family: `reduction="sum"` is `-(G + (N/B) sum_b L_b)`, Pyro's value on the
same draws; `"mean"` is that divided by `N`. Importance-weighted objectives and
`log_evidence` accept point-mass (MAP) globals, and refuse random ones
(tests/test_validation.py). The Gaussian-mixture tutorial (`gmm.ipynb` in
pyro-ppl/pyro: global weights, locations and scale with priors, MAP guide,
assignments enumerated per datum) is ported as the last test.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pyro.infer as pi
import pytest
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoDelta

import batchplate
from batchplate import batch_plate
from expect import assert_stock_over

X = torch.tensor([0.0, 1.0, 10.0, 11.0, 12.0, -1.0])
SUBSAMPLE = torch.tensor([1, 2, 4])


def scale_model(plate, subsample=None):
    """A global mean `mu` with a prior, a local offset per datum."""

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        with plate("data", len(x), subsample=subsample) as idx:
            w = pyro.sample("w", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(w, 0.5), obs=x[idx])

    def guide(x):
        loc = pyro.param("mu_loc", torch.tensor(1.0))
        pyro.sample("mu", dist.Normal(loc, 0.7))
        m = pyro.param("w_loc", torch.zeros(len(x)))
        with plate("data", len(x), subsample=subsample) as idx:
            pyro.sample("w", dist.Normal(m[idx], 0.4))

    return model, guide


def loss_and_grads(elbo, plate, seed=0, **program):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model, guide = scale_model(plate, **program)
    loss = elbo.differentiable_loss(model, guide, X)
    params = [pyro.param(n).unconstrained() for n in ("mu_loc", "w_loc")]
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("subsample", [None, SUBSAMPLE])
@pytest.mark.parametrize("options", [dict(num_particles=1), dict(num_particles=3)])
@pytest.mark.parametrize("name", ["Trace_ELBO", "TraceEnum_ELBO"])
def test_elbo_with_global_latent_equals_stock(name, options, subsample, reduction):
    extra = dict(max_plate_nesting=1) if name == "TraceEnum_ELBO" else {}
    stock = getattr(pi, name)(**options, **extra)
    ours = getattr(batchplate, name)(reduction=reduction, **options, **extra)
    with pytest.warns(UserWarning) if name == "TraceEnum_ELBO" else _nothing():
        stock_run = loss_and_grads(stock, pyro.plate, subsample=subsample)
        our_run = loss_and_grads(ours, batch_plate, subsample=subsample)
    assert_stock_over(1.0 if reduction == "sum" else len(X), stock_run, our_run)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# -- the Gaussian-mixture tutorial: global MAP sites, enumerated assignments ---------


def gmm_model(plate, K=2):
    """Pyro's `gmm.ipynb` model (the batch plate marks the data)."""

    @pi.config_enumerate
    def model(data):
        weights = pyro.sample("weights", dist.Dirichlet(0.5 * torch.ones(K)))
        scale = pyro.sample("scale", dist.LogNormal(0.0, 2.0))
        with pyro.plate("components", K):
            locs = pyro.sample("locs", dist.Normal(0.0, 10.0))
        with plate("data", len(data)):
            assignment = pyro.sample("assignment", dist.Categorical(weights))
            pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)

    return model


def gmm_guide(model):
    return AutoDelta(poutine.block(model, expose=["weights", "locs", "scale"]))


def gmm_exact(data, weights, locs, scale):
    """`log p(x_b | weights, locs, scale)`, the assignment summed out."""
    return torch.logsumexp(weights.log() + dist.Normal(locs, scale).log_prob(data[:, None]), -1)


def test_gmm_tutorial_map_globals_with_enumeration_equal_stock_over_n():
    """The tutorial's training loop (Adam, TraceEnum_ELBO): same losses / N at every step."""
    losses = {}
    for label, plate, elbo in (
        ("stock", pyro.plate, pi.TraceEnum_ELBO(max_plate_nesting=1)),
        ("ours", batch_plate, batchplate.TraceEnum_ELBO(max_plate_nesting=1)),
    ):
        pyro.clear_param_store()
        pyro.set_rng_seed(1)
        model = gmm_model(plate)
        guide = gmm_guide(model)
        svi = pi.SVI(model, guide, pyro.optim.Adam({"lr": 0.1, "betas": [0.8, 0.99]}), elbo)
        losses[label] = torch.tensor([svi.step(X) for _ in range(30)])
    assert torch.allclose(losses["ours"], losses["stock"] / len(X), rtol=1e-4)
    assert losses["ours"][-1] < losses["ours"][0]


def test_gmm_iwae_and_log_evidence_with_map_globals_are_exact():
    model = gmm_model(batch_plate)
    guide = gmm_guide(model)
    guide(X)  # initialize the MAP parameters
    values = guide.median()
    exact = gmm_exact(X, values["weights"], values["locs"], values["scale"])
    G = (
        dist.Dirichlet(0.5 * torch.ones(2)).log_prob(values["weights"])
        + dist.LogNormal(0.0, 2.0).log_prob(values["scale"])
        + dist.Normal(0.0, 10.0).log_prob(values["locs"]).sum()
    )
    for reduction, expected in (("mean", exact.mean() + G / len(X)), ("sum", exact.sum() + G)):
        loss = batchplate.RenyiELBO(alpha=0, num_particles=3, reduction=reduction)
        assert loss.loss(model, guide, X) == pytest.approx(-float(expected), rel=1e-5)
    # log_evidence: per datum, conditional on the point-mass globals.
    est = batchplate.log_evidence(model, guide, X, num_particles=4, vectorize_particles=False)
    assert torch.allclose(est, exact, atol=1e-5)
