"""TraceGraph_ELBO: stock Pyro's value and gradients per datum, on the same draws.

Each program is written once with a `plate` argument: `pyro.plate` for stock
`pyro.infer.TraceGraph_ELBO`, `batch_plate` for ours. With the same seed both
draw the same latents, so `reduction="sum"` must equal stock exactly and
`reduction="mean"` stock divided by `B`, value and every gradient (baseline
networks included).
"""

from __future__ import annotations

import contextlib
import warnings

import pyro
import pyro.distributions as dist
import pyro.infer
import pytest
import torch
from pyro import poutine

import batchplate
from batchplate import BatchPlateError, batch_plate

X = torch.tensor([0.5, 2.0, -1.0, 0.3])


class Baseline(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.unsqueeze(-1)).squeeze(-1)


def masked(mask):
    return contextlib.nullcontext() if mask is None else poutine.mask(mask=mask)


def programs(plate, layout: str, baseline: str | None = None, mask=None):
    """A discrete `z` (score function) upstream of a Gaussian `w`, per datum."""
    net = Baseline()
    torch.nn.init.constant_(net.linear.weight, 0.3)
    torch.nn.init.constant_(net.linear.bias, -0.2)

    def spec(x):
        if baseline == "nn":
            return {"baseline": {"nn_baseline": net, "nn_baseline_input": x}}
        if baseline == "decaying":
            return {"baseline": {"use_decaying_avg_baseline": True, "baseline_beta": 0.8}}
        return {}

    def model(x):
        p = pyro.param("p", torch.tensor(0.3))
        if layout == "vectorized":
            with plate("data", len(x)) as idx, masked(mask):
                z = pyro.sample("z", dist.Bernoulli(0.4))
                w = pyro.sample("w", dist.Normal(2.0 * z + p, 1.0))
                pyro.sample("x", dist.Normal(w, 1.0), obs=x[idx])
            return
        for i in plate("data", len(x)):
            z = pyro.sample(f"z_{i}", dist.Bernoulli(0.4))
            w = pyro.sample(f"w_{i}", dist.Normal(2.0 * z + p, 1.0))
            pyro.sample(f"x_{i}", dist.Normal(w, 1.0), obs=x[i])

    def guide(x):
        pyro.module("baseline", net)
        a = pyro.param("a", torch.tensor(0.1))
        c = pyro.param("c", torch.tensor(0.5))
        if layout == "vectorized":
            with plate("data", len(x)) as idx, masked(mask):
                xb = x[idx]
                z = pyro.sample("z", dist.Bernoulli(logits=a * xb), infer=spec(xb))
                pyro.sample("w", dist.Normal(c * xb + z, 1.0))
            return
        for i in plate("data", len(x)):
            z = pyro.sample(f"z_{i}", dist.Bernoulli(logits=a * x[i]), infer=spec(x[i]))
            pyro.sample(f"w_{i}", dist.Normal(c * x[i] + z, 1.0))

    return model, guide


def run(objective, plate, layout, steps=1, x=X, **options):
    """Losses and gradients of `steps` steps, each from its own seed."""
    pyro.clear_param_store()
    model, guide = programs(plate, layout, **options)
    out = []
    for step in range(steps):
        pyro.set_rng_seed(step)
        for name in pyro.get_param_store().keys():
            pyro.param(name).unconstrained().grad = None
        loss = objective.loss_and_grads(model, guide, x)
        grads = {
            name: pyro.param(name).unconstrained().grad.clone()
            for name in pyro.get_param_store().keys()
            if pyro.param(name).unconstrained().grad is not None
        }
        out.append((loss, grads))
    return out


def assert_stock(stock, ours, factor):
    for (stock_loss, stock_grads), (loss, grads) in zip(stock, ours, strict=True):
        assert loss == pytest.approx(stock_loss / factor, rel=1e-5, abs=1e-6)
        assert grads.keys() == stock_grads.keys()
        for name, grad in grads.items():
            assert torch.allclose(grad, stock_grads[name] / factor, rtol=1e-5, atol=1e-6), name


LAYOUTS = [
    ("vectorized", False, 1),
    ("vectorized", False, 3),
    ("vectorized", True, 3),
    ("sequential", False, 3),
    ("sequential", True, 3),
]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("layout, vectorize, K", LAYOUTS)
def test_equals_stock_on_the_same_draws(layout, vectorize, K, reduction):
    options = {"num_particles": K, "vectorize_particles": vectorize, "max_plate_nesting": 1}
    stock = run(pyro.infer.TraceGraph_ELBO(**options), pyro.plate, layout)
    ours = run(batchplate.TraceGraph_ELBO(reduction=reduction, **options), batch_plate, layout)
    assert_stock(stock, ours, len(X) if reduction == "mean" else 1)


@pytest.mark.parametrize("baseline", ["nn", "decaying"])
@pytest.mark.parametrize("layout", ["vectorized", "sequential"])
def test_baselines_equal_stock(layout, baseline):
    """One particle per step (where stock's decaying average is per datum too), three steps:
    the running average and the baseline net's gradient follow stock's."""
    stock = run(pyro.infer.TraceGraph_ELBO(), pyro.plate, layout, steps=3, baseline=baseline)
    ours = run(batchplate.TraceGraph_ELBO(), batch_plate, layout, steps=3, baseline=baseline)
    assert_stock(stock, ours, len(X))
    if baseline == "nn":
        assert ours[0][1]["baseline$$$linear.weight"].abs().item() > 0


def test_masked_equals_stock():
    mask = torch.tensor([True, False, True, True])
    options = {"num_particles": 3, "vectorize_particles": True, "max_plate_nesting": 1}
    stock = run(pyro.infer.TraceGraph_ELBO(**options), pyro.plate, "vectorized", mask=mask)
    ours = run(batchplate.TraceGraph_ELBO(**options), batch_plate, "vectorized", mask=mask)
    assert_stock(stock, ours, len(X))


def test_subsampled_sum_is_n_over_b_times_the_minibatch():
    """Subsampling: `reduction="sum"` is `N/B` times stock on the minibatch alone (stock
    with a subsampled plate scales its score terms by `(N/B)^2`, see the docstring)."""
    idx = torch.tensor([3, 0])
    data = torch.cat([X, torch.tensor([1.5, -0.7])])  # N = 6

    def sub(name, size, **kw):
        return batch_plate(name, len(data), subsample=idx)

    options = {"num_particles": 3, "vectorize_particles": True, "max_plate_nesting": 1}
    stock = run(pyro.infer.TraceGraph_ELBO(**options), pyro.plate, "vectorized", x=data[idx])
    ours = run(batchplate.TraceGraph_ELBO(reduction="sum", **options), sub, "vectorized", x=data)
    assert_stock(stock, ours, len(idx) / len(data))


def test_decaying_average_is_kept_per_dataset_index():
    idx = torch.tensor([4, 1])
    data = torch.linspace(-1, 1, 6)

    def sub(name, size, **kw):
        return batch_plate(name, len(data), subsample=idx)

    run(batchplate.TraceGraph_ELBO(), sub, "vectorized", x=data, baseline="decaying")
    average = pyro.get_param_store()["__baseline_avg_downstream_cost_z"]
    assert average.shape == (6,)
    assert (average[[0, 2, 3, 5]] == 0).all() and (average[idx] != 0).all()


def test_baseline_errors():
    def guide_with(spec):
        def guide(x):
            with batch_plate("data", len(x)):
                pyro.sample("z", dist.Bernoulli(0.5), infer={"baseline": spec})
                pyro.sample("w", dist.Normal(0.0, 1.0))

        return guide

    model, _ = programs(batch_plate, "vectorized")
    elbo = batchplate.TraceGraph_ELBO()
    with pytest.raises(ValueError, match="unrecognized baseline options"):
        elbo.loss_and_grads(model, guide_with({"use_decay": True}), X)
    wrong = {"baseline_value": torch.zeros(1, 4, requires_grad=True)}
    with pytest.raises(ValueError, match="shape of its downstream cost"):
        elbo.loss_and_grads(model, guide_with(wrong), X)


@pytest.mark.parametrize("cls", [batchplate.Trace_ELBO, batchplate.VIMCO])
def test_other_objectives_warn_about_unused_baselines(cls):
    model, guide = programs(batch_plate, "vectorized", baseline="nn")
    elbo = cls(num_particles=2)
    with pytest.warns(UserWarning, match=r"\['z'\] declare infer=\{'baseline'"):
        elbo.loss_and_grads(model, guide, X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per guide
        elbo.loss_and_grads(model, guide, X)


def test_sequential_cross_datum_dependence_raises():
    def model(x):
        prev = torch.tensor(0.0)
        for i in batch_plate("data", len(x)):
            z = pyro.sample(f"z_{i}", dist.Bernoulli(0.5))
            pyro.sample(f"x_{i}", dist.Normal(prev, 1.0), obs=x[i])
            prev = z

    def guide(x):
        for i in batch_plate("data", len(x)):
            pyro.sample(f"z_{i}", dist.Bernoulli(0.5))

    with pytest.raises(BatchPlateError, match="the data are coupled"):
        batchplate.TraceGraph_ELBO().loss_and_grads(model, guide, X)


def test_score_function_global_latent_is_refused():
    """Its cost spans every datum, which TraceGraph_ELBO's per-datum costs cannot hold."""

    def model(x):
        s = pyro.sample("s", dist.Bernoulli(0.5))
        with batch_plate("data", len(x)):
            pyro.sample("x", dist.Normal(s, 1.0), obs=x)

    def guide(x):
        pyro.sample("s", dist.Bernoulli(0.3))

    with pytest.raises(
        BatchPlateError, match=r"\['s'\] lie outside the batch plate and are not reparameterized"
    ):
        batchplate.TraceGraph_ELBO().loss(model, guide, X)
