"""Reweighted wake-sleep per datum (issue 3): exact values, gradients, sleep, learning.

Exact values come from the conjugate Gaussian (docs/contract.md): with the
exact posterior as guide every log weight equals ``log p(x_b)``, so the wake-theta
loss is ``-mean_b log p(x_b)`` for any ``K`` and any way of writing the program.
Statistical checks use fixed seeds and tolerances of a few Monte Carlo
standard errors, measured from replicates.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from batchplate import BatchPlateError, ReweightedWakeSleep, batch_plate
from batchplate.examples import scale
from programs import Conjugate

torch.set_num_threads(1)

EXACT = scale.Posterior.exact()  # a = 0.64, c = 3.06, scale = 0.6

# -- wake-theta at the exact posterior ----------------------------------------

# (layout, vectorize_particles, observations per datum, subsample, reduction)
WAKE_CASES = {
    "vectorized-plate-vectorized-particles": ("vectorized", True, 1, False, "mean"),
    "vectorized-plate-per-particle-traces": ("vectorized", False, 1, False, "mean"),
    "sequential-plate": ("sequential", False, 1, False, "mean"),
    "inner-plate-vectorized": ("vectorized", True, 3, False, "mean"),
    "inner-plate-sequential": ("sequential", False, 3, False, "mean"),
    "subsample-mean": ("vectorized", True, 1, True, "mean"),
    "subsample-sum": ("vectorized", True, 1, True, "sum"),
    "subsample-sequential-sum": ("sequential", False, 1, True, "sum"),
}


@pytest.mark.parametrize("K", [2, 4])
@pytest.mark.parametrize("case", list(WAKE_CASES))
def test_wake_theta_equals_log_evidence_at_exact_posterior(case, K):
    layout, vectorize, n, subsample, reduction = WAKE_CASES[case]
    problem = Conjugate(n=n)
    N = 12
    x = problem.data(N, seed=1)
    kwargs = {}
    idx = torch.arange(N)
    if subsample:
        idx = torch.tensor([7, 2, 9, 0, 4])
        kwargs["subsample"] = idx
    objective = ReweightedWakeSleep(
        num_particles=K, vectorize_particles=vectorize, reduction=reduction
    )
    wake_theta, phi = objective.losses(
        problem.model(layout, **kwargs), problem.guide(layout, **kwargs), x
    )
    log_p = problem.log_evidence(x[idx])
    scale_ = 1.0 if reduction == "mean" else N / len(idx)
    expected = -(log_p.mean() if reduction == "mean" else scale_ * log_p.sum())
    assert wake_theta.item() == pytest.approx(expected.item(), abs=1e-4 * scale_)
    assert torch.isfinite(phi)


def test_one_particle_is_refused_with_a_clear_error():
    # Self-normalized weights need K >= 2 (Pyro asserts the same).
    with pytest.raises(ValueError, match="num_particles >= 2"):
        ReweightedWakeSleep(num_particles=1)


# -- wake-phi gradient ---------------------------------------------------------


def _param_guide(a0: float, c0: float, scale0: float):
    """The scale example's amortized guide ``N(a x + c, scale)``, starting at given values."""

    def guide(x):
        a = pyro.param("a", torch.tensor(a0))
        c = pyro.param("c", torch.tensor(c0))
        log_scale = pyro.param("log_scale", torch.tensor(math.log(scale0)))
        with batch_plate("data", len(x)):
            pyro.sample("w", dist.Normal(a * x + c, log_scale.exp()))

    return guide


def _phi_gradients(guide, replicates: int, K: int = 4, B: int = 10) -> torch.Tensor:
    """``[replicates, 3]`` wake-phi gradients w.r.t. ``(a, c, log_scale)``."""
    problem = Conjugate()
    model = problem.model("vectorized")
    objective = ReweightedWakeSleep(num_particles=K, max_plate_nesting=1)
    x = problem.data(B, seed=2)
    rows = []
    for _ in range(replicates):
        _, phi = objective.losses(model, guide, x)
        params = [pyro.param(n).unconstrained() for n in ("a", "c", "log_scale")]
        rows.append(torch.stack(torch.autograd.grad(phi, params)))
    return torch.stack(rows)


def test_wake_phi_gradient_is_zero_in_expectation_at_exact_posterior():
    grads = _phi_gradients(_param_guide(EXACT.a, EXACT.c, EXACT.scale), replicates=300)
    mean, se = grads.mean(0), grads.std(0) / math.sqrt(len(grads))
    assert (se > 0).all()  # the estimator does vary: the check is not vacuous
    assert (mean.abs() < 4 * se).all(), (mean, se)


def test_wake_phi_gradient_points_back_to_the_posterior_at_a_wrong_guide():
    # Guide mean 1 too high: descent must lower c (positive gradient of the loss).
    grads = _phi_gradients(_param_guide(EXACT.a, EXACT.c + 1.0, EXACT.scale), replicates=150)
    mean, se = grads.mean(0), grads.std(0) / math.sqrt(len(grads))
    assert mean[1] > 5 * se[1], (mean, se)
    # ...and widen q, since p's mass sits in q's tail (negative gradient on log scale).
    assert mean[2] < -5 * se[2], (mean, se)
    pyro.clear_param_store()
    # Guide twice too wide: descent must shrink the scale.
    grads = _phi_gradients(_param_guide(EXACT.a, EXACT.c, 2 * EXACT.scale), replicates=150)
    mean, se = grads.mean(0), grads.std(0) / math.sqrt(len(grads))
    assert mean[2] > 5 * se[2], (mean, se)


# -- sleep-phi -----------------------------------------------------------------


class Spy:
    """The scale example's vectorized model and guide, recording what they see."""

    def __init__(self):
        self.model_draws: list[dict] = []
        self.guide_calls: list[dict] = []

    def model(self, observations=None, size=None, subsample=None):
        x = observations["measurement"]
        with batch_plate("data", size or x.shape[-1], subsample=subsample):
            w = pyro.sample("weight", dist.Normal(scale.GUESS, scale.GUESS_SCALE))
            m = pyro.sample("measurement", dist.Normal(w, scale.OBS_SCALE), obs=x)
        self.model_draws.append({"weight": w, "measurement": m})

    def guide(self, observations=None, size=None, subsample=None):
        x = observations["measurement"]
        a, c, s = scale.guide_params()
        with batch_plate("data", size or x.shape[-1], subsample=subsample):
            w = pyro.sample("weight", dist.Normal(a * x + c, s))
        self.guide_calls.append({"x": x, "weight": w, "a": a, "c": c, "scale": s})


@pytest.mark.parametrize("subsample", [False, True])
def test_sleep_phi_draws_fantasies_per_datum_slot_and_scores_the_guide_on_them(subsample):
    spy = Spy()
    S, N = 3, 8
    data = scale.make_dataset(N)
    kwargs = {"size": N, "subsample": torch.tensor([5, 1, 6, 2])} if subsample else {}
    x = data[kwargs["subsample"]] if subsample else data
    B = len(x)
    pyro.param("a", torch.tensor(0.5))
    pyro.param("c", torch.tensor(4.0))
    pyro.param("log_scale", torch.tensor(-0.3))
    objective = ReweightedWakeSleep(
        num_particles=S, insomnia=0.0, model_has_params=False, max_plate_nesting=1
    )
    pyro.set_rng_seed(123)
    wake_theta, phi = objective.losses(
        spy.model, spy.guide, observations={"measurement": x}, **kwargs
    )
    assert math.isnan(wake_theta.item())  # the wake phase was skipped
    (draw,) = spy.model_draws
    (call,) = spy.guide_calls
    # One fantasy (z, x) per datum slot and sleep particle, handed to the guide.
    assert call["x"].shape == (S, B)
    assert torch.equal(call["x"], draw["measurement"])
    assert torch.equal(call["weight"], draw["weight"])
    assert not torch.equal(call["x"][0], x)  # fantasies, not the real data
    assert call["x"].unique().numel() == S * B
    # By hand, with the same seed: (z, x) ~ p, then -mean log q(z | x).
    pyro.set_rng_seed(123)
    z = dist.Normal(torch.tensor(scale.GUESS), scale.GUESS_SCALE).expand([S, B]).sample()
    fantasy = dist.Normal(z, scale.OBS_SCALE).sample()
    assert torch.equal(z, draw["weight"]) and torch.equal(fantasy, draw["measurement"])
    a, c, s = 0.5, 4.0, math.exp(-0.3)
    expected = -dist.Normal(a * fantasy + c, s).log_prob(z).mean()
    assert phi.item() == pytest.approx(expected.item(), rel=1e-6)


def test_sleep_phi_sequential_plate_one_trace_per_particle():
    S, B = 3, 4
    x = scale.make_dataset(B)
    calls = []

    def guide(observations=None, size=None, subsample=None, learn_prior=False):
        calls.append(dict(observations))
        scale.sequential_guide(observations, size, subsample, learn_prior)

    pyro.param("a", torch.tensor(0.5))
    pyro.param("c", torch.tensor(4.0))
    pyro.param("log_scale", torch.tensor(-0.3))
    objective = ReweightedWakeSleep(
        num_particles=S, insomnia=0.0, model_has_params=False, vectorize_particles=False
    )
    pyro.set_rng_seed(7)
    _, phi = objective.losses(
        scale.sequential_model, guide, observations=scale.observations_of(x, "sequential")
    )
    assert len(calls) == S
    assert all(sorted(obs) == [f"measurement_{b}" for b in range(B)] for obs in calls)
    # By hand: each particle fantasizes (z_b, x_b) datum by datum, in program order.
    pyro.set_rng_seed(7)
    terms = []
    for obs in calls:
        for b in range(B):
            z = dist.Normal(torch.tensor(scale.GUESS), scale.GUESS_SCALE).sample()
            xb = dist.Normal(z, scale.OBS_SCALE).sample()
            assert torch.equal(xb, obs[f"measurement_{b}"])
            terms.append(dist.Normal(0.5 * xb + 4.0, math.exp(-0.3)).log_prob(z))
    assert phi.item() == pytest.approx(-torch.stack(terms).mean().item(), rel=1e-5)


def test_wake_losses_by_hand_with_an_inexact_guide():
    # Per-datum normalization matters once weights differ between data:
    # recompute both wake losses from the recorded particles.
    spy = Spy()
    N, K = 30, 5
    data = scale.make_dataset(N)
    idx = torch.tensor([3, 17, 8, 25])
    x = data[idx]
    pyro.param("a", torch.tensor(0.3))
    pyro.param("c", torch.tensor(5.0))
    pyro.param("log_scale", torch.tensor(0.4))
    objective = ReweightedWakeSleep(num_particles=K, max_plate_nesting=1, reduction="sum")
    theta, phi = objective.losses(
        spy.model, spy.guide, observations={"measurement": x}, size=N, subsample=idx
    )
    (call,) = spy.guide_calls
    z = call["weight"]
    assert z.shape == (K, len(idx))
    log_q = dist.Normal(0.3 * x + 5.0, math.exp(0.4)).log_prob(z)
    log_p = dist.Normal(scale.GUESS, scale.GUESS_SCALE).log_prob(z) + dist.Normal(
        z, scale.OBS_SCALE
    ).log_prob(x)
    log_w = log_p - log_q
    per_datum_iwae = torch.logsumexp(log_w, 0) - math.log(K)
    weights = torch.softmax(log_w, 0)  # over particles, for each datum separately
    assert theta.item() == pytest.approx(-(N / len(idx)) * per_datum_iwae.sum().item(), rel=1e-5)
    expected_phi = -(N / len(idx)) * (weights * log_q).sum(0).sum()
    assert phi.item() == pytest.approx(expected_phi.item(), rel=1e-5)
    # The joint-batch normalization of stock Pyro gives a different number here.
    joint = torch.softmax(log_w.sum(1), 0)[:, None]
    assert phi.item() != pytest.approx(-(N / len(idx)) * (joint * log_q).sum().item(), rel=1e-2)


# -- insomnia ------------------------------------------------------------------


@pytest.mark.parametrize("insomnia", [0.3, 0.5])
def test_insomnia_mixes_wake_and_sleep_phi(insomnia):
    data = scale.make_dataset(20)
    kwargs = {"observations": {"measurement": data[:6]}, "size": 20, "subsample": torch.arange(6)}
    results = {}
    for lam in (insomnia, 1.0, 0.0):
        pyro.clear_param_store()
        pyro.param("a", torch.tensor(0.3))
        pyro.param("c", torch.tensor(2.0))
        pyro.param("log_scale", torch.tensor(0.2))
        objective = ReweightedWakeSleep(num_particles=4, insomnia=lam, max_plate_nesting=1)
        # Same seed: the wake phase runs first in all three (model_has_params), so
        # the wake draws, and then the sleep draws, are the same random numbers.
        pyro.set_rng_seed(11)
        theta, phi = objective.losses(scale.model, scale.guide, **kwargs)
        params = [pyro.param(n).unconstrained() for n in ("a", "c", "log_scale")]
        results[lam] = theta, phi, torch.stack(torch.autograd.grad(phi, params))
    theta, phi, grad = results[insomnia]
    _, wake, wake_grad = results[1.0]
    _, sleep, sleep_grad = results[0.0]
    assert wake.item() != pytest.approx(sleep.item(), rel=1e-2)  # the mix is informative
    assert phi.item() == pytest.approx((insomnia * wake + (1 - insomnia) * sleep).item(), rel=1e-5)
    mixed = insomnia * wake_grad + (1 - insomnia) * sleep_grad
    assert torch.allclose(grad, mixed, rtol=1e-5, atol=1e-5)
    assert theta.item() == pytest.approx(results[1.0][0].item(), rel=1e-6)


# -- stock Pyro ----------------------------------------------------------------


def test_stock_pyro_wake_theta_is_batch_size_times_ours():
    problem = Conjugate()
    B = 10
    x = problem.data(B, seed=3)
    stock = pyro.infer.ReweightedWakeSleep(num_particles=4, max_plate_nesting=1)
    stock_theta, _ = stock.loss(
        problem.model("vectorized", plate=pyro.plate),
        problem.guide("vectorized", plate=pyro.plate),
        x,
    )
    ours, _ = ReweightedWakeSleep(num_particles=4).loss(
        problem.model("vectorized"), problem.guide("vectorized"), x
    )
    exact = -problem.log_evidence(x).mean().item()
    assert ours == pytest.approx(exact, abs=1e-4)
    assert float(stock_theta) == pytest.approx(B * exact, rel=1e-5)


# -- SVI -----------------------------------------------------------------------


def test_works_under_svi_and_returns_a_pair():
    data = scale.make_dataset(50)
    objective = ReweightedWakeSleep(num_particles=3, insomnia=0.5, max_plate_nesting=1)
    svi = pyro.infer.SVI(scale.model, scale.guide, pyro.optim.Adam({"lr": 0.1}), objective)
    kwargs = {"observations": {"measurement": data[:10]}, "size": 50, "subsample": torch.arange(10)}
    for _ in range(3):
        losses = svi.step(learn_prior=True, **kwargs)
    assert isinstance(losses, tuple) and len(losses) == 2
    assert all(isinstance(v, float) and math.isfinite(v) for v in losses)
    for name, start in (("a", 0.0), ("c", 0.0), ("log_scale", 0.0), ("guess", scale.GUESS - 3)):
        assert pyro.param(name).item() != start  # both phases reached their parameters
    assert isinstance(svi.evaluate_loss(learn_prior=True, **kwargs), tuple)


# -- learning: the scale example ---------------------------------------------

# Run-to-run spread measured with `python -m batchplate.examples.scale --grid`
# (K=5, B=32 of N=1000, 1000 steps, Adam lr 0.05, seeds 0-3, prior mean
# learned; docs/rws.md): over insomnia 1, 0.5, 0 and both layouts,
# sd(a) <= 0.011, sd(c) <= 0.033, sd(scale) <= 0.019, sd(guess) <= 0.058, and
# the mean of c is within 0.05 of 0.36 * guess. Tolerances: about 4-5 sd.
TOLERANCE = {"a": 0.05, "c": 0.15, "scale": 0.08, "guess": 0.25}


@pytest.mark.parametrize("insomnia", [1.0, 0.0])
def test_scale_example_learns_the_posterior_and_the_prior_mean(insomnia):
    data = scale.make_dataset(1000)
    objective = ReweightedWakeSleep(num_particles=5, insomnia=insomnia, max_plate_nesting=1)
    params = scale.train(objective, data, batch_size=32, steps=1000, lr=0.05, learn_prior=True)
    data_mean = data.mean().item()
    exact = scale.Posterior.exact(m=params["guess"])  # c follows the learned prior mean
    assert abs(params["a"] - exact.a) < TOLERANCE["a"], params
    assert abs(params["c"] - exact.c) < TOLERANCE["c"], params
    assert abs(params["scale"] - exact.scale) < TOLERANCE["scale"], params
    # The prior mean starts 3 below the data mean and ends near it (its MLE).
    assert abs(params["guess"] - data_mean) < TOLERANCE["guess"], (params, data_mean)


def test_scale_example_learns_with_a_sequential_plate():
    """The sequential layout, insomnia 0.5, subsampled minibatches of 8 (1000 steps, ~25 s).

    Seeds 0-2 gave a in [0.635, 0.655], |c - exact c| <= 0.06, scale in
    [0.594, 0.607] and |guess - data mean| <= 0.10: the same tolerances hold.
    """
    data = scale.make_dataset(1000)
    objective = ReweightedWakeSleep(num_particles=5, insomnia=0.5, max_plate_nesting=1)
    params = scale.train(
        objective,
        data,
        layout="sequential",
        batch_size=8,
        steps=1000,
        lr=0.05,
        learn_prior=True,
    )
    exact = scale.Posterior.exact(m=params["guess"])
    assert abs(params["a"] - exact.a) < TOLERANCE["a"], params
    assert abs(params["c"] - exact.c) < TOLERANCE["c"], params
    assert abs(params["scale"] - exact.scale) < TOLERANCE["scale"], params
    assert abs(params["guess"] - data.mean().item()) < TOLERANCE["guess"], params


@pytest.mark.parametrize("insomnia", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("vectorize", [True, False])
def test_no_sample_sites_is_loss_zero_without_gradient(insomnia, vectorize):
    """As every objective (an auxiliary loss on a batch without labels): both losses 0,
    no gradient. (Stock Pyro 1.9's RWS fails there on a float's missing `detach`.)"""
    net = torch.nn.Linear(1, 1)

    def model(x):
        pyro.module("net", net)

    def guide(x):
        pass

    x = torch.zeros(3)
    rws = ReweightedWakeSleep(num_particles=2, insomnia=insomnia, vectorize_particles=vectorize)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.1}), rws)
    assert svi.step(x) == (0.0, 0.0)
    assert net.weight.grad is None
    assert rws.differentiable_loss(model, guide, x).item() == 0.0


def test_sites_outside_the_batch_plate_are_refused():
    """The phases detach the guide's draws: a MAP site would never learn, and a global
    term would be left out of the losses (it was, silently). Refused, naming the fix."""

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with batch_plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x):
        pyro.sample("mu", dist.Delta(pyro.param("m", torch.tensor(0.5))))

    for insomnia in (1.0, 0.0):
        rws = ReweightedWakeSleep(num_particles=2, insomnia=insomnia)
        with pytest.raises(BatchPlateError, match="outside the batch plate.*pyro.param"):
            rws.loss(model, guide, torch.zeros(3))
