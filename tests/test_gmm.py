"""The Gaussian-mixture example (Le et al., UAI 2019): exact quantities and a smoke run."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from batchplate import ReweightedWakeSleep, log_evidence
from batchplate.examples import gmm

torch.set_num_threads(1)


class ExactNet(nn.Module):
    """A 'guide network' that returns the current model's exact posterior logits."""

    def __init__(self, model: gmm.GMM) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.log_posterior(x).detach()


def test_true_weights_and_data():
    pi = gmm.true_weights()
    assert pi.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(pi, (torch.arange(20) + 5.0) / 290.0)  # sum_c (c + 5) = 290
    x = gmm.sample_data(20000, seed=3)
    # Mixture mean sum_c pi_c 10 c, within 5 standard errors.
    mean = (pi * gmm.means()).sum().item()
    se = x.std().item() / math.sqrt(len(x))
    assert abs(x.mean().item() - mean) < 5 * se


def test_exact_posterior_and_evidence_are_normalized():
    model = gmm.GMM(theta=torch.randn(20, generator=torch.Generator().manual_seed(0)))
    x = gmm.sample_data(50, seed=2)
    post = model.log_posterior(x).exp()
    assert torch.allclose(post.sum(-1), torch.ones(50), atol=1e-5)
    # p(x) integrates to 1 over x (trapezoid rule on a grid covering every component).
    grid = torch.linspace(-60.0, 250.0, 20001, dtype=torch.float64)
    density = model.log_evidence(grid.float()).double().exp()
    assert torch.trapezoid(density, grid).item() == pytest.approx(1.0, abs=1e-4)
    # Bayes' rule by hand for one point.
    prior = torch.softmax(model.theta(), -1)
    like = dist.Normal(gmm.means(), gmm.SIGMA).log_prob(x[0]).exp()
    assert torch.allclose(post[0], prior * like / (prior * like).sum(), atol=1e-5)


def test_enumeration_kl_is_zero_for_the_exact_guide_and_log_c_style_for_uniform():
    model = gmm.GMM(theta=torch.linspace(-1.0, 1.0, 20))
    x = gmm.sample_data(100, seed=4)
    model.net = ExactNet(model)
    assert model.posterior_kl(x).item() == pytest.approx(0.0, abs=1e-5)
    # Uniform guide: KL = sum_c p log p + log C, by hand.
    model.net = lambda x: torch.zeros(*x.shape, 20)
    log_p = model.log_posterior(x)
    expected = ((log_p.exp() * log_p).sum(-1) + math.log(20)).mean()
    assert model.posterior_kl(x).item() == pytest.approx(expected.item(), rel=1e-5)
    assert expected.item() > 0.5


def test_programs_give_exact_evidence_with_the_exact_guide():
    # With q = p(c | x) every log weight is log p(x_b): IWAE/RWS have zero variance.
    model = gmm.GMM(theta=torch.linspace(1.0, -1.0, 20))
    model.net = ExactNet(model)
    x = gmm.sample_data(30, seed=5)
    obs = {"observations": {"x": x}}
    exact = model.log_evidence(x).detach()
    estimate = log_evidence(model.model, model.guide, num_particles=3, **obs)
    assert torch.allclose(estimate, exact, atol=1e-4)
    theta_loss, _ = ReweightedWakeSleep(num_particles=4).loss(model.model, model.guide, **obs)
    assert theta_loss == pytest.approx(-exact.mean().item(), abs=1e-4)


def _wrong_start() -> gmm.GMM:
    pyro.set_rng_seed(0)  # the guide network's initialization
    return gmm.GMM(theta=-0.1 * torch.arange(20.0))  # weights decreasing in c: wrong way


def _train_rws(start: gmm.GMM, steps: int) -> dict:
    _, history = gmm.train(
        "rws",
        5,
        steps=steps,
        lr=0.05,
        lr_final=None,
        eval_every=steps,
        dataset_size=2000,
        test_size=200,
        gmm=start,
    )
    return history


def test_a_few_rws_steps_reduce_the_weight_error_from_a_fixed_start():
    # With the exact posterior as guide, wake-theta is a stochastic EM step:
    # over seeds 0-5, 30 steps left 0.20-0.24 of the initial error.
    start = _wrong_start()
    start.net = ExactNet(start)
    history = _train_rws(start, steps=30)
    (w0, w1), (_, kl1) = history["weight_error"], history["kl"]
    assert w0 > 0.2
    assert w1 < 0.4 * w0, history
    assert abs(kl1) < 1e-5  # the guide stays exact as the model changes


def test_a_few_rws_steps_train_the_guide():
    # Over seeds 0-5, 60 steps left 0.30-0.46 of the initial KL.
    history = _train_rws(_wrong_start(), steps=60)
    kl0, kl1 = history["kl"]
    assert kl1 < 0.6 * kl0, history


@pytest.mark.parametrize("objective", gmm.OBJECTIVES)
def test_run_smoke(objective, tmp_path):
    metrics = gmm.run(
        objective=objective,
        num_particles=3,
        batch_size=20,
        steps=6,
        lr=1e-2,
        out_dir=tmp_path,
        progress=False,
        eval_every=3,
        dataset_size=200,
        test_size=50,
    )
    assert (tmp_path / f"gmm-{objective}.png").is_file()
    assert metrics["plot"] == str(tmp_path / f"gmm-{objective}.png")
    for key in ("weight_error", "kl", "seconds", "final_loss"):
        assert math.isfinite(metrics[key]), key
    assert metrics["initial_weight_error"] == pytest.approx(
        torch.linalg.vector_norm(torch.full((20,), 0.05) - gmm.true_weights()).item(), rel=1e-5
    )


def test_sweep_smoke(tmp_path):
    rows = gmm.sweep(
        Ks=(2, 3),
        objectives=("rws", "iwae"),
        steps=4,
        out_dir=tmp_path,
        eval_every=2,
        progress=False,
    )
    assert [(r["objective"], r["K"]) for r in rows] == [
        ("rws", 2),
        ("rws", 3),
        ("iwae", 2),
        ("iwae", 3),
    ]
    assert (tmp_path / "gmm-sweep.png").is_file()
    assert "| rws | 2 |" in gmm.format_table(rows)
    pyro.clear_param_store()
