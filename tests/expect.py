"""Assertion helpers shared by the test files (exact values are in ``oracles.py``)."""

from __future__ import annotations

import pytest

import batchplate
from batchplate import BatchPlateError, log_weights


def raises_rule(model, guide, *args, match: str, **kw) -> str:
    """Run ``log_weights`` and an objective; both must raise the same rule's error
    (a ``BatchPlateError``, hence a ``ValueError``). Returns the message."""
    with pytest.raises(BatchPlateError, match=match) as info:
        log_weights(model, guide, *args, **kw)
    assert isinstance(info.value, ValueError)
    with pytest.raises(BatchPlateError, match=match):
        batchplate.RenyiELBO(alpha=0, **kw).loss(model, guide, *args)
    return str(info.value)


def assert_stock_over(factor: float, stock: tuple, ours: tuple) -> None:
    """`ours` (loss, grads) equals stock Pyro's `(loss, grads)` divided by `factor`
    (1 for `reduction="sum"`, `N` for `"mean"`), on the same draws."""
    import torch

    (s_loss, s_grads), (b_loss, b_grads) = stock, ours
    assert float(b_loss) == pytest.approx(float(s_loss) / factor, rel=1e-5)
    for s_grad, b_grad in zip(s_grads, b_grads, strict=True):
        assert torch.allclose(b_grad, s_grad / factor, atol=1e-5, rtol=1e-5)
