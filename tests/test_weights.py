"""The ``[K, B]`` per-datum log weights in every program layout.

Contract page (docs/contract.md), the ``[K, B]`` definition. Ground truth never
comes from batchplate (exact values from ``oracles.py``):

- with the exact posterior as guide, ``l[k, b] = log p(x_b)`` for every particle
  (the Conjugate model's closed-form evidence), so every objective's per-datum
  value is ``log p(x_b)`` for every ``K``;
- with user masks and scales, ``l`` is written by hand from the latent values
  the guide drew (recorded by the guide itself);
- with a non-exact guide, layouts are compared with each other within Monte
  Carlo standard errors, and the geometric program of Pyro issue #2220 against
  its exact evidence.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import batchplate
from batchplate import BatchPlateError, batch_plate, log_weights
from oracles import conjugate_log_weights, geometric_iwae_se, geometric_log_evidence, mc
from programs import Conjugate, geometric_guide, geometric_model

CONJ = Conjugate()
TOL = dict(rtol=1e-5, atol=1e-4)

# (plate layout, vectorize_particles): every way to write a static program.
LAYOUTS = [
    ("vectorized", True),
    ("vectorized", False),
    ("sequential", False),
    ("sequential", True),
]


def per_datum(objective, model, guide, *args):
    """``(L_b, l)`` from one draw of the objective's particles."""
    weights = objective.weigh(model, guide, args, {})
    return objective.per_datum(weights)[0], weights.log_w


def objectives(K, vectorize, **kw):
    """The per-datum objectives whose value is ``log p(x_b)`` under the exact guide."""
    kw = dict(num_particles=K, vectorize_particles=vectorize, **kw)
    return {
        "iwae": batchplate.RenyiELBO(alpha=0, **kw),
        "renyi_0.5": batchplate.RenyiELBO(alpha=0.5, **kw),
        "elbo": batchplate.Trace_ELBO(**kw),
    }


# ---------------------------------------------------------------------------
# Exact posterior guide: zero variance, l == log p(x_b)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3], ids=["n1", "inner3"])
@pytest.mark.parametrize("K", [1, 3, 7])
@pytest.mark.parametrize("layout, vectorize", LAYOUTS)
def test_exact_guide_gives_exact_evidence(layout, vectorize, K, n):
    conj = Conjugate(n=n)
    B = 4
    x = conj.data(B, seed=K)
    exact = conj.log_evidence(x)
    model, guide = conj.model(layout), conj.guide(layout)

    l = log_weights(model, guide, x, num_particles=K, vectorize_particles=vectorize)
    assert l.shape == (K, B)
    assert torch.allclose(l, exact.expand(K, B), **TOL)

    for name, objective in objectives(K, vectorize).items():
        value, l = per_datum(objective, model, guide, x)
        assert value.shape == (B,), name
        assert torch.allclose(value, exact, **TOL), name
        assert torch.allclose(l, exact.expand(K, B), **TOL), name
        # reduction="mean": the loss is minus the batch average.
        assert math.isclose(objective.loss(model, guide, x), -exact.mean().item(), abs_tol=1e-4)


# ---------------------------------------------------------------------------
# User poutine.scale and poutine.mask keep their meaning
# ---------------------------------------------------------------------------


def recorded_latents(record, layout, vectorize, K, B):
    """The guide's draws as ``[K, B]``."""
    if not vectorize:  # one trace per particle, data in order
        return torch.stack(record).reshape(K, B)
    if layout == "vectorized":  # one [K, B] draw
        return record[0].reshape(K, B)
    return torch.stack([r.reshape(K) for r in record], 1)  # B draws of [K]


@pytest.mark.parametrize("layout, vectorize", LAYOUTS)
@pytest.mark.parametrize("what", ["scale", "mask", "scale+mask"])
def test_user_scale_and_mask(layout, vectorize, what):
    K, B = 3, 4
    x = CONJ.data(B, seed=5)
    scale = 2.5 if "scale" in what else 1.0
    mask = torch.tensor([True, False, True, True]) if "mask" in what else None
    record = []
    model, guide = CONJ.scaled_masked_programs(layout, record, scale=scale, mask=mask)
    iwae = batchplate.RenyiELBO(
        alpha=0, num_particles=K, vectorize_particles=vectorize, max_plate_nesting=1
    )
    value, l = per_datum(iwae, model, guide, x)
    w = recorded_latents(record, layout, vectorize, K, B)
    expected = conjugate_log_weights(CONJ, w, x, dist.Normal(*CONJ.posterior(x)), scale, mask)
    assert torch.allclose(l, expected, **TOL)
    assert torch.allclose(value, torch.logsumexp(expected, 0) - math.log(K), **TOL)
    if mask is not None:
        # The masked datum drops its observation term: l = log p(w) - log q(w).
        loc, r = CONJ.posterior(x[1])
        prior_only = dist.Normal(CONJ.m, CONJ.s).log_prob(w[:, 1]) - dist.Normal(loc, r).log_prob(
            w[:, 1]
        )
        assert torch.allclose(l[:, 1], prior_only, **TOL)
    if what == "mask":  # the unmasked data keep their exact evidence
        keep = mask.nonzero().flatten()
        assert torch.allclose(l[:, keep], CONJ.log_evidence(x[keep]).expand(K, -1), **TOL)


# ---------------------------------------------------------------------------
# Subsampling: N/B enters the "sum" reduction once, never l
# ---------------------------------------------------------------------------


def recording_conj_programs(layout, record, **plate_kwargs):
    """Conjugate model and exact guide; the guide records the minibatch indices."""

    def guide(x):
        loc, r = CONJ.posterior(x)
        if layout == "vectorized":
            with batch_plate("data", len(x), **plate_kwargs) as idx:
                record.append(idx)
                pyro.sample("w", dist.Normal(loc[idx], r))
        else:
            seen = []
            for i in batch_plate("data", len(x), **plate_kwargs):
                seen.append(i)
                pyro.sample(f"w_{i}", dist.Normal(loc[i], r))
            record.append(torch.tensor(seen))

    return CONJ.model(layout, **plate_kwargs), guide


SUBSAMPLE_CASES = [
    pytest.param({"subsample_size": 3}, id="subsample_size"),
    pytest.param({"subsample": torch.tensor([7, 2, 5])}, id="subsample"),
]


@pytest.mark.parametrize("plate_kwargs", SUBSAMPLE_CASES)
@pytest.mark.parametrize("layout, vectorize", LAYOUTS)
def test_subsampled_weights_and_reductions(layout, vectorize, plate_kwargs):
    N, B, K = 10, 3, 4
    x = CONJ.data(N, seed=6)
    exact = CONJ.log_evidence(x)
    record = []
    model, guide = recording_conj_programs(layout, record, **plate_kwargs)
    kw = dict(num_particles=K, vectorize_particles=vectorize, max_plate_nesting=1)

    objective = batchplate.RenyiELBO(alpha=0, **kw)
    weights = objective.weigh(model, guide, (x,), {})
    # Every particle of a datum sees the same minibatch (one subsample per step).
    idx = record[0]
    assert all(torch.equal(r, idx) for r in record), record
    if "subsample" in plate_kwargs:
        assert torch.equal(idx, plate_kwargs["subsample"])
    # No N/B in l: each column is that datum's evidence.
    assert torch.allclose(weights.log_w, exact[idx].expand(K, B), **TOL)
    assert weights.batch.subsample_scale == N / B

    for name, make in [("iwae", batchplate.RenyiELBO), ("elbo", batchplate.Trace_ELBO)]:
        extra = {"alpha": 0} if name == "iwae" else {}
        for reduction in ("mean", "sum"):
            record.clear()
            loss = make(reduction=reduction, **extra, **kw).loss(model, guide, x)
            used = exact[record[0]]  # this step's minibatch
            expected = used.mean() if reduction == "mean" else N / B * used.sum()
            assert math.isclose(loss, -expected.item(), rel_tol=1e-5), (name, reduction)


@pytest.mark.parametrize("layout, vectorize", [("vectorized", True), ("sequential", False)])
def test_subsampled_sum_estimates_full_data_sum(layout, vectorize):
    """Over many random minibatches, ``reduction="sum"`` is an unbiased estimate of
    the whole-dataset sum ``sum_n log p(x_n)``; ``"mean"`` of the dataset average."""
    N, B, K, draws = 12, 3, 2, 200 if layout == "vectorized" else 80
    x = CONJ.data(N, seed=7)
    exact = CONJ.log_evidence(x).double()
    model, guide = CONJ.model(layout, subsample_size=B), CONJ.guide(layout, subsample_size=B)
    kw = dict(num_particles=K, vectorize_particles=vectorize, max_plate_nesting=1)
    for reduction, target in [("sum", exact.sum()), ("mean", exact.mean())]:
        objective = batchplate.RenyiELBO(alpha=0, reduction=reduction, **kw)
        values = -torch.tensor([objective.loss(model, guide, x) for _ in range(draws)]).double()
        mean, se = mc(values)
        assert se > 0  # minibatches differ, so the estimate varies
        assert abs(mean - target) <= 4 * se, (reduction, mean, target, se)
        # Power: the estimate without N/B (or with it twice) is far away.
        if reduction == "sum":
            assert abs(mean * B / N - target) > 8 * se


# ---------------------------------------------------------------------------
# Non-exact guide: layouts agree within Monte Carlo error
# ---------------------------------------------------------------------------


def test_layouts_agree_with_non_exact_guide():
    """IWAE (K=3) and ELBO per-datum values of a shifted, widened guide have the same
    distribution in every layout. Replicates: the B data repeated R times; IWAE and
    ELBO are computed from the same draws, so their difference is paired."""
    B, K = 3, 3
    x = CONJ.data(B, seed=8)
    exact = CONJ.log_evidence(x).double()
    runs = {
        ("vectorized", True): 2000,
        ("vectorized", False): 200,
        ("sequential", False): 100,
    }
    iwae = batchplate.RenyiELBO(alpha=0, num_particles=K)
    elbo = batchplate.Trace_ELBO(num_particles=K)
    results = {}
    for (layout, vectorize), R in runs.items():
        model = CONJ.model(layout)
        guide = CONJ.guide(layout, shift=0.6, widen=1.5)
        objective = batchplate.RenyiELBO(alpha=0, num_particles=K, vectorize_particles=vectorize)
        weights = objective.weigh(model, guide, (x.repeat(R),), {})
        for name, values in [
            ("iwae", iwae.per_datum(weights)[0]),
            ("elbo", elbo.per_datum(weights)[0]),
            ("gap", iwae.per_datum(weights)[0] - elbo.per_datum(weights)[0]),
        ]:
            values = values.double().reshape(R, B)
            results[name, layout, vectorize] = mc(values)
    for name in ("iwae", "elbo"):
        ref_mean, ref_se = results[name, "vectorized", True]
        # The guide is not exact: the bound is visibly below log p(x_b).
        assert ((exact - ref_mean) / ref_se).min() > 8, name
        for key, (mean, se) in results.items():
            if key[0] != name:
                continue
            z = (mean - ref_mean) / torch.sqrt(se**2 + ref_se**2)
            assert (z.abs() <= 4).all(), (key, mean, ref_mean, z)
    # IWAE at K=3 is tighter than the ELBO in every layout (paired difference).
    for key in runs:
        gap, se = results[("gap", *key)]
        assert (gap / se).min() > 4, (key, gap, se)


# ---------------------------------------------------------------------------
# Stock pyro.infer.RenyiELBO, for the record
# ---------------------------------------------------------------------------


def test_stock_renyi_vectorized_is_batch_sum():
    """With pyro.plate and vectorized particles stock RenyiELBO keeps the batch dim, so
    its value is per datum too, but summed: ``-sum_b log p(x_b)``, B x our loss."""
    B, K = 5, 4
    x = CONJ.data(B, seed=9)
    exact = CONJ.log_evidence(x)
    kw = dict(num_particles=K, vectorize_particles=True, max_plate_nesting=1)
    stock = pyro.infer.RenyiELBO(alpha=0, **kw).loss(
        CONJ.model("vectorized", plate=pyro.plate), CONJ.guide("vectorized", plate=pyro.plate), x
    )
    ours = batchplate.RenyiELBO(alpha=0, **kw).loss(
        CONJ.model("vectorized"), CONJ.guide("vectorized"), x
    )
    assert math.isclose(stock, -exact.sum().item(), rel_tol=1e-5)
    assert math.isclose(stock, B * ours, rel_tol=1e-5)


def test_stock_renyi_sequential_is_joint_and_looser():
    """With a sequential pyro.plate stock RenyiELBO sums the batch into one joint
    weight before the logsumexp, ``log mean_k exp(sum_b l[k, b])``: on the same
    draws that is a different number than ``sum_b log mean_k exp l[k, b]``, and in
    expectation a looser bound."""
    B, K = 4, 3
    x = CONJ.data(B, seed=10)
    shift, widen = 0.6, 1.5

    def recording_guide(record, plate):
        loc, r = CONJ.posterior(x)

        def guide(x):
            for i in plate("data", len(x)):
                record.append(pyro.sample(f"w_{i}", dist.Normal(loc[i] + shift, r * widen)))

        return guide

    def hand_l(record):
        w = torch.stack(record).reshape(K, B)
        loc, r = CONJ.posterior(x)
        return conjugate_log_weights(CONJ, w, x, dist.Normal(loc + shift, r * widen))

    stock = pyro.infer.RenyiELBO(alpha=0, num_particles=K)
    ours = batchplate.RenyiELBO(alpha=0, num_particles=K, reduction="sum")
    model_stock, model_ours = CONJ.model("sequential", plate=pyro.plate), CONJ.model("sequential")

    # Same draws, exact formulas.
    record = []
    stock_value = -stock.loss(model_stock, recording_guide(record, pyro.plate), x)
    l = hand_l(record)
    assert math.isclose(
        stock_value, (torch.logsumexp(l.sum(1), 0) - math.log(K)).item(), rel_tol=1e-5
    )
    record = []
    ours_value = -ours.loss(model_ours, recording_guide(record, batch_plate), x)
    l = hand_l(record)
    expected = (torch.logsumexp(l, 0) - math.log(K)).sum()
    assert math.isclose(ours_value, expected.item(), rel_tol=1e-5)

    # In expectation the joint bound is looser (further below sum_b log p(x_b)).
    # Many cheap replicates: vectorized particles, which stock treats the same way
    # on a sequential plate (the joint weight). A worse guide and more data widen
    # the gap (about 6 nats here, sd about 6 per replicate pair).
    B, K, R = 8, 4, 60
    x = CONJ.data(B, seed=11)
    guide_stock = CONJ.guide("sequential", plate=pyro.plate, shift=1.0, widen=2.0)
    guide_ours = CONJ.guide("sequential", shift=1.0, widen=2.0)
    kw = dict(num_particles=K, vectorize_particles=True, max_plate_nesting=0)
    stock = pyro.infer.RenyiELBO(alpha=0, **kw)
    ours = batchplate.RenyiELBO(alpha=0, reduction="sum", **kw)
    s = -torch.tensor([stock.loss(model_stock, guide_stock, x) for _ in range(R)]).double()
    o = -torch.tensor([ours.loss(model_ours, guide_ours, x) for _ in range(R)]).double()
    diff, se = o.mean() - s.mean(), torch.sqrt(o.var() / R + s.var() / R)
    assert diff > 4 * se, (o.mean(), s.mean(), se)
    assert o.mean() < CONJ.log_evidence(x).sum()  # ours is still a lower bound


# ---------------------------------------------------------------------------
# The geometric program of Pyro issue #2220 (dynamic structure, sequential plate)
# ---------------------------------------------------------------------------


def test_geometric_iwae_approaches_exact_evidence():
    """Guide = prior, model logits 0: ``w = p(obs_b | g) in {0.99, 0.01}`` with
    ``P(g = o_b) = 0.5^(o_b + 1)``, so the per-datum IWAE estimate at K=200 is
    ``log p(obs_b)`` up to a Monte Carlo error known in closed form (delta method:
    sd ``sqrt(Var w / K) / p``)."""
    obs = torch.tensor([0.0, 1.0, 2.0, 3.0])
    K = 200
    exact = geometric_log_evidence(obs).double()
    se = geometric_iwae_se(obs, K)
    iwae = batchplate.RenyiELBO(alpha=0, num_particles=K, vectorize_particles=False)
    weights = iwae.weigh(geometric_model, geometric_guide, (obs,), {})
    value = iwae.per_datum(weights)[0].double()
    assert torch.allclose(value, torch.logsumexp(weights.log_w.double(), 0) - math.log(K))
    z = (value - exact) / se
    assert (z.abs() <= 4).all(), (value, exact, se)
    # Power: the joint (stock-style) bound of all data at once is far from sum_b log p.
    joint = torch.logsumexp(weights.log_w.sum(1), 0) - math.log(K)
    assert exact.sum() - joint > 4 * torch.sqrt((se**2).sum())


def test_dynamic_program_under_vectorized_particles_errors():
    obs = torch.tensor([0.0, 2.0])
    for objective in [
        batchplate.RenyiELBO(alpha=0, num_particles=3, vectorize_particles=True),
        batchplate.Trace_ELBO(num_particles=3, vectorize_particles=True),
    ]:
        with pytest.raises(BatchPlateError, match="vectorize_particles=False"):
            objective.loss(geometric_model, geometric_guide, obs)
    with pytest.raises(BatchPlateError, match="padded"):
        log_weights(
            geometric_model, geometric_guide, obs, num_particles=3, vectorize_particles=True
        )
    # The same program with one trace per particle works.
    l = log_weights(geometric_model, geometric_guide, obs, num_particles=3)
    assert l.shape == (3, 2) and torch.isfinite(l).all()
