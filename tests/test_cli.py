"""``batchplate demo`` through the command line, and the content of its table."""

from __future__ import annotations

import contextlib
import io
import math
from unittest import mock

import pyro.distributions as dist
import pytest
import torch

from batchplate import cli, demo


@pytest.fixture(scope="module")
def tour():
    """Run ``batchplate demo --quick`` once; return (exit code, printed text, result)."""
    results = []
    original = demo.main

    def recording(*args, **kwargs):
        results.append(original(*args, **kwargs))
        return results[-1]

    out = io.StringIO()
    with mock.patch.object(demo, "main", recording), contextlib.redirect_stdout(out):
        code = cli.main(["demo", "--quick"])
    assert len(results) == 1
    return code, out.getvalue(), results[0]


def test_demo_exits_zero_and_prints_the_table(tour):
    code, text, result = tour
    assert code == 0 and result.ok
    assert "stock Pyro" in text and "batchplate" in text and "exact" in text
    lines = text.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.startswith("-----"))
    assert lines[rule - 1].split()[:3] == ["quantity", "stock", "Pyro"]
    for row, line in zip(result.rows, lines[rule + 1 :], strict=False):
        assert line.startswith(row.quantity)
        assert f"{row.exact:.3f}" in line
        assert f"{row.batchplate:.3f}" in line
        assert row.verdict in line
    assert "OFF" not in text
    assert result.seconds < 60


def test_iwae_vectorized_plate(tour):
    """Stock Pyro returns the batch sum of per-datum bounds; batchplate the mean."""
    _, _, result = tour
    raw, per_datum = result.row("iwae_vectorized"), result.row("iwae_vectorized_per_datum")
    B = len(result.data)
    assert raw.stock_form == demo.SUM_OF_BOUNDS
    assert abs(raw.stock - raw.exact) > 5  # B times the value: far from the per-datum exact
    assert raw.stock == pytest.approx(B * per_datum.stock)
    assert per_datum.batchplate_se < 0.03  # enough power to see a wrong bound
    assert abs(per_datum.batchplate - per_datum.exact) <= 4 * per_datum.batchplate_se + 0.01
    assert abs(per_datum.stock - per_datum.exact) <= 4 * per_datum.stock_se + 0.01


def test_iwae_sequential_plate(tour):
    """Stock Pyro's bound is on the joint weight of the batch: looser, wrong."""
    _, _, result = tour
    raw, per_datum = result.row("iwae_sequential"), result.row("iwae_sequential_per_datum")
    assert raw.stock_form == demo.JOINT_BOUND
    gap = per_datum.stock - per_datum.exact
    assert gap < -0.3 and abs(gap) > 4 * per_datum.stock_se
    assert per_datum.batchplate_se < 0.1
    assert abs(per_datum.batchplate - per_datum.exact) <= 4 * per_datum.batchplate_se
    assert per_datum.batchplate_ok


def test_elbo_gradient_scale(tour):
    """Stock Pyro's ELBO gradient is B times the per-datum gradient; batchplate's is not."""
    _, _, result = tour
    row = result.row("elbo_gradient")
    B = len(result.data)
    assert abs(row.exact) > 1
    assert abs(row.stock - B * row.exact) <= 4 * row.stock_se + 1e-3
    assert abs(row.batchplate - row.exact) <= 4 * row.batchplate_se + 1e-3
    assert abs(row.stock - row.exact) > 50 * row.stock_se


def test_discrete_guide_gradient(tour):
    """Stock RenyiELBO(alpha=0) gives the discrete guide exactly zero gradient."""
    _, _, result = tour
    row = result.row("discrete_gradient")
    assert row.stock == 0.0 and row.stock_se == 0.0
    assert abs(row.exact) > 8 * row.batchplate_se
    assert abs(row.batchplate - row.exact) <= 4 * row.batchplate_se


# -- the exact values are what they claim to be ---------------------------------


def test_exact_elbo_equals_log_evidence_at_the_exact_posterior():
    """The closed-form ELBO with the exact amortized posterior is log p(x)."""
    s, t, m = demo.PRIOR_SCALE, demo.OBS_SCALE, demo.PRIOR_LOC
    a, c = s**2 / (s**2 + t**2), m * t**2 / (s**2 + t**2)
    log_r = math.log(s * t / math.sqrt(s**2 + t**2))
    x = demo.gaussian_data()
    params = (torch.tensor(v, dtype=torch.float64) for v in (a, c, log_r))
    assert torch.allclose(demo.exact_elbo(x, *params), demo.exact_log_evidence(x))


def test_exact_elbo_matches_monte_carlo():
    x = demo.gaussian_data()
    a, c, log_scale = (torch.tensor(v) for v in (0.5, 6.0, -0.3))
    q = dist.Normal(a * x + c, log_scale.exp())
    w = q.sample((200000,))
    log_w = dist.Normal(demo.PRIOR_LOC, demo.PRIOR_SCALE).log_prob(w)
    log_w = log_w + dist.Normal(w, demo.OBS_SCALE).log_prob(x) - q.log_prob(w)
    exact = demo.exact_elbo(x, *(v.double() for v in (a, c, log_scale))).float()
    se = log_w.std(0) / math.sqrt(len(w))
    assert ((log_w.mean(0) - exact).abs() <= 4 * se).all()


def test_exact_discrete_gradient_matches_finite_differences():
    """The enumerated gradient against a central difference of the enumerated objective."""

    def expected_bound(phi: float) -> float:
        K = demo.BERNOULLI_K
        total = 0.0
        for z in torch.cartesian_prod(*[torch.tensor([0.0, 1.0], dtype=torch.float64)] * K):
            q = dist.Bernoulli(logits=torch.tensor(phi, dtype=torch.float64))
            log_q = q.log_prob(z)
            prior = dist.Bernoulli(logits=torch.tensor(demo.PRIOR_LOGIT, dtype=torch.float64))
            loc = demo.MU0 + (demo.MU1 - demo.MU0) * z
            log_p = prior.log_prob(z) + dist.Normal(loc, demo.SIGMA).log_prob(
                torch.tensor(demo.BERNOULLI_X, dtype=torch.float64)
            )
            bound = torch.logsumexp(log_p - log_q, 0) - math.log(K)
            total += float(log_q.sum().exp() * bound)
        return total

    h = 1e-5
    phi = demo.GUIDE_LOGIT
    numeric = (expected_bound(phi + h) - expected_bound(phi - h)) / (2 * h)
    exact = demo.exact_iwae_guide_gradient(
        demo.BERNOULLI_X, demo.PRIOR_LOGIT, phi, demo.BERNOULLI_K
    )
    assert exact == pytest.approx(numeric, rel=1e-6, abs=1e-8)


def test_cli_without_a_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert "batchplate" in capsys.readouterr().out
