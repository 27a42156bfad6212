"""``check_batch_independence``: coupling invisible in the program's structure."""

from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from batchplate import BatchPlateError, IndependenceReport, batch_plate, check_batch_independence

B = 5


def programs(encoder: nn.Module, **plate_kwargs):
    """A VAE-like pair: ``z_b ~ N(0, 1)``, ``x_b ~ N(z_b, 1)`` (2-dim), and an amortized
    Normal guide whose location is ``encoder(x_b)``."""

    def model(x):
        with batch_plate("data", len(x), **plate_kwargs) as idx:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z.unsqueeze(-1), 1.0).to_event(1), obs=x[idx])

    def guide(x):
        pyro.module("encoder", encoder)
        with batch_plate("data", len(x), **plate_kwargs) as idx:
            pyro.sample("z", dist.Normal(encoder(x[idx]).squeeze(-1), 1.0))

    return model, guide


def mlp(batch_norm: bool) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(2, 8)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.Tanh(), nn.Linear(8, 1)]
    return nn.Sequential(*layers)


def data(n: int = B) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(1))


def test_batch_norm_in_training_mode_is_flagged():
    encoder = mlp(batch_norm=True).train()
    model, guide = programs(encoder)
    with pytest.raises(BatchPlateError, match="batch normalization") as info:
        check_batch_independence(model, guide, data())
    message = str(info.value)
    assert "batch plate 'data'" in message and "args[0]" in message
    assert "datum 0 depends on the inputs of data [1, 2, 3, 4]" in message

    report = check_batch_independence(model, guide, data(), raise_error=False)
    assert isinstance(report, IndependenceReport)
    assert not report.independent
    assert report.inputs_checked == ["args[0]"]
    # Every datum's weight depends on every other datum's input (the batch mean).
    assert report.coupled == {b: [c for c in range(B) if c != b] for b in range(B)}
    assert "datum 3 depends on the inputs of data [0, 1, 2, 4]" in str(report)


def test_same_encoder_in_eval_mode_passes():
    encoder = mlp(batch_norm=True)
    encoder.train()(data())  # non-trivial running statistics
    encoder.eval()
    model, guide = programs(encoder)
    report = check_batch_independence(model, guide, data())
    assert report.independent and report.coupled == {}
    assert "all 5 data independent" in str(report)


def test_per_datum_mlp_passes():
    model, guide = programs(mlp(batch_norm=False).train())
    report = check_batch_independence(model, guide, data())
    assert report.independent
    assert report.batch_size == B


def test_batch_statistic_in_guide_is_flagged():
    """Centering by the minibatch mean couples all data; a single coupled pair is
    reported as exactly that pair."""

    def model(x):
        with batch_plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def centered(x):
        with batch_plate("data", len(x)):
            pyro.sample("z", dist.Normal(x - x.mean(), 1.0))

    def swap_01(x):
        loc = x.clone()
        loc[0], loc[1] = x[1] + x[0], x[1]  # datum 0's guide reads datum 1
        with batch_plate("data", len(x)):
            pyro.sample("z", dist.Normal(loc, 1.0))

    x = torch.randn(4, generator=torch.Generator().manual_seed(2))
    report = check_batch_independence(model, centered, x, raise_error=False)
    assert set(report.coupled) == {0, 1, 2, 3}
    report = check_batch_independence(model, swap_01, x, raise_error=False)
    assert report.coupled == {0: [1]}


def test_subsampled_data_are_named_by_minibatch_position():
    """With ``subsample=`` the inputs are the whole dataset ``[N, 2]``; rows map to
    minibatch positions through the subsample indices."""
    subsample = torch.tensor([6, 1, 4])
    encoder = mlp(batch_norm=True).train()
    model, guide = programs(encoder, subsample=subsample)
    report = check_batch_independence(model, guide, data(8), raise_error=False)
    assert report.coupled == {0: [1, 2], 1: [0, 2], 2: [0, 1]}

    model, guide = programs(mlp(batch_norm=False), subsample=subsample)
    assert check_batch_independence(model, guide, data(8)).independent


def test_needs_floating_point_data():
    model, guide = programs(mlp(batch_norm=False))
    with pytest.raises(ValueError, match="floating-point tensor"):
        check_batch_independence(model, guide, torch.arange(B))


# -- the permutation check: coupling without a gradient ---------------------------------


def conjugate_model(x):
    with batch_plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def test_comparison_with_the_batch_median_is_flagged():
    """`x > x.median()` has no gradient: the autograd check sees nothing, the split
    minibatch has another median."""

    def guide(x):
        with batch_plate("data", len(x)):
            pyro.sample("z", dist.Normal((x > x.median()).float(), 1.0))

    x = torch.tensor([0.3, -1.2, 2.0, 0.9, -0.4, 1.5])
    report = check_batch_independence(conjugate_model, guide, x, raise_error=False)
    assert report.coupled == {} and report.permutation_checked
    assert report.moved and not report.independent
    with pytest.raises(BatchPlateError, match="down to single data, with the same latents"):
        check_batch_independence(conjugate_model, guide, x)


def test_detached_batch_mean_in_the_model_is_flagged():
    def model(x):
        center = x.mean().detach()
        with batch_plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(center, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with batch_plate("data", len(x)):
            pyro.sample("z", dist.Normal(x, 1.0))

    x = torch.tensor([0.3, -1.2, 2.0, 0.9, -0.4])
    report = check_batch_independence(model, guide, x, raise_error=False)
    assert report.coupled == {}
    assert sorted(report.moved) == [0, 1, 2, 3, 4]
    assert "data [0, 1, 2, 3, 4] change their log weight" in str(report)


def test_position_in_the_minibatch_is_flagged():
    """A sequential guide that counts its iterations: a function of the position in the
    minibatch, not of the datum (the reordered minibatch moves every datum). The plate's
    index `i` itself names the datum, rightly."""

    def model(x):
        for i in batch_plate("data", len(x)):
            z = pyro.sample(f"z_{i}", dist.Normal(0.0, 1.0))
            pyro.sample(f"x_{i}", dist.Normal(z, 1.0), obs=x[i])

    def guide(x):
        for position, i in enumerate(batch_plate("data", len(x))):
            pyro.sample(f"z_{i}", dist.Normal(x[i] + 0.1 * position, 1.0))

    report = check_batch_independence(model, guide, torch.zeros(4), raise_error=False)
    assert report.coupled == {} and set(report.moved) == {0, 1, 2, 3}


def test_independent_sequential_and_subsampled_programs_pass():
    """Per-datum programs pass both checks in every layout: sequential (site names carry
    the position), vectorized and sequential with subsampling (rows of an [N] input)."""

    def seq_model(x, idx=None):
        for i in batch_plate("data", len(x) if idx is None else 10, subsample=idx):
            z = pyro.sample(f"z_{i}", dist.Normal(0.0, 1.0))
            flips = pyro.sample(f"n_{i}", dist.Geometric(0.5))  # data-dependent structure
            pyro.sample(f"x_{i}", dist.Normal(z + flips, 1.0), obs=x[i])

    def seq_guide(x, idx=None):
        for i in batch_plate("data", len(x) if idx is None else 10, subsample=idx):
            pyro.sample(f"z_{i}", dist.Normal(x[i] * 0.5, 1.0))
            pyro.sample(f"n_{i}", dist.Geometric(torch.sigmoid(x[i])))

    x = torch.linspace(-1.0, 2.0, 10)
    for report in (
        check_batch_independence(seq_model, seq_guide, x[:5]),
        check_batch_independence(seq_model, seq_guide, x, torch.tensor([7, 2, 5, 0])),
    ):
        assert report.independent and report.permutation_checked

    model, guide = programs(mlp(batch_norm=False), subsample=torch.tensor([6, 1, 4, 3]))
    report = check_batch_independence(model, guide, data(8))
    assert report.independent and report.permutation_checked and report.moved == {}


def test_dropout_in_training_mode_skips_the_permutation_check():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(2, 8), nn.Dropout(0.5), nn.Linear(8, 1)).train()
    model, guide = programs(encoder)
    with pytest.warns(UserWarning, match="not reproducible from its latents"):
        report = check_batch_independence(model, guide, data())
    assert report.independent and not report.permutation_checked


def autoguide_model(x, subsample=None):
    with batch_plate("data", len(x), subsample=subsample) as idx:
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x[idx])


def test_autoguides_pass():
    """An autoguide's per-datum parameters follow the plate's indices: both checks pass
    (a point mass that cannot be reordered skips the permutation check, with a warning)."""
    from pyro.infer.autoguide import AutoDelta, AutoNormal

    x = torch.tensor([0.3, -1.2, 2.0, 0.9])
    for subsample in (None, torch.tensor([3, 0, 2])):
        pyro.clear_param_store()
        guide = AutoNormal(autoguide_model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # autoguides' plates have fixed sizes: no halves
            report = check_batch_independence(autoguide_model, guide, x, subsample)
        assert report.independent and report.permutation_checked
    with pytest.warns(UserWarning, match="cannot be reordered"):
        report = check_batch_independence(autoguide_model, AutoDelta(autoguide_model), x)
    assert report.independent and not report.permutation_checked
