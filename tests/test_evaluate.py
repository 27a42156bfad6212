"""``log_evidence``: per-datum importance-sampling estimates of ``log p(x_b)``."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from batchplate import batch_plate, log_evidence, log_weights
from oracles import importance_se
from programs import Conjugate

CONJ = Conjugate()
TOL = dict(rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize(
    "layout, vectorize", [("vectorized", True), ("vectorized", False), ("sequential", False)]
)
def test_exact_guide_gives_exact_evidence(layout, vectorize, n):
    conj = Conjugate(n=n)
    B = 5
    x = conj.data(B, seed=n)
    model, guide = conj.model(layout), conj.guide(layout)
    estimate = log_evidence(
        model, guide, x, num_particles=7, chunk_size=3, vectorize_particles=vectorize
    )
    assert estimate.shape == (B,)
    assert not estimate.requires_grad
    assert torch.allclose(estimate, conj.log_evidence(x), **TOL)


def test_chunks_give_the_same_estimate_on_the_same_random_stream():
    """One trace per particle: the random stream does not depend on the chunking, so
    every chunk size gives the same numbers (the streaming logsumexp is exact)."""
    x = CONJ.data(4, seed=1)
    model, guide = CONJ.model("vectorized"), CONJ.guide("vectorized", shift=0.5, widen=1.5)
    results = []
    for chunk_size in (1, 4, 7, 30, 100):
        pyro.set_rng_seed(3)
        results.append(
            log_evidence(
                model, guide, x, num_particles=30, chunk_size=chunk_size, vectorize_particles=False
            )
        )
    for r in results[1:]:
        assert torch.allclose(r, results[0], **TOL)
    # Vectorized particles in chunks of one draw the same stream too.
    pyro.set_rng_seed(3)
    one = log_evidence(model, guide, x, num_particles=30, chunk_size=1, vectorize_particles=True)
    assert torch.allclose(one, results[0], **TOL)


def test_vectorized_chunks_combine_exactly():
    """Chunks of vectorized particles (10, 10, 5) equal the logsumexp of the same
    chunks drawn one by one with ``log_weights``."""
    x = CONJ.data(4, seed=2)
    model, guide = CONJ.model("vectorized"), CONJ.guide("vectorized", shift=0.5, widen=1.5)
    kw = dict(vectorize_particles=True, max_plate_nesting=1)
    pyro.set_rng_seed(4)
    estimate = log_evidence(model, guide, x, num_particles=25, chunk_size=10, **kw)
    pyro.set_rng_seed(4)
    l = torch.cat([log_weights(model, guide, x, num_particles=k, **kw) for k in (10, 10, 5)])
    assert torch.allclose(estimate, torch.logsumexp(l, 0) - math.log(25), **TOL)


def test_memory_is_bounded_by_chunk_size():
    """K = 5000 particles (Burda et al.'s test setting) with chunk_size=100: the guide
    never sees more than 100 particles at once, and the estimate converges."""
    x = CONJ.data(4, seed=5)
    shapes = []

    def guide(x):
        loc, r = CONJ.posterior(x)
        with batch_plate("data", len(x)):
            shapes.append(pyro.sample("w", dist.Normal(loc + 0.5, 1.5 * r)).shape)

    model = CONJ.model("vectorized")
    estimate = log_evidence(model, guide, x, num_particles=5000, chunk_size=100)
    assert estimate.shape == (4,)
    assert max(s[0] for s in shapes if len(s) == 2) == 100
    assert len(shapes) >= 50  # 50 chunks (plus one run to find the plate nesting)


def test_shifted_guide_converges_within_monte_carlo_error():
    """With a shifted, widened guide the K = 5000 estimate is within 4 s.e. of
    ``log p(x_b)``; the s.e. (delta method, ``sd(w) / (sqrt(K) mean(w))``) is
    estimated from an independent set of weights. At K = 2 the estimate is far off,
    so the tolerance has power."""
    B, K = 4, 5000
    x = CONJ.data(B, seed=6)
    exact = CONJ.log_evidence(x).double()
    model, guide = CONJ.model("vectorized"), CONJ.guide("vectorized", shift=0.7, widen=1.6)
    estimate = log_evidence(model, guide, x, num_particles=K, chunk_size=500).double()

    se = importance_se(log_weights(model, guide, x, num_particles=K, vectorize_particles=True))
    assert (se < 0.02).all()
    z = (estimate - exact) / se
    assert (z.abs() <= 4).all(), (estimate, exact, se)

    few = log_evidence(model, guide, x, num_particles=2, chunk_size=2).double()
    # One datum alone could be close by chance; over the batch the error is clear.
    assert ((few - exact) / se).abs().max() > 8


def test_subsampled_chunks_weigh_one_minibatch():
    """Every chunk weighs the same minibatch (the first chunk's), so the estimate
    is that minibatch's evidence."""
    N, B = 10, 3
    x = CONJ.data(N, seed=7)
    record = []

    def guide(x):
        loc, r = CONJ.posterior(x)
        with batch_plate("data", len(x), subsample_size=B) as idx:
            record.append(idx)
            pyro.sample("w", dist.Normal(loc[idx], r))

    model = CONJ.model("vectorized", subsample_size=B)
    for vectorize in (True, False):
        record.clear()
        estimate = log_evidence(
            model, guide, x, num_particles=8, chunk_size=3, vectorize_particles=vectorize
        )
        assert all(torch.equal(r, record[-1]) for r in record[-3:])
        assert torch.allclose(estimate, CONJ.log_evidence(x)[record[-1]], **TOL)


def test_invalid_arguments():
    x = CONJ.data(2)
    model, guide = CONJ.model("vectorized"), CONJ.guide("vectorized")
    with pytest.raises(ValueError, match="positive"):
        log_evidence(model, guide, x, num_particles=0)
    with pytest.raises(ValueError, match="positive"):
        log_evidence(model, guide, x, chunk_size=0)
