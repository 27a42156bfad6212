"""The objectives' interface: drop-ins for Pyro's ELBOs and plain PyTorch losses.

Exact values come from the Conjugate model (exact-posterior guide: every
objective's per-datum value is ``log p(x_b)``) and from a point-mass guide, whose
log weights are deterministic, ``l_b = log p(x_b, loc)``, so its gradients are
known exactly without Monte Carlo (``oracles.point_mass_grad``). Reductions and
the objectives' interface are specified on the Contract page (docs/contract.md).
"""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI

import batchplate
from batchplate import batch_plate
from oracles import point_mass_grad
from programs import Conjugate

CONJ = Conjugate()

MAKERS = {
    "elbo": lambda **kw: batchplate.Trace_ELBO(**kw),
    "iwae": lambda **kw: batchplate.RenyiELBO(alpha=0, **kw),
    "renyi_0.5": lambda **kw: batchplate.RenyiELBO(alpha=0.5, **kw),
    "vimco": lambda **kw: batchplate.VIMCO(**kw),
}


def learnable(layout: str):
    """Conjugate model with a learnable prior mean and an amortized Normal guide
    ``N(a x + c, exp(log_r))`` started away from the posterior."""

    def model(x):
        m = pyro.param("m", torch.tensor(5.0))
        if layout == "vectorized":
            with batch_plate("data", len(x)):
                w = pyro.sample("w", dist.Normal(m, CONJ.s))
                pyro.sample("x", dist.Normal(w, CONJ.t), obs=x)
        else:
            for i in batch_plate("data", len(x)):
                w = pyro.sample(f"w_{i}", dist.Normal(m, CONJ.s))
                pyro.sample(f"x_{i}", dist.Normal(w, CONJ.t), obs=x[i])

    def guide(x):
        a = pyro.param("a", torch.tensor(0.2))
        c = pyro.param("c", torch.tensor(1.0))
        r = pyro.param("log_r", torch.tensor(0.0)).exp()
        if layout == "vectorized":
            with batch_plate("data", len(x)):
                pyro.sample("w", dist.Normal(a * x + c, r))
        else:
            for i in batch_plate("data", len(x)):
                pyro.sample(f"w_{i}", dist.Normal(a * x[i] + c, r))

    return model, guide


PARAMS = ("m", "a", "c", "log_r")


def param_values():
    return {n: pyro.param(n).detach().clone() for n in PARAMS}


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("name", list(MAKERS))
def test_svi_step(name, vectorize):
    """Under pyro.infer.SVI: step returns a float loss, every parameter moves, and a
    few steps of Adam decrease the loss (evaluated with many particles)."""
    x = CONJ.data(6, seed=1)
    model, guide = learnable("vectorized")
    objective = MAKERS[name](num_particles=3, vectorize_particles=vectorize)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.1}), objective)
    first = svi.step(x)
    assert isinstance(first, float) and math.isfinite(first)
    before = param_values()
    for _ in range(10):
        svi.step(x)
    after = param_values()
    assert all(not torch.equal(before[n], after[n]) for n in PARAMS)
    assert all(torch.isfinite(v).all() for v in after.values())
    evaluate = batchplate.Trace_ELBO(num_particles=500, vectorize_particles=True)
    pyro.set_rng_seed(1)
    start = evaluate.loss(model, guide, x)
    for n, v in before.items():
        pyro.param(n).data.copy_(v)
    pyro.set_rng_seed(1)
    assert start < evaluate.loss(model, guide, x)


@pytest.mark.parametrize("name", list(MAKERS))
def test_plain_torch_loop(name):
    """differentiable_loss + torch.optim, no Pyro optimizer: the loss tensor's
    gradient equals what loss_and_grads accumulates on the same random stream."""
    x = CONJ.data(4, seed=2)
    model, guide = learnable("vectorized")
    # (max_plate_nesting given: guessing it would run the program once, off-stream)
    objective = MAKERS[name](num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    pyro.set_rng_seed(3)
    loss = objective.differentiable_loss(model, guide, x)
    assert isinstance(loss, torch.Tensor) and loss.shape == () and loss.requires_grad
    params = [pyro.param(n).unconstrained() for n in PARAMS]
    grads = torch.autograd.grad(loss, params)

    pyro.set_rng_seed(3)
    value = objective.loss_and_grads(model, guide, x)
    assert isinstance(value, float) and value == pytest.approx(loss.item(), rel=1e-6)
    for p, g in zip(params, grads, strict=True):
        assert torch.allclose(p.grad, g)
        p.grad = None

    optimizer = torch.optim.SGD(params, lr=0.01)
    before = [p.detach().clone() for p in params]
    for _ in range(3):
        optimizer.zero_grad()
        objective.differentiable_loss(model, guide, x).backward()
        optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, params, strict=True))


@pytest.mark.parametrize("layout, vectorize", [("vectorized", True), ("sequential", False)])
@pytest.mark.parametrize("name", list(MAKERS))
def test_reduction_values(name, layout, vectorize):
    """Exact guide: loss is ``-mean_b log p(x_b)`` (mean) or ``-(N/B) sum_b`` (sum)."""
    B = 5
    x = CONJ.data(B, seed=3)
    exact = CONJ.log_evidence(x)
    model, guide = CONJ.model(layout), CONJ.guide(layout)
    kw = dict(num_particles=3, vectorize_particles=vectorize)
    mean = MAKERS[name](**kw)
    total = MAKERS[name](reduction="sum", **kw)
    assert mean.reduction == "mean"
    assert mean.loss(model, guide, x) == pytest.approx(-exact.mean().item(), rel=1e-5)
    assert total.loss(model, guide, x) == pytest.approx(-exact.sum().item(), rel=1e-5)
    assert total.differentiable_loss(model, guide, x).item() == pytest.approx(
        -exact.sum().item(), rel=1e-5
    )


def test_invalid_reduction():
    with pytest.raises(ValueError, match="reduction"):
        batchplate.Trace_ELBO(reduction="batchmean")


# ---------------------------------------------------------------------------
# ELBO gradient scale, exactly: a point-mass guide
# ---------------------------------------------------------------------------


def point_mass_programs(layout):
    """Guide ``w_b = loc`` (a Delta), so ``l_b = log N(loc; m, s) + log N(x_b; loc, t)``."""

    def model(x):
        m = pyro.param("m", torch.tensor(8.0))
        if layout == "vectorized":
            with batch_plate("data", len(x)):
                w = pyro.sample("w", dist.Normal(m, CONJ.s))
                pyro.sample("x", dist.Normal(w, CONJ.t), obs=x)
        else:
            for i in batch_plate("data", len(x)):
                w = pyro.sample(f"w_{i}", dist.Normal(m, CONJ.s))
                pyro.sample(f"x_{i}", dist.Normal(w, CONJ.t), obs=x[i])

    def guide(x):
        loc = pyro.param("loc", torch.tensor(9.0))
        if layout == "vectorized":
            with batch_plate("data", len(x)):
                pyro.sample("w", dist.Delta(loc.expand(len(x))))
        else:
            for i in batch_plate("data", len(x)):
                pyro.sample(f"w_{i}", dist.Delta(loc))

    return model, guide


@pytest.mark.parametrize("layout, vectorize", [("vectorized", True), ("sequential", False)])
def test_elbo_gradient_of_identical_data(layout, vectorize):
    """B identical data: the mean reduction's gradient is one datum's, the sum's is
    B times it, and stock Pyro's (pyro.infer.Trace_ELBO) is B times it too."""
    x0, B = 10.5, 6
    one = point_mass_grad(CONJ, x0, m=8.0, loc=9.0)  # the programs' initial m and loc

    def grad(objective, x):
        pyro.clear_param_store()
        model, guide = point_mass_programs(layout)
        objective.loss_and_grads(model, guide, x)
        return -torch.stack([pyro.param(n).grad for n in ("m", "loc")])  # of L = -loss

    kw = dict(num_particles=2, vectorize_particles=vectorize)
    single = grad(batchplate.Trace_ELBO(**kw), torch.tensor([x0]))
    assert torch.allclose(single, one, rtol=1e-5)
    batch = torch.full((B,), x0)
    assert torch.allclose(grad(batchplate.Trace_ELBO(**kw), batch), one, rtol=1e-5)
    total = grad(batchplate.Trace_ELBO(reduction="sum", **kw), batch)
    assert torch.allclose(total, B * one, rtol=1e-5)
    stock = grad(pyro.infer.Trace_ELBO(**kw), batch)
    assert torch.allclose(stock, B * one, rtol=1e-5)


# ---------------------------------------------------------------------------
# Constructors accept Pyro's keywords
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, extra",
    [
        (batchplate.Trace_ELBO, {}),
        (batchplate.RenyiELBO, {"alpha": 0.5}),
        (batchplate.VIMCO, {}),
        (batchplate.ReweightedWakeSleep, {"insomnia": 0.5}),
    ],
)
def test_constructor_accepts_pyro_keywords(cls, extra):
    objective = cls(
        num_particles=4,
        max_plate_nesting=2,
        vectorize_particles=True,
        strict_enumeration_warning=False,
        retain_graph=True,
        reduction="sum",
        **extra,
    )
    assert objective.num_particles == 4
    assert objective.max_plate_nesting == 2  # the program's own, without the particle plate
    assert objective.vectorize_particles is True
    assert objective.retain_graph is True
    assert objective.reduction == "sum"
    assert isinstance(objective, pyro.infer.ELBO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = cls(num_particles=2, max_iarange_nesting=1, **extra)
    assert old.max_plate_nesting == 1
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)


def test_constructor_rejects_bad_values():
    with pytest.raises(ValueError, match="alpha"):
        batchplate.RenyiELBO(alpha=1)
    with pytest.raises(ValueError, match="num_particles"):
        batchplate.Trace_ELBO(num_particles=0)
    with pytest.raises(ValueError, match="num_particles >= 2"):
        batchplate.VIMCO(num_particles=1)
    assert batchplate.RenyiELBO().num_particles == 2  # Pyro's default
    assert batchplate.RenyiELBO().alpha == 0


def _mixture_programs():
    """A two-component mixture whose assignment `c` the model enumerates, or (with
    `mixture=False`) the same program without `c`."""

    def model(x, mixture=True):
        with batch_plate("data", len(x)):
            c = 0.0
            if mixture:
                c = pyro.sample("c", dist.Bernoulli(0.5), infer={"enumerate": "parallel"})
            w = pyro.sample("w", dist.Normal(4.0 * c, 1.0))
            pyro.sample("x", dist.Normal(w, 1.0), obs=x)

    def guide(x, mixture=True):
        with batch_plate("data", len(x)):
            pyro.sample("w", dist.Normal(x, 1.0))

    return model, guide


@pytest.mark.parametrize(
    "cls",
    [batchplate.Trace_ELBO, batchplate.TraceGraph_ELBO, batchplate.TraceMeanField_ELBO]
    + [batchplate.RenyiELBO, batchplate.VIMCO, batchplate.ReweightedWakeSleep],
)
def test_strict_enumeration_warning_acts(cls):
    """Pyro's meaning: `True` warns when no latent site is marked for enumeration (these
    objectives sum model-enumerated sites exactly); once, on the first step. Off by
    default; it cannot act under autobatch, so it raises there."""
    model, guide = _mixture_programs()
    x = torch.tensor([0.0, 4.0, 1.0])
    strict = cls(num_particles=2, strict_enumeration_warning=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            strict.loss(model, guide, x, mixture=False)
    messages = [str(w.message) for w in caught if "configured for enumeration" in str(w.message)]
    assert len(messages) == 1 and cls.__name__ in messages[0]
    for objective in (cls(num_particles=2, strict_enumeration_warning=True), cls(num_particles=2)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            objective.loss(model, guide, x)  # enumerated: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cls(num_particles=2).loss(model, guide, x, mixture=False)  # default: silent
    with pytest.raises(ValueError, match="autobatch"):
        cls(num_particles=2, strict_enumeration_warning=True, autobatch=True)
