"""What all lanes of one draw share: parameters, the minibatch, the batch plate's
state, module checks, `once` values and the tensors groups unbound."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pyro.poutine.indep_messenger import IndepMessenger

from ..plate import BatchFrame, check_sizes
from ._stack import Stacker


class Shared:
    """What all lanes of one draw share: parameters, the minibatch, module checks."""

    def __init__(self, subsample: dict[str, Any] | None = None) -> None:
        self.params: dict[str, Any] = {}
        self.modules: dict[tuple[str, int], Any] = {}  # `_lanes.ModuleProxy`s
        self.subsample = {} if subsample is None else subsample
        self.verified: set = set()  # module call signatures whose batching was checked
        self.unbatchable: set = set()
        self.validate = False  # the caller's distribution validation, for stacked distributions
        self.index_lists: dict[int, tuple[torch.Tensor, list]] = {}
        self.plate_states: dict[tuple, tuple[Any, dict]] = {}
        self.stacker = Stacker()
        self.plate_entries: dict[tuple, PlateEntry] = {}
        self.computed: dict[tuple, tuple] = {}  # `once`

    def subsample_indices(self, msg: dict) -> Any:
        """One minibatch per draw: the first lane's indices (or the given ones)."""
        name = msg["name"]
        if name not in self.subsample:
            self.subsample[name] = msg["value"] if msg["value"] is not None else msg["fn"]()
        return self.subsample[name]

    def minibatch(
        self,
        name: str,
        size: int,
        subsample_size: int | None,
        subsample: Any,
        device: str | None = None,
    ) -> tuple[int, Any]:
        """`(B, indices)` of a batch plate built in a lane, as Pyro's plate would set
        them (on the plate's device), the indices drawn once per draw (or given)."""
        if subsample is None and subsample_size is not None and subsample_size < size:
            if name not in self.subsample:  # as Pyro's plate draws them
                self.subsample[name] = torch.randperm(size, device=device)[:subsample_size]
            subsample = self.subsample[name]
        elif subsample is not None:
            self.subsample.setdefault(name, subsample)
        if subsample is None:  # Pyro's plate would build `arange(size)` in every lane
            key = ("arange", name, size)
            if key not in self.subsample:
                self.subsample[key] = torch.arange(size, device=device)
            return size, self.subsample[key]
        return len(subsample), subsample

    def index_at(self, indices: Any, position: int) -> Any:
        """`indices[position]` as the sequential plate yields it, from a list made
        once per draw (indexing a tensor in every lane costs microseconds)."""
        if not isinstance(indices, torch.Tensor):
            return indices[position]
        cached = self.index_lists.get(id(indices))
        if cached is None or cached[0] is not indices:
            cached = self.index_lists[id(indices)] = (indices, indices.tolist())
        return cached[1][position]

    def plate_state(
        self,
        name: str,
        size: int,
        subsample_size: int | None,
        subsample: Any,
        dim: int | None,
        device: str | None,
    ) -> dict:
        """A batch plate's attributes, as Pyro's constructor would set them, checked and
        built once per draw and argument set (the minibatch drawn once)."""
        key = (name, size, subsample_size, dim, device, id(subsample))
        found = self.plate_states.get(key)
        if found is None or found[0] is not subsample:  # kept alive: its id stays its own
            check_sizes(name, size, subsample_size, subsample)
            batch, indices = self.minibatch(name, size, subsample_size, subsample, device)
            state = dict(vars(IndepMessenger(name, size, dim, device)))
            state.update(subsample_size=batch, _indices=indices)
            found = self.plate_states[key] = (subsample, state)
        return found[1]

    def plate_entry(self, name: str, size: int, subsample_size: int) -> PlateEntry:
        """The frames and scales of a batch plate reached by lanes, once per draw."""
        key = (name, size, subsample_size)
        entry = self.plate_entries.get(key)
        if entry is None:
            entry = self.plate_entries[key] = PlateEntry(name, size, subsample_size)
        return entry

    def once(self, fn: Callable, args: tuple, kwargs: dict) -> Any:
        """`fn(*args, **kwargs)`, computed by the first lane that asks, shared by the
        lanes that ask with the same function and the same argument objects."""
        key = (
            getattr(fn, "__func__", fn),
            id(getattr(fn, "__self__", None)),
            tuple(_identity(a) for a in args),
            tuple((k, _identity(v)) for k, v in kwargs.items()),
        )
        found = self.computed.get(key)
        if found is None:
            # The arguments are kept with the result: their ids stay theirs.
            found = self.computed[key] = (fn, args, kwargs, fn(*args, **kwargs))
        return found[3]


class PlateEntry:
    """A batch plate as its lanes see it: one frame per datum and the site scale."""

    __slots__ = ("size", "full_size", "frames", "scale", "unit_scale")

    def __init__(self, name: str, full_size: int, size: int) -> None:
        self.size, self.full_size = size, full_size
        self.frames = [
            BatchFrame(name=name, dim=None, size=size, counter=b + 1, full_size=full_size)
            for b in range(size)
        ]
        self.scale = (full_size, size)  # (N, B): Pyro's subsampling scale is N / B
        self.unit_scale = 1.0 * full_size / size  # as `Lane.site_scale(1.0)`


def _identity(value: Any) -> Any:
    """An argument's part of a `once` key: the object itself for tensors (hashed by
    identity) and other hashables, its id otherwise."""
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return (type(value), value)
