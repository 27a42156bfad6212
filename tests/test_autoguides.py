"""Autoguides built as Pyro users build them (`AutoNormal(model)`), per datum.

The conjugate scale model (`w ~ N(8.5, 1)`, `x | w ~ N(w, 0.75)`) has the exact
per-datum posterior `N(0.64 x + 3.06, 0.6)` (the Contract page); an `AutoNormal`
trained with the per-datum ELBO, with subsampling, learns it. A joint autoguide
over the data's local latents raises, naming the coupling.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoDelta, AutoMultivariateNormal, AutoNormal

import batchplate
from batchplate import BatchPlateError, batch_plate

X = 8.5 + 1.25 * torch.randn(12, generator=torch.Generator().manual_seed(0))


def model(x, subsample_size=None):
    with batch_plate("data", len(x), subsample_size=subsample_size) as idx:
        w = pyro.sample("w", dist.Normal(8.5, 1.0))
        pyro.sample("x", dist.Normal(w, 0.75), obs=x[idx])


def test_auto_normal_learns_each_datums_exact_posterior_with_subsampling():
    """Tolerances from the optimization noise, measured once over seeds 0-10 of this
    exact run (largest error over the 12 data, per seed): the last iterate's loc is off
    by 0.031 +- 0.010 (max 0.049), the scale averaged over the last 500 steps (Adam's
    jitter averages out; the loc, still converging, does not gain) by 0.013 +- 0.003
    (max 0.019; the last iterate's: 0.050 +- 0.015). Bounds: mean + 5 sd."""
    guide = AutoNormal(model)
    elbo = batchplate.Trace_ELBO(num_particles=16, vectorize_particles=True)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.03}), elbo)
    scales = []
    for step in range(1500):
        svi.step(X, subsample_size=6)
        if step >= 1000:
            scales.append(guide.scales.w.detach())
    loc, scale = guide.locs.w.detach(), torch.stack(scales).mean(0)
    assert (loc - (0.64 * X + 3.06)).abs().max() < 0.08
    assert (scale - 0.6).abs().max() < 0.03


def stock_model(x):
    """`model` with Pyro's plate, for stock Pyro (no subsampling)."""
    with pyro.plate("data", len(x)):
        w = pyro.sample("w", dist.Normal(8.5, 1.0))
        pyro.sample("x", dist.Normal(w, 0.75), obs=x)


@pytest.mark.parametrize(
    "ours, stock",
    [
        (lambda **kw: batchplate.Trace_ELBO(**kw), pyro.infer.Trace_ELBO()),
        (lambda **kw: batchplate.RenyiELBO(num_particles=3, **kw), pyro.infer.RenyiELBO(3)),
        (lambda **kw: batchplate.VIMCO(3, **kw), pyro.infer.TraceGraph_ELBO()),
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_auto_delta_equals_stock(ours, stock, reduction):
    """A point-mass guide makes every particle the same, so each objective's value is the
    ELBO: stock Pyro's (batch sum) divided by `B` under "mean", equal under "sum", with
    its gradient; the two AutoDelta guides share their one parameter `AutoDelta.w`."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    ours_guide, stock_guide = AutoDelta(model), AutoDelta(stock_model)
    factor = len(X) if reduction == "mean" else 1
    value = ours(reduction=reduction).loss_and_grads(model, ours_guide, X)
    assert list(pyro.get_param_store().keys()) == ["AutoDelta.w"]
    w = pyro.param("AutoDelta.w").unconstrained()
    grad, w.grad = w.grad.clone(), None
    expected = stock.loss_and_grads(stock_model, stock_guide, X)
    assert value * factor == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(grad * factor, w.grad, rtol=1e-5, atol=1e-6)
    assert list(pyro.get_param_store().keys()) == ["AutoDelta.w"]  # the same parameter


def test_auto_normal_runs_under_every_objective():
    guide = AutoNormal(model)
    for objective in (
        batchplate.Trace_ELBO(),
        batchplate.RenyiELBO(num_particles=2),
        batchplate.VIMCO(2),
    ):
        assert torch.isfinite(torch.tensor(objective.loss(model, guide, X)))


def test_joint_autoguide_over_local_latents_names_the_coupling():
    with pytest.raises(BatchPlateError, match="A joint guide over the data couples them"):
        batchplate.Trace_ELBO().loss(model, AutoMultivariateNormal(model), X)
