"""Structural rules checked on the drawn weights and on the program's run
(Contract page, docs/contract.md): non-finite log weights name the datum and the
sites, dynamic programs under vectorized particles point to the fixes, and
misuse never gives silent numbers. Rules 1-4 are in ``test_validation.py``.
"""

from __future__ import annotations

import re

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI

import batchplate
from batchplate import BatchPlateError, batch_plate, log_weights
from expect import raises_rule as raises
from programs import TOY_X as X
from programs import geometric_guide, geometric_model, seq_guide, seq_model, vec_guide, vec_model

# ---------------------------------------------------------------------------
# Rule 5: non-finite log weights name the datum and the sites
# ---------------------------------------------------------------------------


X_INF = torch.tensor([1.0, float("inf"), 3.0, 4.0])


@pytest.mark.parametrize(
    "layout, particles",
    [
        ("vectorized", {"num_particles": 2, "vectorize_particles": True}),
        ("vectorized", {"num_particles": 2}),
        ("sequential", {"num_particles": 2}),
    ],
)
def test_non_finite_weight_names_datum_and_site(layout, particles):
    model, guide = (vec_model, vec_guide) if layout == "vectorized" else (seq_model, seq_guide)
    message = raises(model, guide, X_INF, match=r"Non-finite log weight l\[k=0, b=1\]", **particles)
    site = "'x'" if layout == "vectorized" else "'x_1'"
    assert "at datum 1 " in message and "batch plate 'data'" in message
    assert f"model {site} (-inf)" in message
    assert "Data with non-finite weights: [1]" in message


def test_non_finite_weight_names_dataset_index_when_subsampling():
    subsample = torch.tensor([2, 5, 7, 8])
    x = torch.arange(10.0)
    x[7] = float("inf")

    def model(x):
        with batch_plate("data", len(x), subsample=subsample) as idx:
            w = pyro.sample("w", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(w, 1.0), obs=x[idx])

    def guide(x):
        with batch_plate("data", len(x), subsample=subsample):
            pyro.sample("w", dist.Normal(0.0, 1.0))

    message = raises(model, guide, x, match=re.escape("at datum 2 (dataset index 7)"))
    assert "model 'x' (-inf)" in message


@pytest.mark.filterwarnings("ignore:Encountered \\+inf")  # Pyro's own warning, expected here
def test_non_finite_weight_names_guide_site():
    """An infinite guide density at datum 2: the guide's site is named."""

    def guide(x):
        log_density = torch.tensor([0.0, 0.0, float("inf")])
        with batch_plate("data", len(x)):
            pyro.sample("w", dist.Delta(torch.zeros(len(x)), log_density=log_density))

    message = raises(vec_model, guide, X, match=r"l\[k=0, b=2\] = -inf at datum 2")
    assert "guide 'w' (inf)" in message and "[2]" in message


@pytest.mark.parametrize("vectorize", [True, False])
def test_non_finite_weight_leaves_parameters_finite(vectorize):
    """An SVI step on such a batch raises before any parameter update."""

    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        with batch_plate("data", len(x)):
            pyro.sample("w", dist.Normal(loc, 1.0))

    objective = batchplate.RenyiELBO(alpha=0, num_particles=2, vectorize_particles=vectorize)
    svi = SVI(vec_model, guide, pyro.optim.SGD({"lr": 0.1}), objective)
    svi.step(X_INF[[0, 2, 3]])  # a finite batch: parameters exist and move
    before = pyro.param("loc").detach().clone()
    with pytest.raises(BatchPlateError, match="datum 1"):
        svi.step(X_INF)
    after = pyro.param("loc")
    assert torch.isfinite(after).all()
    assert torch.equal(after.detach(), before)
    assert after.grad is None or torch.isfinite(after.grad).all()


# ---------------------------------------------------------------------------
# Rule 6: dynamic programs under vectorize_particles=True
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "objective",
    [
        lambda: batchplate.RenyiELBO(alpha=0, num_particles=3, vectorize_particles=True),
        lambda: batchplate.Trace_ELBO(num_particles=2, vectorize_particles=True),
        lambda: batchplate.VIMCO(num_particles=3, vectorize_particles=True),
    ],
)
def test_dynamic_program_with_vectorized_particles(objective):
    obs = torch.tensor([0.0, 1.0])
    with pytest.raises(BatchPlateError) as info:
        objective().loss(geometric_model, geometric_guide, obs)
    message = str(info.value)
    assert "control flow depends on sampled values" in message
    assert "vectorize_particles=False" in message and "padded form" in message
    assert isinstance(info.value.__cause__, RuntimeError | TypeError | ValueError)


# ---------------------------------------------------------------------------
# Not rules, but misuse that must not give silent numbers
# ---------------------------------------------------------------------------


def test_sequential_loop_ending_early():
    def model(x):
        for i in batch_plate("data", len(x)):
            w = pyro.sample(f"w_{i}", dist.Normal(0.0, 1.0))
            pyro.sample(f"x_{i}", dist.Normal(w, 1.0), obs=x[i])
            if i == 1:
                return

    def guide(x):
        for i in batch_plate("data", len(x)):
            pyro.sample(f"w_{i}", dist.Normal(0.0, 1.0))
            if i == 1:
                return

    with pytest.raises(BatchPlateError, match=re.escape("no sample site at data [2]")) as info:
        log_weights(model, guide, X)
    assert "'data'" in str(info.value) and "return" in str(info.value)
