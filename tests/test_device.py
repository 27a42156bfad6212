"""Tensors follow the data's device (marker `gpu`).

The test suite runs these on the CPU; the GPU check runs them with
`BATCHPLATE_TEST_DEVICE=cuda` (`pytest -m gpu`), where the data, and hence
every weight, gradient and autobatched lane value, live on the GPU.
"""

from __future__ import annotations

import os

import pyro
import pyro.distributions as dist
import pytest
import torch

import batchplate
from batchplate import batch_plate
from batchplate.autobatch import autobatch_log_weights
from batchplate.examples import geometric

pytestmark = pytest.mark.gpu
DEVICE = torch.device(os.environ.get("BATCHPLATE_TEST_DEVICE", "cpu"))


def _vectorized_model(x):
    with batch_plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(torch.zeros((), device=x.device), 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def _vectorized_guide(x):
    loc = pyro.param("loc", torch.zeros(len(x), device=x.device))
    with batch_plate("data", len(x)):
        pyro.sample("z", dist.Normal(loc, 1.0))


@pytest.mark.parametrize(
    "objective",
    [
        lambda: batchplate.Trace_ELBO(num_particles=3, vectorize_particles=True),
        lambda: batchplate.RenyiELBO(alpha=0, num_particles=3, vectorize_particles=True),
        lambda: batchplate.ReweightedWakeSleep(num_particles=3, vectorize_particles=True),
    ],
)
def test_objectives_weigh_and_step_on_the_data_device(objective):
    pyro.clear_param_store()
    x = torch.linspace(-1, 1, 6, device=DEVICE)
    loss = objective()
    weights = loss.weigh(_vectorized_model, _vectorized_guide, (x,), {})
    assert weights.log_p.device.type == DEVICE.type and weights.log_p.shape == (3, 6)
    loss.loss_and_grads(_vectorized_model, _vectorized_guide, x)
    grad = pyro.param("loc").unconstrained().grad
    assert grad.device.type == DEVICE.type and torch.isfinite(grad).all()


def test_autobatch_lanes_follow_the_data_device():
    """The geometric program of Pyro issue #2220 autobatched with its data on the
    device: weights there, equal to the sequential program's on the same draws."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    obs = geometric.sample_data(8, 0.3, seed=0).to(DEVICE)
    draws: list[dict] = []
    log_p, log_q, _, _ = autobatch_log_weights(
        geometric.model_sequential,
        geometric.guide_sequential,
        (obs,),
        {},
        num_particles=4,
        draws=draws,
    )
    assert log_p.device.type == DEVICE.type and log_p.shape == (4, 8)
    for k, values in enumerate(draws):
        replayed = batchplate.replay_latents(geometric.guide_sequential, values)
        row = batchplate.log_weights(geometric.model_sequential, replayed, obs, num_particles=1)
        assert torch.allclose(row[0], (log_p - log_q)[k], atol=1e-5)
