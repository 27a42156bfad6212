"""The structural rules (Contract page, docs/contract.md) raise clear :class:`BatchPlateError` s.

Rules 1-4, on where sites lie relative to the batch plate. One test per rule
(and per way of breaking it): the error is a ``BatchPlateError`` (hence a
``ValueError``) whose message names the site and the plate and says how to fix
the program. Rules 5-6 (non-finite weights, dynamic programs) are in
``test_validation_runtime.py``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

import batchplate
from batchplate import BatchPlateError, batch_plate, log_weights
from expect import raises_rule as raises
from programs import TOY_X as X
from programs import seq_model, vec_guide, vec_model


def test_error_is_a_value_error():
    assert issubclass(BatchPlateError, ValueError)


# ---------------------------------------------------------------------------
# Rule 1: every sample site inside the batch plate
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("particles", [{}, {"num_particles": 2, "vectorize_particles": True}])
def test_random_global_latent_is_refused_by_importance_weighting(particles):
    """Allowed under the ELBO family (tests/test_globals.py); a per-datum logsumexp is
    undefined with a random latent shared by all data."""

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with batch_plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x):
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    with pytest.raises(BatchPlateError, match="'mu'.*not point masses") as info:
        batchplate.RenyiELBO(alpha=0, **{"num_particles": 2, **particles}).loss(model, guide, X)
    assert "AutoDelta" in str(info.value) and "Trace_ELBO" in str(info.value)
    with pytest.raises(BatchPlateError, match="'mu'"):
        batchplate.log_evidence(model, guide, X, num_particles=2)


def test_global_observation_after_the_batch_plate():
    def model(x):
        with batch_plate("data", len(x)):
            w = pyro.sample("w", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(w, 1.0), obs=x)
        pyro.sample("total", dist.Normal(w.sum(), 1.0), obs=x.sum())

    raises(model, vec_guide, X, match="model site 'total' is outside the batch plate but comes")


@pytest.mark.parametrize("particles", [1, 3])
def test_event_dims_over_the_minibatch(particles):
    """A density over the whole batch, broadcast by the plate, would give every datum
    the joint density of all data (and the same number in every column)."""

    def joint_model(x):
        with batch_plate("data", len(x)):
            pyro.sample("w", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(torch.zeros(3), 1.0).to_event(1), obs=x)

    msg = raises(
        joint_model,
        vec_guide,
        X,
        match="model site 'x' lies in batch plate 'data'",
        num_particles=particles,
        vectorize_particles=particles > 1,
    )
    assert "event shape (3,)" in msg and "no batch dimension" in msg
    assert "obs=value.expand(B, ...)" in msg


def test_per_datum_event_dims_and_shared_observation_are_fine():
    """Event dims inside a datum, and one scalar observed by every datum, are per-datum."""

    def model(x):
        with batch_plate("data", len(x)):
            w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(w, 1.0).to_event(1), obs=x)
            pyro.sample("y", dist.Normal(w.sum(-1), 1.0), obs=torch.tensor(0.0))
            pyro.factor("f", torch.tensor(-1.0))  # Unit: an empty value with event dims

    def guide(x):
        with batch_plate("data", len(x)):
            pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    x = torch.ones(3, 2)
    assert log_weights(model, guide, x, num_particles=4, vectorize_particles=True).shape == (4, 3)


def test_no_batch_plate_at_all():
    """A model written with pyro.plate only: point to batch_plate."""

    def model(x):
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)

    message = raises(model, lambda x: None, X, match="'x' is not inside a batch plate")
    assert "batchplate.batch_plate(" in message and "pyro.plate" in message


# ---------------------------------------------------------------------------
# Rule 2: guide sites at the model's batch index
# ---------------------------------------------------------------------------


GUIDES_OUTSIDE = {
    # one value broadcast to the whole minibatch
    "scalar": lambda x: pyro.sample("w", dist.Normal(0.0, 1.0)),
    # a [B] vector drawn as one event: a density over the whole batch
    "to_event": lambda x: pyro.sample("w", dist.Normal(0.0, 1.0).expand([len(x)]).to_event(1)),
}


@pytest.mark.parametrize("validation", [True, False])
@pytest.mark.parametrize("particles", [{}, {"num_particles": 3, "vectorize_particles": True}])
@pytest.mark.parametrize("kind", list(GUIDES_OUTSIDE))
def test_guide_site_outside_while_model_inside(kind, particles, validation):
    """Our message, not Pyro's bare shape mismatch, whether validation is on or off."""
    pyro.enable_validation(validation)
    message = raises(
        vec_model, GUIDES_OUTSIDE[kind], X, match="guide site 'w' is outside", **particles
    )
    assert "model's site 'w' is inside batch_plate('data', size=3; vectorized, dim=-1)" in message
    assert "couples the data" in message


def test_sequential_guide_site_outside_while_model_inside():
    def guide(x):
        pyro.sample("w_1", dist.Normal(0.0, 1.0))  # hoisted out of the loop
        for i in batch_plate("data", len(x)):
            if i != 1:
                pyro.sample(f"w_{i}", dist.Normal(0.0, 1.0))

    message = raises(seq_model, guide, X, match="guide site 'w_1' is outside")
    assert "batch_plate('data', size=3; sequential)" in message


def test_sequential_guide_site_at_another_datum():
    """The guide draws ``w_{j+1}`` in iteration ``j``: datum j+1's latent from datum j's input."""

    def guide(x):
        for j in batch_plate("data", len(x)):
            pyro.sample(f"w_{(j + 1) % len(x)}", dist.Normal(x[j], 1.0))

    message = raises(seq_model, guide, X, match="guide site 'w_1' is drawn at datum 0")
    assert "model's site 'w_1' is at datum 1" in message
    assert "batch_plate('data', size=3; sequential)" in message


# ---------------------------------------------------------------------------
# Rule 3: model and guide agree on the batch plate
# ---------------------------------------------------------------------------


def test_plate_name_disagrees():
    def guide(x):
        with batch_plate("other", len(x)):
            pyro.sample("w", dist.Normal(0.0, 1.0))

    message = raises(vec_model, guide, X, match="Model and guide disagree on the batch plate")
    assert "batch_plate('data'" in message and "batch_plate('other'" in message
    assert "model site 'w'" in message and "guide site 'w'" in message


def test_plate_size_disagrees():
    def guide(x):
        with batch_plate("data", len(x) + 2, subsample=torch.arange(len(x))):
            pyro.sample("w", dist.Normal(0.0, 1.0))

    message = raises(vec_model, guide, X, match="Model and guide disagree on the batch plate")
    assert "size=3;" in message and "size=5, subsample_size=3" in message


@pytest.mark.parametrize("validation", [True, False])
def test_plate_dim_disagrees(validation):
    """Our message, not Pyro's bare shape mismatch, whether validation is on or off."""
    pyro.enable_validation(validation)

    def guide(x):
        with batch_plate("data", len(x), dim=-2):
            pyro.sample("w", dist.Normal(0.0, 1.0).expand([len(x), 1]))

    message = raises(vec_model, guide, X, match="Model and guide disagree on the batch plate")
    assert "dim=-1" in message and "dim=-2" in message


def test_plate_layout_disagrees():
    """Sequential in the model, vectorized in the guide."""

    def guide(x):
        with batch_plate("data", len(x)):
            for i in range(len(x)):
                pyro.sample(f"w_{i}", dist.Normal(0.0, 1.0))

    message = raises(seq_model, guide, X, match="Model and guide disagree on the batch plate")
    assert "sequential" in message and "vectorized" in message


def test_subsample_follows_the_guide():
    """Pyro's replay gives the model the guide's minibatch, explicit ``subsample`` or
    not, so model and guide can never weigh different data; a model whose plate has
    a different dataset size is an error."""
    seen = []

    def model(x):
        with batch_plate("data", 10, subsample=torch.tensor([0, 1, 2])) as idx:
            seen.append(idx)
            w = pyro.sample("w", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(w, 1.0), obs=x[idx])

    def guide(x):
        with batch_plate("data", 10, subsample=torch.tensor([3, 4, 5])):
            pyro.sample("w", dist.Normal(0.0, 1.0))

    log_weights(model, guide, torch.arange(10.0))
    assert torch.equal(seen[0], torch.tensor([3, 4, 5]))

    def guide_other_size(x):
        with batch_plate("data", 12, subsample=torch.tensor([3, 4, 5])):
            pyro.sample("w", dist.Normal(0.0, 1.0))

    message = raises(
        model, guide_other_size, torch.arange(12.0), match="disagree on the batch plate"
    )
    assert "size=10, subsample_size=3" in message and "size=12, subsample_size=3" in message


# ---------------------------------------------------------------------------
# Rule 4: one batch plate per program
# ---------------------------------------------------------------------------


def test_nested_batch_plates():
    def model(x):
        with batch_plate("data", len(x)):
            with batch_plate("inner", 2, dim=-2):
                pyro.sample("x", dist.Normal(0.0, 1.0), obs=x.expand(2, -1))

    message = raises(model, model, X, match=r"batch_plate\('inner'\) is nested inside")
    assert "batch_plate('data')" in message and "use pyro.plate" in message


def test_nested_sequential_batch_plates():
    def model(x):
        for i in batch_plate("data", len(x)):
            for j in batch_plate("inner", 2):
                pyro.sample(f"x_{i}_{j}", dist.Normal(0.0, 1.0), obs=x[i])

    # A sequential plate does not enter the stack until iterated, so the site
    # carries two batch frames: caught when the traces are reduced.
    with pytest.raises(BatchPlateError, match="'inner'") as info:
        log_weights(model, model, X)
    assert "data" in str(info.value)


def test_repeated_batch_plates():
    def model(x):
        with batch_plate("data", len(x)):
            w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with batch_plate("data2", len(x)):
            pyro.sample("x", dist.Normal(w, 1.0), obs=x)

    message = raises(model, vec_guide, X, match="The model has more than one batch plate")
    assert "model site 'w' lies in batch_plate('data'" in message
    assert "model site 'x' in batch_plate('data2'" in message
