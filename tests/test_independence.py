"""``check_batch_independence``: coupling invisible in the program's structure."""

from __future__ import annotations

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
