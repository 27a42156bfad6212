"""Property tests: every way of writing the Conjugate program gives the same ``l``.

The ``[K, B]`` definition is on the Contract page (docs/contract.md).

Layouts: vectorized or sequential batch plate, vectorized particles or one trace
per particle, an inner plate of ``n`` observations per datum; batch sizes 1..6
and 1..5 particles.

- With the exact-posterior guide every layout's ``l[k, b]`` is ``log p(x_b)``.
- With a non-exact guide, the latents of all ``K x B`` (particle, datum) pairs are
  drawn once and fed to each layout's guide (a ``Delta`` at the latent, scored
  under the guide's density), so every layout must give the same ``l`` to float
  tolerance, and the same as ``l`` written by hand from those latents. (Replaying
  a trace with ``poutine.replay`` inside the guide does not work with vectorized
  particles: a replayed site is not broadcast by the particle plate.)
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from batchplate import batch_plate, log_weights
from oracles import conjugate_log_weights
from programs import Conjugate

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)

LAYOUTS = [
    ("vectorized", True),
    ("vectorized", False),
    ("sequential", True),
    ("sequential", False),
]

layouts = st.sampled_from(LAYOUTS)
inner = st.integers(1, 3)
batch_sizes = st.integers(1, 6)
particles = st.integers(1, 5)


def nesting(layout: str, n: int) -> int:
    """The program's own vectorized plate dims: batch plate (if vectorized) + inner plate."""
    return (layout == "vectorized") + (n > 1)


@SETTINGS
@given(layout=layouts, n=inner, B=batch_sizes, K=particles, seed=st.integers(0, 2**16))
def test_exact_guide_every_layout_gives_exact_evidence(layout, n, B, K, seed):
    conj = Conjugate(n=n)
    x = conj.data(B, seed=seed)
    l = log_weights(
        conj.model(layout[0]),
        conj.guide(layout[0]),
        x,
        num_particles=K,
        vectorize_particles=layout[1],
        max_plate_nesting=nesting(layout[0], n),
    )
    assert l.shape == (K, B)
    assert torch.allclose(l, conj.log_evidence(x).expand(K, B), rtol=1e-5, atol=1e-4)


def fixed_latent_guide(conj, layout, vectorize, x, W, shift, widen):
    """The shifted, widened guide of ``conj`` with its draws fixed to ``W[k, b]``:
    ``w = W`` scored under ``q = N(loc_b + shift, r * widen)`` (a ``Delta`` with that
    log density), in the layout's site names and shapes. One call for vectorized
    particles, else one call per particle."""
    K, B = W.shape
    loc, r = conj.posterior(x)
    calls = iter(range(K))

    def site(name, w, b):
        q = dist.Normal(loc[b] + shift, r * widen)
        pyro.sample(name, dist.Delta(w, log_density=q.log_prob(w)))

    def guide(x):
        if vectorize and K > 1:
            # particles in the dim left of the program's plates
            shape = (K,) + (1,) * nesting(layout, conj.n)
            if layout == "vectorized":
                with batch_plate("data", B):
                    site("w", W.reshape(shape[:-1] + (B,)), slice(None))
            else:
                for i in batch_plate("data", B):
                    site(f"w_{i}", W[:, i].reshape(shape), i)
            return
        k = next(calls)
        if layout == "vectorized":
            with batch_plate("data", B):
                site("w", W[k], slice(None))
        else:
            for i in batch_plate("data", B):
                site(f"w_{i}", W[k, i], i)

    return guide


@SETTINGS
@given(
    n=inner,
    B=batch_sizes,
    K=particles,
    shift=st.floats(-1.5, 1.5),
    widen=st.floats(0.5, 2.0),
    seed=st.integers(0, 2**16),
)
def test_same_latents_give_the_same_weights_in_every_layout(n, B, K, shift, widen, seed):
    conj = Conjugate(n=n)
    x = conj.data(B, seed=seed)
    loc, r = conj.posterior(x)
    g = torch.Generator().manual_seed(seed + 1)
    W = loc + shift + r * widen * torch.randn(K, B, generator=g)

    # l by hand: log N(w; m, s) + sum_j log N(x_bj; w, t) - log q(w | x_b).
    expected = conjugate_log_weights(conj, W, x, dist.Normal(loc + shift, r * widen))

    results = {}
    for layout, vectorize in LAYOUTS:
        results[layout, vectorize] = log_weights(
            conj.model(layout),
            fixed_latent_guide(conj, layout, vectorize, x, W, shift, widen),
            x,
            num_particles=K,
            vectorize_particles=vectorize,
            max_plate_nesting=nesting(layout, n),
        )
    reference = results["vectorized", True]
    assert torch.allclose(reference, expected, rtol=1e-5, atol=1e-4)
    for key, l in results.items():
        assert l.shape == (K, B), key
        assert torch.allclose(l, reference, rtol=1e-5, atol=1e-5), key


@SETTINGS
@given(layout=layouts, B=batch_sizes, K=particles, seed=st.integers(0, 2**16))
def test_subsample_scale_never_enters_the_weights(layout, B, K, seed):
    """A subsampled batch plate of any size N >= B gives the same ``l`` as the
    minibatch on its own (the plate's N/B is left to the reduction)."""
    conj = Conjugate()
    N = B + 3
    x = conj.data(N, seed=seed)
    subsample = torch.randperm(N, generator=torch.Generator().manual_seed(seed))[:B]
    kw = dict(
        num_particles=K, vectorize_particles=layout[1], max_plate_nesting=nesting(layout[0], 1)
    )
    pyro.set_rng_seed(seed)
    sub = log_weights(
        conj.model(layout[0], subsample=subsample),
        conj.guide(layout[0], subsample=subsample, shift=0.5),
        x,
        **kw,
    )
    pyro.set_rng_seed(seed)
    alone = log_weights(conj.model(layout[0]), conj.guide(layout[0], shift=0.5), x[subsample], **kw)
    assert torch.allclose(sub, alone, rtol=1e-5, atol=1e-5)
