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
    guide = AutoNormal(model)
    elbo = batchplate.Trace_ELBO(num_particles=16, vectorize_particles=True)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.03}), elbo)
    for _ in range(1500):
        svi.step(X, subsample_size=6)
    loc, scale = guide.locs.w.detach(), guide.scales.w.detach()
    # Tolerances: Adam at lr 0.03 with K=16 reparameterized particles jitters by ~0.05.
    assert torch.allclose(loc, 0.64 * X + 3.06, atol=0.15)
    assert torch.allclose(scale, torch.full_like(scale, 0.6), atol=0.12)


def test_auto_delta_and_auto_normal_run_under_every_objective():
    for guide in (AutoNormal(model), AutoDelta(model)):
        for objective in (
            batchplate.Trace_ELBO(),
            batchplate.RenyiELBO(num_particles=2),
            batchplate.VIMCO(2),
        ):
            assert torch.isfinite(torch.tensor(objective.loss(model, guide, X)))


def test_joint_autoguide_over_local_latents_names_the_coupling():
    with pytest.raises(BatchPlateError, match="A joint guide over the data couples them"):
        batchplate.Trace_ELBO().loss(model, AutoMultivariateNormal(model), X)
