"""Flat-vector autoguides (`AutoContinuous`) on local latents.

`AutoDiagonalNormal` splits exactly by datum: on the same draws its per-datum
ELBO summed over the data equals stock Pyro's `Trace_ELBO` (value and
gradients), and each `l[k, b]` equals the hand computation from datum `b`'s
coordinates (a positive latent's Jacobian included). Joint flat guides over
local latents raise naming the coupling, also inside an `AutoGuideList`,
where a joint part over global latents only is accepted.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pyro.infer as pi
import pytest
import torch
from pyro import poutine
from pyro.infer.autoguide import (
    AutoDelta,
    AutoDiagonalNormal,
    AutoGuideList,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from pyro.poutine.messenger import Messenger

import batchplate
from batchplate import BatchPlateError, batch_plate
from expect import assert_stock_over

X = torch.tensor([8.0, 9.5, 7.2, 10.1, 8.6])


class Record(Messenger):
    """Records the values of one site name."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name, self.values = name, []

    def _postprocess_message(self, msg) -> None:
        if msg["name"] == self.name:
            self.values.append(msg["value"])


def model(x, plate=batch_plate, subsample_size=None):
    mu = pyro.sample("mu", dist.Normal(8.0, 2.0))
    with plate("data", len(x), subsample_size=subsample_size) as idx:
        w = pyro.sample("w", dist.Normal(mu, 1.0))
        s = pyro.sample("s", dist.Gamma(4.0, 4.0))
        pyro.sample("x", dist.Normal(w, s), obs=x[idx])


def local_model(x, plate=batch_plate):
    with plate("data", len(x)):
        w = pyro.sample("w", dist.Normal(8.5, 1.0))
        s = pyro.sample("s", dist.Gamma(4.0, 4.0))
        pyro.sample("x", dist.Normal(w, s), obs=x)


def run(elbo, plate, seed):
    pyro.clear_param_store()
    guide = AutoDiagonalNormal(lambda x: local_model(x, plate))
    pyro.set_rng_seed(99)
    guide(X)  # parameters, then the step's draws
    with torch.no_grad():
        guide.loc.copy_(torch.linspace(-1.0, 2.0, 10))  # a non-trivial point
    pyro.set_rng_seed(seed)
    loss = elbo.differentiable_loss(lambda x: local_model(x, plate), guide, X)
    store = pyro.get_param_store()
    params = [store.get_param(f"AutoDiagonalNormal.{n}").unconstrained() for n in ("loc", "scale")]
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_diagonal_normal_equals_stock_on_same_draws(reduction):
    for seed in range(3):
        stock = run(pi.Trace_ELBO(), pyro.plate, seed)
        ours = run(batchplate.Trace_ELBO(reduction=reduction), batch_plate, seed)
        assert_stock_over(len(X) if reduction == "mean" else 1.0, stock, ours)


@pytest.mark.parametrize("K, vectorize", [(1, False), (3, True)])
def test_diagonal_normal_log_weights_are_each_datums_share(K, vectorize):
    pyro.clear_param_store()
    guide = AutoDiagonalNormal(local_model)
    guide(X)
    with Record("_AutoDiagonalNormal_latent") as drawn:  # inside log_weights
        log_w = batchplate.log_weights(
            local_model, guide, X, num_particles=K, vectorize_particles=vectorize
        )
    u = torch.cat(drawn.values).reshape(K, -1).detach()
    loc, scale = guide.loc.detach(), guide.scale.detach()
    log_q = dist.Normal(loc, scale).log_prob(u)
    N = len(X)
    uw, us = u[:, :N], u[:, N:]
    w, s = uw, us.exp()
    expected = (
        dist.Normal(8.5, 1.0).log_prob(w)
        + dist.Gamma(4.0, 4.0).log_prob(s)
        + dist.Normal(w, s).log_prob(X)
        - (log_q[:, :N] + log_q[:, N:] - us)  # log q(s) = log N(log s) - log s
    )
    assert torch.allclose(log_w.detach(), expected, atol=1e-5)


def test_diagonal_normal_with_global_latent_and_importance_weighting():
    """A global latent in the same flat vector: its coordinates go to `G`; the ELBO
    takes it, an importance-weighted objective names it as a random global."""
    guide = AutoDiagonalNormal(model)
    assert torch.isfinite(
        torch.tensor(batchplate.Trace_ELBO(num_particles=2).loss(model, guide, X))
    )
    with pytest.raises(BatchPlateError, match="mu"):
        batchplate.RenyiELBO(num_particles=2).loss(model, guide, X)
    pyro.clear_param_store()
    local = AutoDiagonalNormal(local_model)
    for objective in (batchplate.RenyiELBO(num_particles=2), batchplate.VIMCO(2)):
        assert torch.isfinite(torch.tensor(objective.loss(local_model, local, X)))


def test_diagonal_normal_refuses_subsampling():
    pyro.clear_param_store()
    with pytest.raises(BatchPlateError, match="AutoNormal"):
        batchplate.Trace_ELBO().loss(model, AutoDiagonalNormal(model), X, subsample_size=2)


@pytest.mark.parametrize("cls", [AutoMultivariateNormal, AutoLowRankMultivariateNormal])
def test_joint_flat_guides_name_the_coupling(cls):
    pyro.clear_param_store()
    with pytest.raises(BatchPlateError, match=r"problem 3 of Pyro issue #2220"):
        batchplate.Trace_ELBO().loss(local_model, cls(local_model), X)


def test_auto_guide_list_joint_part_is_checked():
    pyro.clear_param_store()
    bad = AutoGuideList(model)
    bad.append(AutoNormal(poutine.block(model, expose=["mu"])))
    bad.append(AutoMultivariateNormal(poutine.block(model, hide=["mu"])))
    with pytest.raises(BatchPlateError, match=r"\['w', 's'\]"):
        batchplate.Trace_ELBO().loss(model, bad, X)
    pyro.clear_param_store()
    good = AutoGuideList(model)
    good.append(AutoMultivariateNormal(poutine.block(model, expose=["mu"])))
    good.append(AutoNormal(poutine.block(model, hide=["mu"])))
    assert torch.isfinite(torch.tensor(batchplate.Trace_ELBO().loss(model, good, X)))


def test_auto_delta_under_every_objective():
    """MAP for every latent: point masses, so the importance-weighted objectives and
    `log_evidence` accept the global `mu` too (not reweighted wake-sleep); with K
    particles all weights agree."""
    pyro.clear_param_store()
    guide = AutoDelta(model)
    for objective in (
        batchplate.Trace_ELBO(),
        batchplate.TraceMeanField_ELBO(),
        batchplate.RenyiELBO(num_particles=2),
        batchplate.VIMCO(2),
    ):
        assert all(torch.isfinite(torch.tensor(objective.loss(model, guide, X))).reshape(-1))
    # RWS detaches the guide's draws: the MAP `mu` would never learn, so it is refused.
    with pytest.raises(BatchPlateError, match="outside the batch plate"):
        batchplate.ReweightedWakeSleep(num_particles=2).loss(model, guide, X)
    log_w = batchplate.log_weights(model, guide, X, num_particles=3)
    assert torch.allclose(log_w, log_w[:1].expand(3, -1))
