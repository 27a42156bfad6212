"""Stacking what many lanes ask for into one batched call.

Two kinds of request are batched: a sample site's distribution (stacked into
one distribution with a leading lane dim) and a call of a registered module
(its tensor arguments stacked along a new leading dim). Both are checked: a
distribution is stacked only when its type is known to be determined by its
constructor parameters, and a module's batched output is compared once per
step and signature with an unbatched call of the first lane.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Sequence
from itertools import repeat
from typing import Any

import pyro.distributions as dist
import torch

from ._construct import LaneCategorical

#: Distribution types whose constructor parameters (in `__dict__`, under these
#: names) fully determine them, so `type(**stacked params)` is the stacked
#: distribution. Alternatives in order of preference (`logits` before `probs`:
#: whichever the program gave is in `__dict__`; the other appears only if read).
PARAMS: dict[type, tuple[tuple[str, ...], ...]] = {
    dist.Bernoulli: (("logits",), ("probs",)),
    dist.Categorical: (("logits",), ("probs",)),
    dist.OneHotCategorical: (("logits",), ("probs",)),
    dist.Geometric: (("logits",), ("probs",)),
    dist.Binomial: (("total_count", "logits"), ("total_count", "probs")),
    dist.Normal: (("loc", "scale"),),
    dist.Laplace: (("loc", "scale"),),
    dist.Cauchy: (("loc", "scale"),),
    dist.StudentT: (("df", "loc", "scale"),),
    dist.Gamma: (("concentration", "rate"),),
    dist.Poisson: (("rate",),),
    dist.Exponential: (("rate",),),
    dist.Uniform: (("low", "high"),),
    dist.Dirichlet: (("concentration",),),
    dist.Unit: (("log_factor",),),
}


class AutobatchWarning(UserWarning):
    """Autobatch runs something lane by lane (correct, but without the speed-up)."""


_warned: set[str] = set()


def warn_once(what: str, why: str) -> None:
    """Say once per process that `what` falls back to running lane by lane."""
    if what not in _warned:
        _warned.add(what)
        warnings.warn(
            f"autobatch: {what} runs lane by lane ({why}); its values are exact, only slower",
            AutobatchWarning,
            stacklevel=4,
        )


def dist_spec(fn: Any) -> tuple[tuple, tuple[torch.Tensor, ...]] | None:
    """`(key, params)` of a stackable distribution, `None` if it cannot be stacked.

    Two distributions with equal keys stack: same type, same parameter names,
    shapes and dtypes (hence batch and event shapes), same wrapping.
    """
    kind = type(fn)
    options = PARAMS.get(kind)
    if options is None:
        return _other_spec(fn, kind)
    given = fn.__dict__
    for names in options:  # loops, not all(): this runs once per site and lane
        if len(names) == 1:
            param = given.get(names[0])
            if param is None:
                continue
            params: tuple = (param,)
            break
        params = tuple(map(given.get, names))
        if all(map(operator.is_not, params, repeat(None))):
            break
    else:
        return None
    shapes = tuple([(p.shape, p.dtype) for p in params])
    extra = getattr(fn, "has_rsample", None) if kind is dist.Unit else None
    return (kind, names, extra, shapes), params


def _other_spec(fn: Any, kind: type) -> tuple[tuple, tuple[torch.Tensor, ...]] | None:
    """`dist_spec` of a lane's categorical, of `Independent`, or `None`."""
    if kind is LaneCategorical:  # stacked from the lanes' given parameters, normalized once
        name, given = fn._lane_given
        return (dist.Categorical, (name,), None, ((given.shape, given.dtype),)), (given,)
    if kind is dist.Independent:
        inner = dist_spec(fn.base_dist)
        if inner is None:
            return None
        return (kind, fn.reinterpreted_batch_ndims, inner[0]), inner[1]
    return None


def build(key: tuple, params: Sequence[torch.Tensor], validate: bool) -> Any:
    """The distribution of `key` (from `dist_spec`) with the given (stacked) parameters."""
    kind = key[0]
    if kind is dist.Independent:
        return dist.Independent(build(key[2], params, validate), key[1], validate_args=validate)
    kwargs = dict(zip(key[1], params, strict=True), validate_args=validate)
    if kind is dist.Unit and key[2] is not None:
        kwargs["has_rsample"] = key[2]
    return kind(**kwargs)


def stack(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """`[n, ...]`: one tensor per lane; a tensor shared by every lane is only expanded."""
    first = values[0]
    if all(map(operator.is_, values, repeat(first))):  # in C: this runs per group
        return first.expand((len(values),) + first.shape)
    return torch.stack(values)


class Stacker:
    """`stack` and `unbind` for one draw, remembering what it unbound: lanes that
    hand back the views of one unbound tensor, all of them and in order (the
    model replaying a guide's group, a module's outputs passed on), get that
    tensor back instead of a stack of `n` views (and its backward)."""

    def __init__(self) -> None:
        self.bases: dict[int, tuple[tuple, torch.Tensor]] = {}  # id(first view) -> both

    def unbind(self, base: torch.Tensor) -> tuple:
        views = base.unbind(0)
        if views:  # kept alive with the views: their ids stay theirs for the draw
            self.bases[id(views[0])] = (views, base)
        return views

    def stack(self, values: Sequence[torch.Tensor]) -> torch.Tensor:
        found = self.bases.get(id(values[0]))
        if (
            found is not None
            and len(found[0]) == len(values)
            and all(map(operator.is_, values, found[0]))
        ):
            return found[1]
        return stack(values)


def as_lane_tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)


# -- module calls ------------------------------------------------------------------


def call_signature(args: tuple, kwargs: dict) -> tuple:
    """What must agree for calls to stack: tensor shapes and dtypes, other values."""
    keys = tuple([_arg_key(a) for a in args])
    return (keys, tuple([(k, _arg_key(v)) for k, v in kwargs.items()])) if kwargs else (keys,)


def _arg_key(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (value.shape, value.dtype, value.device)
    try:
        hash(value)
    except TypeError:
        return ("object", id(value))
    return ("value", type(value), value)


def same_objects(calls: Sequence[tuple[tuple, dict]]) -> bool:
    """Every lane passes the very same argument objects (e.g. the whole minibatch)."""
    args0, kwargs0 = calls[0]
    for args, kwargs in calls[1:]:
        if any(a is not b for a, b in zip(args, args0, strict=True)):
            return False
        if any(kwargs[k] is not v for k, v in kwargs0.items()):
            return False
    return True


def stacked_call(method: Any, calls: Sequence[tuple[tuple, dict]], stacker: Stacker) -> list:
    """Call `method` once on the lanes' stacked arguments; one output per lane."""
    n = len(calls)
    columns = [[c[0][i] for c in calls] for i in range(len(calls[0][0]))]
    args = tuple(_stack_arg(values, stacker) for values in columns)
    kwargs = {k: _stack_arg([c[1][k] for c in calls], stacker) for k in calls[0][1]}
    return split(method(*args, **kwargs), n, stacker)


def _stack_arg(values: list, stacker: Stacker) -> Any:
    return stacker.stack(values) if isinstance(values[0], torch.Tensor) else values[0]


def split(output: Any, n: int, stacker: Stacker) -> list:
    """One output per lane from a batched output (tensors and tuples of tensors).

    `unbind`, not indexing: its backward is one `stack`, where `n` index
    backwards would each fill an `[n, ...]` gradient.
    """
    if isinstance(output, torch.Tensor):
        if output.dim() == 0 or output.shape[0] != n:
            raise ValueError(f"batched output of shape {tuple(output.shape)} has no lane dim")
        return list(stacker.unbind(output))
    if isinstance(output, tuple | list) and len(output) > 0:
        lanes = zip(*[split(o, n, stacker) for o in output], strict=True)
        if type(output) is tuple:
            return list(lanes)
        if isinstance(output, tuple):  # a namedtuple
            return [type(output)(*lane) for lane in lanes]
        return [type(output)(lane) for lane in lanes]
    raise ValueError(f"cannot split a batched output of type {type(output).__name__}")


def same_output(a: Any, b: Any) -> bool:
    """Equal structure and shapes, values equal to float tolerance."""
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and bool(torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-5, equal_nan=True))
        )
    if isinstance(a, tuple | list):
        return (
            isinstance(b, tuple | list)
            and len(a) == len(b)
            and all(same_output(x, y) for x, y in zip(a, b, strict=True))
        )
    return a == b
