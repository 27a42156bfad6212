"""TraceMeanField_ELBO: stock Pyro's analytic-KL value and gradients per datum, same draws."""

from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import pyro.infer
import pytest
import torch
from pyro import poutine

import batchplate
from batchplate import batch_plate

X = torch.tensor([0.5, 2.0, -1.0, 0.3])


def programs(plate, layout: str, mask=None, scale=1.0):
    """`w` has an analytic KL (Normal/Normal); `v` (LogNormal guide, Gamma prior) has not."""

    def model(x):
        p = pyro.param("p", torch.tensor(0.3))
        if layout == "vectorized":
            with plate("data", len(x)) as idx:
                w = pyro.sample("w", dist.Normal(p, 1.0))
                v = pyro.sample("v", dist.Gamma(2.0, 2.0))
                pyro.sample("x", dist.Normal(w, v), obs=x[idx])
            return
        for i in plate("data", len(x)):
            w = pyro.sample(f"w_{i}", dist.Normal(p, 1.0))
            v = pyro.sample(f"v_{i}", dist.Gamma(2.0, 2.0))
            pyro.sample(f"x_{i}", dist.Normal(w, v), obs=x[i])

    def guide(x):
        a = pyro.param("a", torch.tensor(0.1))
        c = pyro.param("c", torch.tensor(0.5))
        if layout == "vectorized":
            with plate("data", len(x)) as idx:
                xb = x[idx]
                with poutine.mask(mask=True if mask is None else mask), poutine.scale(scale=scale):
                    pyro.sample("w", dist.Normal(c * xb, a.exp()))
                pyro.sample("v", dist.LogNormal(c * xb, 1.0))
            return
        for i in plate("data", len(x)):
            pyro.sample(f"w_{i}", dist.Normal(c * x[i], a.exp()))
            pyro.sample(f"v_{i}", dist.LogNormal(c * x[i], 1.0))

    return model, guide


def run(objective, plate, layout, x=X, **options):
    pyro.clear_param_store()
    model, guide = programs(plate, layout, **options)
    pyro.set_rng_seed(3)
    loss = objective.loss_and_grads(model, guide, x)
    grads = {n: pyro.param(n).unconstrained().grad.clone() for n in ("a", "c", "p")}
    return loss, grads


def assert_stock(stock, ours, factor):
    assert ours[0] == pytest.approx(stock[0] / factor, rel=1e-5)
    for name, grad in ours[1].items():
        assert torch.allclose(grad, stock[1][name] / factor, rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    "layout, vectorize, K",
    [("vectorized", False, 1), ("vectorized", True, 3), ("sequential", False, 3)]
    + [("sequential", True, 3)],
)
def test_equals_stock_on_the_same_draws(layout, vectorize, K, reduction):
    options = {"num_particles": K, "vectorize_particles": vectorize, "max_plate_nesting": 1}
    stock = run(pyro.infer.TraceMeanField_ELBO(**options), pyro.plate, layout)
    ours = run(batchplate.TraceMeanField_ELBO(reduction=reduction, **options), batch_plate, layout)
    assert_stock(stock, ours, len(X) if reduction == "mean" else 1)


def test_mask_and_user_scale_equal_stock():
    """The KL is masked and scaled by the guide site's mask and user scale, as in Pyro."""
    options = {"mask": torch.tensor([True, False, True, True]), "scale": 0.3}
    stock = run(pyro.infer.TraceMeanField_ELBO(), pyro.plate, "vectorized", **options)
    ours = run(batchplate.TraceMeanField_ELBO(), batch_plate, "vectorized", **options)
    assert_stock(stock, ours, len(X))


def test_subsampling_leaves_n_over_b_out_of_the_kl():
    """`reduction="sum"` on a subsampled plate: `N/B` times stock on the minibatch alone
    (stock with a subsampled plate gives the same here: nothing is a score term)."""
    data = torch.cat([X, torch.tensor([1.5, -0.7])])
    idx = torch.tensor([5, 2])

    def sub(name, size):
        return batch_plate(name, len(data), subsample=idx)

    stock = run(pyro.infer.TraceMeanField_ELBO(), pyro.plate, "vectorized", x=data[idx])
    ours = run(batchplate.TraceMeanField_ELBO(reduction="sum"), sub, "vectorized", x=data)
    assert_stock(stock, ours, len(idx) / len(data))
    means = run(batchplate.TraceMeanField_ELBO(), sub, "vectorized", x=data)
    assert_stock(stock, means, len(idx))


def test_value_has_lower_variance_than_trace_elbo():
    """The analytic KL removes the latent terms' Monte Carlo noise (same ELBO in mean)."""
    model, guide = programs(batch_plate, "vectorized")
    values = {}
    for cls in (batchplate.Trace_ELBO, batchplate.TraceMeanField_ELBO):
        values[cls] = torch.tensor([cls().loss(model, guide, X) for _ in range(300)])
    mc, kl = values[batchplate.Trace_ELBO], values[batchplate.TraceMeanField_ELBO]
    assert kl.std() < 0.8 * mc.std()
    # Same expectation: the difference of means is within 4 standard errors.
    se = (mc.var() / 300 + kl.var() / 300).sqrt()
    assert (mc.mean() - kl.mean()).abs() < 4 * se


def test_non_reparameterized_guide_site_is_refused():
    def model(x):
        with batch_plate("data", len(x)):
            z = pyro.sample("z", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with batch_plate("data", len(x)):
            pyro.sample("z", dist.Bernoulli(0.3))

    with pyro.validation_enabled(False), pytest.raises(NotImplementedError, match="'z'"):
        batchplate.TraceMeanField_ELBO().loss(model, guide, X)


def order_programs(plate):
    def model(x):
        with plate("data", len(x)):
            w = pyro.sample("w", dist.Normal(0.0, 1.0))
            v = pyro.sample("v", dist.Normal(w, 1.0))
            pyro.sample("x", dist.Normal(v, 1.0), obs=x)

    def reordered(x):  # draws v first, then w from v: w's prior parent depends on w
        with plate("data", len(x)):
            v = pyro.sample("v", dist.Normal(x, 1.0))
            pyro.sample("w", dist.Normal(v / 2, 1.0))

    def ordered(x):
        with plate("data", len(x)):
            w = pyro.sample("w", dist.Normal(x / 2, 1.0))
            pyro.sample("v", dist.Normal(w, 1.0))

    return model, reordered, ordered


def test_guide_in_another_order_warns_as_pyro():
    """The analytic KL of `v`'s prior is taken at the guide's `w`, which the reordered
    guide drew from `v`: biased, so stock and batchplate both warn; in order, neither."""
    model, reordered, ordered = order_programs(batch_plate)
    with pytest.warns(UserWarning, match="Failed to verify mean field restriction"):
        batchplate.TraceMeanField_ELBO().loss(model, reordered, X)
    stock_model, stock_reordered, _ = order_programs(pyro.plate)
    with pytest.warns(UserWarning, match="Failed to verify mean field restriction"):
        pyro.infer.TraceMeanField_ELBO().loss(stock_model, stock_reordered, X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batchplate.TraceMeanField_ELBO().loss(model, ordered, X)


def test_prior_depending_on_a_model_enumerated_site_keeps_its_monte_carlo_term():
    """`w`'s prior depends on the enumerated `c`: there is no single prior to take a KL
    against, so the value is `Trace_ELBO`'s on the same draws (a KL per value of `c`,
    summed, gave 9.50 where the right value is 10.90 on a similar program)."""

    @pyro.infer.config_enumerate
    def model(x):
        with batch_plate("data", len(x)):
            c = pyro.sample("c", dist.Categorical(torch.ones(2) / 2))
            w = pyro.sample("w", dist.Normal(torch.tensor([0.0, 5.0])[c], 1.0))
            pyro.sample("x", dist.Normal(w, 1.0), obs=x)

    def guide(x):
        with batch_plate("data", len(x)):
            pyro.sample("w", dist.Normal(x, 1.0))

    for vectorize in (False, True):
        options = {"num_particles": 3, "vectorize_particles": vectorize}
        pyro.set_rng_seed(0)
        ours = batchplate.TraceMeanField_ELBO(**options).loss(model, guide, X)
        pyro.set_rng_seed(0)
        assert ours == pytest.approx(batchplate.Trace_ELBO(**options).loss(model, guide, X))


def global_programs(plate):
    """A global scale `mu` (Gamma prior, LogNormal guide: no registered KL, so stock takes
    its Monte Carlo term too) and a local `w` with an analytic KL."""

    def model(x):
        mu = pyro.sample("mu", dist.Gamma(2.0, 2.0))
        with plate("data", len(x)):
            w = pyro.sample("w", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(w * mu, 1.0), obs=x)

    def guide(x):
        m = pyro.param("m", torch.tensor(0.2))
        c = pyro.param("c", torch.tensor(0.5))
        pyro.sample("mu", dist.LogNormal(m, 0.5))
        with plate("data", len(x)):
            pyro.sample("w", dist.Normal(c * x, 1.0))

    return model, guide


@pytest.mark.parametrize("name", ["TraceMeanField_ELBO", "TraceGraph_ELBO"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_global_latent_enters_once(name, reduction):
    """As `Trace_ELBO`: `"sum"` is stock's value and gradient on the same draws
    (`G + sum_b L_b`), `"mean"` that divided by `N`."""
    results = []
    for objective, plate in (
        (getattr(batchplate, name)(reduction=reduction), batch_plate),
        (getattr(pyro.infer, name)(), pyro.plate),
    ):
        pyro.clear_param_store()
        model, guide = global_programs(plate)
        pyro.set_rng_seed(5)
        loss = objective.loss_and_grads(model, guide, X)
        results.append((loss, [pyro.param(n).unconstrained().grad for n in ("m", "c")]))
    (ours, ours_grads), (stock, stock_grads) = results
    factor = len(X) if reduction == "mean" else 1
    assert ours * factor == pytest.approx(stock, rel=1e-5)
    for a, b in zip(ours_grads, stock_grads, strict=True):
        assert torch.allclose(a * factor, b, rtol=1e-4, atol=1e-6)
