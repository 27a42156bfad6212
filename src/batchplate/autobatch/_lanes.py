"""Lanes: one greenlet per (particle, datum), each with its own Pyro handler stack.

Pyro keeps its handlers in one global list, `_PYRO_STACK`. A lane that
suspends inside a `with pyro.plate(...)` must find its own handlers when it
resumes and must not see another lane's, so each lane saves the list's
contents when it suspends and restores them when it resumes (`Lane.suspend`).
The list is short (the caller's handlers, `LaneMessenger`, the lane's batch
plate and inner plates, masks), so the swap costs well under a microsecond;
the alternative, running lanes without Pyro's stack, would have to
re-implement plates, broadcasting, masks and scales, and miss any handler a
user wraps a program in.

`LaneMessenger` sits just above the caller's handlers in every lane's stack:
the lane's own handlers have processed a sample site (frames, broadcasting,
mask, scale) when it reaches it, and it suspends the lane with the site as
its request. Parameters are looked up once per step and shared, and calls of
modules registered with `pyro.module` become requests too (`ModuleProxy`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyro
import torch
from greenlet import getcurrent, greenlet
from pyro.infer.util import site_is_subsample
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _DIM_ALLOCATOR, _PYRO_STACK
from torch.distributions import Distribution

from ..errors import BatchPlateError
from ..plate import BatchFrame, set_lane_hook


class Lane(greenlet):
    """One execution of the program for particle `k` and datum `b`."""

    def __init__(self, phase: Any, k: int, b: int, run: Callable[[], Any]) -> None:
        # `phase`: the `_phase.Phase` running this lane (not imported: it imports us).
        super().__init__(run, parent=phase.scheduler)
        self.phase, self.k, self.b = phase, k, b
        self.plate_name: str | None = None
        self.frame: BatchFrame | None = None  # the batch plate's frame at this lane's datum
        self.plate_scale = (1, 1)  # (N, B): Pyro's subsampling scale is N / B
        self.in_plate = False
        self.base_len = 0  # handlers below the lane's own: the caller's and LaneMessenger
        self.sites = 0

    def __enter__(self) -> Lane:  # the body of the batch plate's loop
        self.in_plate = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.in_plate = False

    def site_scale(self, scale: Any) -> Any:
        """A site's scale with the batch plate's `N / B`, computed as Pyro's plate does."""
        size, subsample_size = self.plate_scale
        return scale * size / subsample_size

    @property
    def index(self) -> int:
        """Flat position `k * B + b` in the `[K, B]` weights."""
        return self.k * self.phase.B + self.b

    def suspend(self, request: Any) -> Any:
        """Hand `request` to the scheduler; return what it answers."""
        mine, dims = _PYRO_STACK[:], _DIM_ALLOCATOR._stack[:]
        try:
            return self.parent.switch(request)
        finally:  # also when the scheduler ends the lane (GreenletExit)
            _PYRO_STACK[:] = mine
            _DIM_ALLOCATOR._stack[:] = dims

    def __repr__(self) -> str:
        return f"lane(k={self.k}, b={self.b})"


def current_lane() -> Lane | None:
    lane = getcurrent()
    return lane if isinstance(lane, Lane) else None


class LaneMessenger(Messenger):
    """Suspends lanes at sample sites; shares parameter look-ups between lanes."""

    def __init__(self, shared: Shared) -> None:
        super().__init__()
        self.shared = shared

    def _process_message(self, msg: dict) -> None:
        if msg["type"] == "sample":
            self._sample(msg)
        elif msg["type"] == "param" and msg["name"] in self.shared.params:
            msg["value"] = self.shared.params[msg["name"]]
            msg["done"] = msg["stop"] = True

    def _postprocess_message(self, msg: dict) -> None:
        # The first look-up of a parameter went through the caller's handlers
        # (SVI's parameter capture sees it); later lanes reuse its value.
        if msg["type"] == "param":
            self.shared.params.setdefault(msg["name"], msg["value"])

    def _sample(self, msg: dict) -> None:
        lane = current_lane()
        if lane is None:  # a program started outside the lanes: not ours
            return
        if site_is_subsample(msg):
            msg["value"] = self.shared.subsample_indices(msg)
        elif not msg["infer"].get("_deterministic", False):
            if not lane.in_plate:
                raise lane.phase.outside_error(lane, msg)
            # What the (unpushed) batch plate would have added, outermost frame first.
            msg["cond_indep_stack"] = (lane.frame,) + tuple(msg["cond_indep_stack"])
            msg["scale"] = lane.site_scale(msg["scale"])
            lane.phase.check_site(lane, msg)
            msg["value"] = lane.suspend(msg)
        msg["done"] = msg["stop"] = True


class ModuleProxy:
    """What `pyro.module` returns inside a lane: the module, whose method calls
    suspend the lane so that the scheduler can batch them across lanes."""

    __slots__ = ("_module", "_name")

    def __init__(self, module: Any, name: str) -> None:
        self._module, self._name = module, name

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._module, attr)
        if callable(value) and getattr(value, "__self__", None) is self._module:
            return _Method(self, attr)
        return value

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _Method(self, "__call__")(*args, **kwargs)


class _Method:
    __slots__ = ("proxy", "attr")

    def __init__(self, proxy: ModuleProxy, attr: str) -> None:
        self.proxy, self.attr = proxy, attr

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        lane = current_lane()
        module = self.proxy._module
        if lane is None:
            return getattr(module, self.attr)(*args, **kwargs)
        return lane.suspend(Call(module, self.proxy._name, self.attr, args, kwargs))


class Call:
    """A lane's request to call `module.attr(*args, **kwargs)`."""

    __slots__ = ("module", "name", "attr", "args", "kwargs")

    def __init__(self, module: Any, name: str, attr: str, args: tuple, kwargs: dict) -> None:
        self.module, self.name, self.attr, self.args, self.kwargs = (
            module,
            name,
            attr,
            args,
            kwargs,
        )


class Shared:
    """What all lanes of one draw share: parameters, the minibatch, module checks."""

    def __init__(self, subsample: dict[str, Any] | None = None) -> None:
        self.params: dict[str, Any] = {}
        self.modules: dict[tuple[str, int], ModuleProxy] = {}
        self.subsample = {} if subsample is None else subsample
        self.verified: set = set()  # module call signatures whose batching was checked
        self.unbatchable: set = set()
        self.validate = False  # the caller's distribution validation, for stacked distributions

    def subsample_indices(self, msg: dict) -> Any:
        """One minibatch per draw: the first lane's indices (or the given ones)."""
        name = msg["name"]
        if name not in self.subsample:
            self.subsample[name] = msg["value"] if msg["value"] is not None else msg["fn"]()
        return self.subsample[name]

    def minibatch(
        self, name: str, size: int, subsample_size: int | None, subsample: Any
    ) -> tuple[int, Any]:
        """`(B, indices)` of a batch plate built in a lane, as Pyro's plate would set
        them, the indices drawn once per draw (or given)."""
        if subsample is None and subsample_size is not None and subsample_size < size:
            if name not in self.subsample:
                self.subsample[name] = torch.randperm(size)[:subsample_size]  # as Pyro's plate
            subsample = self.subsample[name]
        elif subsample is not None:
            self.subsample.setdefault(name, subsample)
        if subsample is None:  # Pyro's plate would build `arange(size)` in every lane
            key = ("arange", name, size)
            if key not in self.subsample:
                self.subsample[key] = torch.arange(size)
            return size, self.subsample[key]
        return len(subsample), subsample

    def module(self, name: str, nn_module: Any, update_module_params: bool = False) -> Any:
        key = (name, id(nn_module))
        if key not in self.modules:  # registered once, through the caller's handlers
            _PYRO_MODULE(name, nn_module, update_module_params)
            self.modules[key] = ModuleProxy(nn_module, name)
        return self.modules[key]


_PYRO_MODULE, _PYRO_SAMPLE, _PYRO_PARAM = pyro.module, pyro.sample, pyro.param


def lane_sample(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """`pyro.sample` while lanes run.

    A lane without handlers of its own (no inner plate, mask or scale open)
    skips Pyro's message machinery: the site's frame and scale are the batch
    plate's, known to the lane. Anything else takes Pyro's path, at the end of
    which `LaneMessenger` suspends the lane all the same.
    """
    lane = current_lane()
    if (
        lane is None
        or args
        or len(_PYRO_STACK) != lane.base_len
        or not lane.in_plate
        or kwargs.keys() - {"obs", "infer"}
    ):
        return _PYRO_SAMPLE(name, fn, *args, **kwargs)
    obs, infer = kwargs.get("obs"), kwargs.get("infer")
    msg = {
        "type": "sample",
        "name": name,
        "fn": fn,
        "is_observed": obs is not None,
        "value": obs,
        "infer": {} if infer is None else infer,
        "scale": lane.site_scale(1.0),
        "mask": None,
        "cond_indep_stack": (lane.frame,),
    }
    if msg["infer"].get("_deterministic", False):
        return obs
    lane.phase.check_site(lane, msg)
    return lane.suspend(msg)


class installed:
    """While lanes run: the batch plate's lane hook and the lanes' `pyro.module`."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared

    def __enter__(self) -> installed:
        if pyro.module is not _PYRO_MODULE:
            raise BatchPlateError("autobatch runs cannot be nested")
        shared = self.shared

        def module(name: str, nn_module: Any, update_module_params: bool = False) -> Any:
            if current_lane() is None:
                return _PYRO_MODULE(name, nn_module, update_module_params)
            return shared.module(name, nn_module, update_module_params)

        def param(name: str, *args: Any, **kwargs: Any) -> Any:
            lane = current_lane()
            if lane is not None and name in shared.params and len(_PYRO_STACK) == lane.base_len:
                return shared.params[name]  # looked up once per draw (LaneMessenger)
            return _PYRO_PARAM(name, *args, **kwargs)

        pyro.module, pyro.sample, pyro.param = module, lane_sample, param
        set_lane_hook(_PlateHook(shared))
        # Lanes build their distributions unvalidated (several us each); the
        # stacked distribution of each group is built with the caller's setting,
        # so every lane's parameters and values are still checked, at once.
        self.validate = Distribution._validate_args
        shared.validate = self.validate
        Distribution.set_default_validate_args(False)
        return self

    def __exit__(self, *exc: object) -> None:
        pyro.module, pyro.sample, pyro.param = _PYRO_MODULE, _PYRO_SAMPLE, _PYRO_PARAM
        set_lane_hook(None)
        Distribution.set_default_validate_args(self.validate)


class _PlateHook:
    """The batch plate's view of the lanes (see `batchplate.plate.set_lane_hook`)."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared

    def position(self, plate: Any) -> tuple[int, Lane] | None:
        lane = current_lane()
        return None if lane is None else (lane.phase.enter_plate(lane, plate), lane)

    def minibatch(
        self, name: str, size: int, subsample_size: int | None, subsample: Any
    ) -> tuple[int, Any] | None:
        if current_lane() is None:
            return None
        return self.shared.minibatch(name, size, subsample_size, subsample)
