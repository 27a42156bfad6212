"""`JitTraceEnum_ELBO` and `TraceEnum_ELBO`'s per-datum loss values.

Stock `pyro.infer.JitTraceEnum_ELBO` on the same draws (same seed per step):
the first step compiles, the later ones replay the compiled graph; values and
gradients equal stock's (`reduction="sum"`) or stock's divided by `N`
(`"mean"`). The program mixes model enumeration, guide enumeration, a
score-function site, a reparameterized latent and an inner plate.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pyro.infer as pi
import pytest
import torch

import batchplate
from batchplate import BatchPlateError, batch_plate
from test_enum import PARAMS, X, enum_programs

JIT = {"ignore_jit_warnings": True, "max_plate_nesting": 2}
JIT_ONLY = {"ignore_jit_warnings": True}


def run(objective, plate, steps=3):
    pyro.clear_param_store()
    model, guide = enum_programs(plate)
    out = []
    for step in range(steps):
        pyro.set_rng_seed(step)
        for name in pyro.get_param_store().keys():
            pyro.param(name).unconstrained().grad = None
        loss = objective.loss_and_grads(model, guide, X)
        grads = [pyro.param(n).unconstrained().grad.clone() for n in PARAMS]
        out.append((loss, grads))
    return out


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("num_particles", [1, 2])
def test_jit_trace_enum_elbo_equals_stock_jit(reduction, num_particles):
    options = {"num_particles": num_particles, "vectorize_particles": num_particles > 1, **JIT}
    stock = run(pi.JitTraceEnum_ELBO(**options), pyro.plate)
    ours = run(batchplate.JitTraceEnum_ELBO(reduction=reduction, **options), batch_plate)
    factor = len(X) if reduction == "mean" else 1
    for (s_loss, s_grads), (loss, grads) in zip(stock, ours, strict=True):
        assert loss == pytest.approx(s_loss / factor, rel=1e-5)
        for s_grad, grad in zip(s_grads, grads, strict=True):
            assert torch.allclose(grad, s_grad / factor, rtol=1e-5, atol=1e-6)


def test_jit_trace_enum_elbo_equals_uncompiled_and_guesses_nesting():
    """Without `max_plate_nesting` it is guessed (2) by one uncompiled run, which draws
    random numbers of its own: from the second step on, the same numbers as the
    uncompiled objective (the compiled graph replayed)."""
    elbo = batchplate.JitTraceEnum_ELBO(ignore_jit_warnings=True)
    compiled = run(elbo, batch_plate)
    assert elbo.max_plate_nesting == 2
    plain = run(batchplate.TraceEnum_ELBO(max_plate_nesting=2), batch_plate)
    for (loss0, grads0), (loss, grads) in zip(plain[1:], compiled[1:], strict=True):
        assert loss == pytest.approx(loss0, rel=1e-6)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads0, grads, strict=True))


def test_jit_options_refused_without_jit_and_honoured_with_it():
    with pytest.raises(ValueError, match="does not compile"):
        batchplate.TraceEnum_ELBO(jit_options={"time_compilation": True})
    elbo = batchplate.JitTraceEnum_ELBO(jit_options={"time_compilation": True}, **JIT)
    run(elbo, batch_plate, steps=1)
    (step,) = elbo._steps.values()
    assert step.compiled.compile_time is not None  # jit_options reached pyro.ops.jit


def nan_datum_programs():
    def model(x):
        with batch_plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(torch.tensor([0.5, 0.5])))
            pyro.sample("x", dist.Normal(torch.tensor([0.0, 1.0])[z], 1.0), obs=x)

    return pi.config_enumerate(model), lambda x: None


@pytest.mark.parametrize(
    "cls, named",
    [(batchplate.TraceEnum_ELBO, r"at data \[2\]"), (batchplate.JitTraceEnum_ELBO, r"at datum 2 ")],
)
def test_non_finite_datum_is_named(cls, named):
    """An infinite observation's datum is named by its per-datum value (datum 2)."""
    model, guide = nan_datum_programs()
    options = JIT_ONLY if cls is batchplate.JitTraceEnum_ELBO else {}
    x = torch.tensor([0.0, 1.0, math.inf, 0.5])
    with pyro.validation_enabled(False), pytest.raises(BatchPlateError, match=named):
        cls(max_plate_nesting=1, **options).loss_and_grads(model, guide, x)
