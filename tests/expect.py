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
