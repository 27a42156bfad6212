"""Lane distributions built without broadcasting are the constructor's own objects.

`batchplate.autobatch._construct.lane_distribution` builds the common families
by setting their attributes directly (Automatic batching page, "What it
costs"); here each is compared, attribute by attribute and by behaviour, with
what the constructor builds from the same arguments. A lane's categorical is
normalized when first read: it is compared by what a program can read.
"""

from __future__ import annotations

import pyro.distributions as dist
import pytest
import torch
from torch.distributions import Distribution

from batchplate.autobatch._construct import FAMILIES, LaneCategorical, lane_distribution

T = torch.tensor([0.3, 0.7])
S = torch.tensor([1.5, 2.0])

CASES = [
    (dist.Bernoulli, (), {"logits": T}),
    (dist.Bernoulli, (), {"probs": T}),
    (dist.Bernoulli, (T,), {}),
    (dist.Geometric, (), {"probs": T}),
    (dist.Geometric, (), {"logits": T}),
    (dist.Normal, (T, S), {}),
    (dist.Normal, (), {"loc": T, "scale": S}),
    (dist.Normal, (), {"scale": S, "loc": T}),
    (dist.Laplace, (T, S), {}),
    (dist.Cauchy, (T, S), {}),
    (dist.Gamma, (S, S), {}),
    (dist.Exponential, (S,), {}),
]


@pytest.fixture
def unvalidated():
    before = Distribution._validate_args
    Distribution.set_default_validate_args(False)
    yield
    Distribution.set_default_validate_args(before)


def _same_state(fast, slow) -> None:
    assert type(fast) is type(slow)
    assert list(vars(fast)) == list(vars(slow))
    for name, value in vars(slow).items():
        mine = vars(fast)[name]
        if isinstance(value, torch.Tensor):
            assert mine.shape == value.shape and torch.equal(mine, value), name
        else:
            assert mine == value, name


@pytest.mark.parametrize("cls,args,kwargs", CASES)
def test_fast_object_is_the_constructors(unvalidated, cls, args, kwargs):
    fast = lane_distribution(cls, args, kwargs)
    assert fast is not None, "the plain call should take the fast path"
    slow = cls(*args, **kwargs)
    _same_state(fast, slow)
    value = slow.sample()
    assert torch.equal(fast.log_prob(value), slow.log_prob(value))
    torch.testing.assert_close(fast.mean, slow.mean, rtol=0, atol=0, equal_nan=True)
    assert fast.batch_shape == slow.batch_shape and fast.event_shape == slow.event_shape


def test_every_family_is_covered():
    assert set(FAMILIES) == {cls for cls, _, _ in CASES} | {dist.Categorical}


@pytest.mark.parametrize("name", ["logits", "probs"])
@pytest.mark.parametrize("shape", [(4,), (3, 4)])
def test_lane_categorical_reads_as_the_constructors(unvalidated, name, shape):
    raw = torch.rand(shape, dtype=torch.float64) + 0.1
    fast_raw, slow_raw = raw.clone().requires_grad_(), raw.clone().requires_grad_()
    fast = lane_distribution(dist.Categorical, (), {name: fast_raw})
    slow = dist.Categorical(**{name: slow_raw})
    assert isinstance(fast, LaneCategorical) and isinstance(fast, dist.Categorical)
    assert name not in vars(fast), "normalized only when read"
    for attr in ("logits", "probs", "_param", "param_shape", "batch_shape", "event_shape"):
        torch.testing.assert_close(getattr(fast, attr), getattr(slow, attr), rtol=0, atol=1e-15)
    value = slow.sample((5,))
    assert fast.sample((5,)).shape == value.shape
    torch.testing.assert_close(fast.log_prob(value), slow.log_prob(value), rtol=0, atol=1e-15)
    torch.testing.assert_close(fast.entropy(), slow.entropy(), rtol=0, atol=1e-15)
    assert torch.equal(fast.enumerate_support(), slow.enumerate_support())
    wide = fast.expand((2,) + fast.batch_shape)
    torch.testing.assert_close(wide.logits, slow.expand((2,) + slow.batch_shape).logits)
    fast.log_prob(value).sum().backward()
    slow.log_prob(value).sum().backward()
    torch.testing.assert_close(fast_raw.grad, slow_raw.grad, rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    "cls,args,kwargs",
    [
        (dist.Normal, (0.0, 1.0), {}),  # numbers: the constructor makes tensors
        (dist.Normal, (T, torch.tensor(1.0)), {}),  # shapes that broadcast
        (dist.Normal, (T,), {"scale": S}),  # mixed positional and keyword
        (dist.Bernoulli, (), {"probs": T, "logits": T}),
        (dist.Bernoulli, (), {"logits": T, "validate_args": False}),
        (dist.Categorical, (), {"logits": torch.tensor(0.0)}),  # the constructor raises
        (dist.Categorical, (), {"logits": T, "probs": T}),
        (dist.Binomial, (), {"total_count": S, "logits": T}),  # not a family it builds
    ],
)
def test_anything_else_takes_the_constructor(unvalidated, cls, args, kwargs):
    assert lane_distribution(cls, args, kwargs) is None


def test_validation_on_takes_the_constructor():
    before = Distribution._validate_args
    Distribution.set_default_validate_args(True)
    try:
        assert lane_distribution(dist.Normal, (T, S), {}) is None
    finally:
        Distribution.set_default_validate_args(before)
