"""A score-function (non-reparameterized) global latent under the ELBO family.

A global draw changes every datum's term, so its score function's cost is the
whole objective of its particle (Pyro's rule for a site outside every plate).
With one particle the gradient equals stock Pyro's on the same draws (divided
by `N` under `reduction="mean"`); with several, the other particles' mean is
subtracted as a baseline, and the mean gradient over seeds matches the exact
gradient (computed by enumerating the global site) within the measured Monte
Carlo error.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pyro.infer as pi
import pytest
import torch

import batchplate
from batchplate import batch_plate
from expect import assert_stock_over

X = torch.tensor([0.0, 1.0, 10.0, 11.0, 12.0, -1.0])
PARAMS = ("p", "m")


def programs(plate, sequential=False, enumerate_global=False):
    """A global switch `c` (Bernoulli in model and guide) moves every datum's `w`."""

    def model(x):
        c = pyro.sample("c", dist.Bernoulli(0.5))
        if sequential:
            for i in plate("data", len(x)):
                w = pyro.sample(f"w_{i}", dist.Normal(5.0 * c, 3.0))
                pyro.sample(f"x_{i}", dist.Normal(w, 1.0), obs=x[i])
            return
        with plate("data", len(x)):
            w = pyro.sample("w", dist.Normal(5.0 * c, 3.0))
            pyro.sample("x", dist.Normal(w, 1.0), obs=x)

    def guide(x):
        p = pyro.param("p", torch.tensor(0.4), constraint=dist.constraints.unit_interval)
        infer = {"enumerate": "parallel"} if enumerate_global else {}
        pyro.sample("c", dist.Bernoulli(p), infer=infer)
        m = pyro.param("m", torch.zeros(len(x)))
        if sequential:
            for i in plate("data", len(x)):
                pyro.sample(f"w_{i}", dist.Normal(m[i], 1.0))
            return
        with plate("data", len(x)):
            pyro.sample("w", dist.Normal(m, 1.0))

    return model, guide


def loss_and_grads(elbo, plate, seed=0, **program):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model, guide = programs(plate, **program)
    loss = elbo.differentiable_loss(model, guide, X)
    params = [pyro.param(n).unconstrained() for n in PARAMS]
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("sequential", [False, True])
@pytest.mark.parametrize("name", ["Trace_ELBO", "TraceEnum_ELBO"])
def test_one_particle_equals_stock(name, sequential, reduction):
    extra = {"max_plate_nesting": 1, "strict_enumeration_warning": False} if "Enum" in name else {}
    for seed in range(3):
        stock = loss_and_grads(getattr(pi, name)(**extra), pyro.plate, seed, sequential=sequential)
        ours = loss_and_grads(
            getattr(batchplate, name)(reduction=reduction, **extra),
            batch_plate,
            seed,
            sequential=sequential,
        )
        assert_stock_over(len(X) if reduction == "mean" else 1.0, stock, ours)


def test_several_particles_unbiased_against_exact_gradient():
    """`d/dp` of the ELBO with the global enumerated exactly in the guide
    (`TraceEnum_ELBO`, the local `w` reparameterized with many particles) against
    the mean over 200 seeds of `Trace_ELBO(num_particles=4)`'s; tolerance: 4
    standard errors of that mean plus the reference's own (measured the same way)."""
    ours = torch.stack(
        [
            loss_and_grads(
                batchplate.Trace_ELBO(num_particles=4, vectorize_particles=True), batch_plate, seed
            )[1][0]
            for seed in range(200)
        ]
    )
    ref_elbo = batchplate.TraceEnum_ELBO(
        num_particles=400, vectorize_particles=True, max_plate_nesting=1
    )
    ref = torch.stack(
        [loss_and_grads(ref_elbo, batch_plate, s, enumerate_global=True)[1][0] for s in range(4)]
    )
    err = ours.std() / len(ours) ** 0.5 + ref.std() / len(ref) ** 0.5
    assert abs(ours.mean() - ref.mean()) < 4 * err, (ours.mean(), ref.mean(), err)
    # Without the global score term the gradient is the pathwise -d log q(c)/dp alone,
    # -0.4 / N at p = 0.4, c = 1 or 0 alike: the tolerance tells it apart.
    assert abs(ref.mean() + 0.4 / len(X)) > 4 * err
