"""Lane distributions built without broadcasting their parameters.

Inside a lane a distribution is constructed once per site and lane only for
its parameters to be stacked with the other lanes' (the stacked distribution
is built, and validated, by the scheduler). Torch's constructors broadcast
their parameters (`broadcast_all`: about 3 us even when there is nothing to
broadcast), which was a fifth of an autobatched geometric step. For the
common families whose constructor only stores its broadcast parameters and
their shape, a constructor call whose parameters are tensors of one shape,
with validation off, builds the very object the constructor would (same
type, same attributes, same tensors): `tests/test_autobatch_construct.py`
compares them attribute by attribute. Anything else (numbers, shapes that
broadcast, `validate_args=`, other keywords or families) takes the
constructor.

Pyro's distribution metaclass asks the functions in
`pyro.distributions.distribution.COERCIONS` first (the hook `pyro.contrib.funsor`
uses); autobatch adds `lane_distribution` there while its lanes run.
"""

from __future__ import annotations

from typing import Any

import pyro.distributions as dist
import torch
from torch.distributions import Distribution
from torch.distributions.utils import lazy_property, logits_to_probs, probs_to_logits

#: Family -> (its constructor's parameter names in order, whether exactly one
#: of them is given (`probs` or `logits`), whether it keeps that one as `_param`).
FAMILIES: dict[type, tuple[tuple[str, ...], bool, bool]] = {
    dist.Bernoulli: (("probs", "logits"), True, True),
    dist.Geometric: (("probs", "logits"), True, False),
    dist.Normal: (("loc", "scale"), False, False),
    dist.Laplace: (("loc", "scale"), False, False),
    dist.Cauchy: (("loc", "scale"), False, False),
    dist.Gamma: (("concentration", "rate"), False, False),
    dist.Exponential: (("rate",), False, False),
    dist.Categorical: (("probs", "logits"), True, True),  # `LaneCategorical`
}

_SCALAR_EVENT = torch.Size()


def lane_distribution(cls: type, args: tuple, kwargs: dict) -> Any:
    """The distribution `cls(*args, **kwargs)` without broadcasting, or `None` to
    let the constructor build it (a `COERCIONS` entry)."""
    family = FAMILIES.get(cls)
    if family is None or Distribution._validate_args:
        return None
    if cls is dist.Categorical:
        return _lane_categorical(args, kwargs)
    names, one_of, keeps_param = family
    params = _given(names, one_of, args, kwargs)
    if params is None:
        return None
    shape = None
    for value in params.values():
        if not isinstance(value, torch.Tensor):
            return None
        if shape is None:
            shape = value.shape
        elif value.shape != shape:
            return None
    d = object.__new__(cls)
    state = d.__dict__
    state.update(params)
    if keeps_param:
        state["_param"] = value
    state["_batch_shape"] = shape
    state["_event_shape"] = _SCALAR_EVENT
    return d


def _given(names: tuple[str, ...], one_of: bool, args: tuple, kwargs: dict) -> dict | None:
    """The parameters by name, if given in one of the plain ways."""
    if one_of:  # `probs` positionally, or one of `probs=` / `logits=`
        if args:
            return {names[0]: args[0]} if len(args) == 1 and not kwargs else None
        if len(kwargs) == 1:
            name = next(iter(kwargs))
            return kwargs if name in names else None
        return None
    if args:
        if len(args) != len(names) or kwargs:
            return None
        return dict(zip(names, args, strict=True))
    if len(kwargs) == len(names) and all(name in kwargs for name in names):
        return {name: kwargs[name] for name in names}
    return None


class LaneCategorical(dist.Categorical):
    """`dist.Categorical(logits=...)` (or `probs=`) as built in a lane: normalized
    when first read.

    The constructor normalizes its parameter in every lane (`logits -
    logsumexp`): tensor operations and autograd nodes per lane and site, a
    sixth of an autobatched PCFG step and much of its backward. A lane's
    categorical keeps the parameter as given (`_lane_given`); its group is
    stacked from the given parameters and normalized once, and whatever the
    lane reads (`logits`, `probs`, `log_prob`, `sample`, `expand`, ...) is
    computed from the normalized values, as the constructor's object would.
    """

    @lazy_property
    def logits(self) -> torch.Tensor:
        name, given = self._lane_given
        if name == "logits":
            return given - given.logsumexp(dim=-1, keepdim=True)
        return probs_to_logits(self.probs)

    @lazy_property
    def probs(self) -> torch.Tensor:
        name, given = self._lane_given
        if name == "probs":
            return given / given.sum(-1, keepdim=True)
        return logits_to_probs(self.logits)

    @lazy_property
    def _param(self) -> torch.Tensor:
        return self.logits if self._lane_given[0] == "logits" else self.probs

    def expand(self, batch_shape: Any, _instance: Any = None) -> Any:
        name = self._lane_given[0]
        normalized = dist.Categorical(**{name: getattr(self, name)}, validate_args=False)
        return normalized.expand(batch_shape, _instance)


def _lane_categorical(args: tuple, kwargs: dict) -> LaneCategorical | None:
    params = _given(("probs", "logits"), True, args, kwargs)
    if params is None:
        return None
    ((name, given),) = params.items()
    if not isinstance(given, torch.Tensor) or given.dim() < 1:
        return None
    d = object.__new__(LaneCategorical)
    shape = given.shape
    d.__dict__.update(
        _lane_given=(name, given),
        _num_events=shape[-1],
        _batch_shape=shape[:-1],
        _event_shape=_SCALAR_EVENT,
    )
    return d
