"""Jit variants: stock Pyro's Jit objectives (or our uncompiled ones) per datum, same draws.

Several steps each: the first call compiles, the later ones replay the
compiled graph, which must draw the same latents and give the same numbers.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pyro.infer
import pytest
import torch

import batchplate
from batchplate import BatchPlateError, batch_plate

X = torch.tensor([0.5, 2.0, -1.0, 0.3])
JIT = {"ignore_jit_warnings": True}


def programs(plate, discrete: bool = True):
    def model(x):
        p = pyro.param("p", torch.tensor(0.3))
        s = pyro.param("s", torch.tensor(1.0), constraint=dist.constraints.positive)
        with plate("data", len(x)) as idx:
            z = pyro.sample("z", dist.Bernoulli(0.4)) if discrete else 0.0
            w = pyro.sample("w", dist.Normal(2.0 * z + p, 1.0))
            pyro.sample("x", dist.Normal(w, s), obs=x[idx])

    def guide(x):
        a = pyro.param("a", torch.tensor(0.1))
        c = pyro.param("c", torch.tensor(0.5))
        with plate("data", len(x)) as idx:
            xb = x[idx]
            z = pyro.sample("z", dist.Bernoulli(logits=a * xb)) if discrete else 0.0
            pyro.sample("w", dist.Normal(c * xb + z, 1.0))

    return model, guide


def run(objective, plate, steps=3, discrete=True):
    pyro.clear_param_store()
    model, guide = programs(plate, discrete)
    out = []
    for step in range(steps):
        pyro.set_rng_seed(step)
        for name in pyro.get_param_store().keys():
            pyro.param(name).unconstrained().grad = None
        loss = objective.loss_and_grads(model, guide, X)
        params = (pyro.param(n).unconstrained() for n in "acps")
        grads = {
            n: p.grad.clone() for n, p in zip("acps", params, strict=True) if p.grad is not None
        }
        out.append((loss, grads))
    return out


def assert_same(expected, ours, factor=1.0):
    for (loss0, grads0), (loss, grads) in zip(expected, ours, strict=True):
        assert loss == pytest.approx(loss0 / factor, rel=1e-5)
        for name, grad in grads.items():
            assert torch.allclose(grad, grads0[name] / factor, rtol=1e-5, atol=1e-6), name


PAIRS = [
    (pyro.infer.JitTrace_ELBO, batchplate.JitTrace_ELBO, False),
    (pyro.infer.JitTraceGraph_ELBO, batchplate.JitTraceGraph_ELBO, True),
]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("stock_cls, cls, discrete", PAIRS)
def test_equals_stock_jit(stock_cls, cls, discrete, reduction):
    options = {"num_particles": 2, "max_plate_nesting": 1, **JIT}
    stock = run(stock_cls(**options), pyro.plate, discrete=discrete)
    ours = run(cls(reduction=reduction, **options), batch_plate, discrete=discrete)
    assert_same(stock, ours, len(X) if reduction == "mean" else 1)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_meanfield_equals_stock(reduction):
    """Stock's `JitTraceMeanField_ELBO` recompiles on every call (its cache attribute is
    misnamed in Pyro 1.9), so every call draws twice; ours compiles once. The
    compiling call matches stock's Jit, the compiled ones stock's uncompiled."""
    options = {"num_particles": 2, "max_plate_nesting": 1}
    ours = run(
        batchplate.JitTraceMeanField_ELBO(reduction=reduction, **options, **JIT),
        batch_plate,
        discrete=False,
    )
    factor = len(X) if reduction == "mean" else 1
    stock_jit = run(pyro.infer.JitTraceMeanField_ELBO(**options, **JIT), pyro.plate, discrete=False)
    assert_same(stock_jit[:1], ours[:1], factor)
    stock = run(pyro.infer.TraceMeanField_ELBO(**options), pyro.plate, discrete=False)
    assert_same(stock[1:], ours[1:], factor)


@pytest.mark.parametrize(
    "eager, compiled",
    [
        (batchplate.Trace_ELBO, batchplate.JitTrace_ELBO),
        (batchplate.TraceGraph_ELBO, batchplate.JitTraceGraph_ELBO),
        (batchplate.RenyiELBO, batchplate.JitRenyiELBO),
        (batchplate.VIMCO, batchplate.JitVIMCO),
    ],
)
def test_vectorized_particles_equal_uncompiled(eager, compiled):
    options = {"num_particles": 3, "vectorize_particles": True, "max_plate_nesting": 1}
    expected = run(eager(**options), batch_plate)
    # The compiling call runs the program twice (parameter capture, then the trace), as
    # Pyro's does, so its draws differ; the compiled calls after it draw the same.
    assert_same(expected[1:], run(compiled(**options, **JIT), batch_plate)[1:])


def test_jit_keywords_act_or_raise():
    with pytest.raises(ValueError, match="does not compile"):
        batchplate.Trace_ELBO(jit_options={"check_trace": True})
    with pytest.raises(ValueError, match="does not compile"):
        batchplate.RenyiELBO(ignore_jit_warnings=True)
    options = {"time_compilation": True}
    elbo = batchplate.JitTrace_ELBO(jit_options=options, **JIT)
    model, guide = programs(batch_plate)
    elbo.loss_and_grads(model, guide, X)
    (step,) = elbo._steps.values()
    assert step.compiled.compile_time is not None  # jit_options reached pyro.ops.jit


def test_non_finite_weights_are_caught_on_compiled_calls():
    model, guide = programs(batch_plate, discrete=False)
    elbo = batchplate.JitTrace_ELBO(**JIT)
    elbo.loss_and_grads(model, guide, X)  # compiles
    pyro.get_param_store()["s"] = torch.tensor(0.0)  # x's density is now -inf or NaN
    with pytest.raises(BatchPlateError, match="Non-finite log weight"):
        elbo.loss_and_grads(model, guide, X)


def test_frozen_state_is_refused():
    model, _ = programs(batch_plate)

    def guide(x):
        with batch_plate("data", len(x)):
            spec = {"baseline": {"use_decaying_avg_baseline": True}}
            pyro.sample("z", dist.Bernoulli(0.5), infer=spec)
            pyro.sample("w", dist.Normal(0.0, 1.0))

    with pytest.raises(NotImplementedError, match="freeze"):
        batchplate.JitTraceGraph_ELBO(**JIT).loss_and_grads(model, guide, X)

    def seq_model(x):
        for i in batch_plate("data", 10, subsample_size=2):
            pyro.sample(f"x_{i}", dist.Normal(0.0, 1.0), obs=x[i])

    with pytest.raises(BatchPlateError, match="sequential"):
        batchplate.JitTrace_ELBO(**JIT).loss_and_grads(seq_model, lambda x: None, torch.ones(10))


@pytest.mark.parametrize(
    "cls",
    [batchplate.Trace_ELBO, batchplate.TraceGraph_ELBO, batchplate.TraceMeanField_ELBO]
    + [batchplate.RenyiELBO, batchplate.VIMCO],
)
def test_no_sample_sites_is_loss_zero_without_gradient(cls):
    """As stock Pyro (an auxiliary loss on a batch without labels): 0, no gradient."""
    net = torch.nn.Linear(1, 1)

    def model(x):
        pyro.module("net", net)

    def guide(x):
        pass

    stock = pyro.infer.Trace_ELBO().loss_and_grads(model, guide, X)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.1}), cls(num_particles=2))
    assert svi.step(X) == stock == 0.0
    assert net.weight.grad is None
    assert cls(num_particles=2).differentiable_loss(model, guide, X).item() == 0.0
