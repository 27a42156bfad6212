"""Lanes: executions of the program per (particle, datum), each with its own Pyro
handler stack, on reused worker greenlets.

Pyro keeps its handlers in one global list, `_PYRO_STACK`. A lane that
suspends inside a `with pyro.plate(...)` must find its own handlers when it
resumes and must not see another lane's: whenever lanes hand over to each
other, the list holds the phase's base stack (`LaneMessenger` and the
caller's handlers), and a lane with handlers of its own sets them aside while
it is suspended (`Lane.suspend`). The alternative, running lanes without
Pyro's stack, would have to re-implement plates, broadcasting, masks and
scales, and miss any handler a user wraps a program in.

`LaneMessenger` sits at the bottom of every lane's stack, below the caller's
handlers: the lane's own handlers (frames, broadcasting, mask, scale) and the
caller's have processed a sample site when it reaches it, as in the
sequential program, and it suspends the lane with the site as its request.
Parameters are looked up once per step and shared, and calls of modules
registered with `pyro.module` become requests too (`ModuleProxy`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pyro
from greenlet import getcurrent, greenlet
from pyro.distributions.distribution import COERCIONS
from pyro.infer.util import site_is_subsample
from pyro.poutine.messenger import Messenger
from torch.distributions import Distribution

from ..errors import BatchPlateError
from ..plate import BatchFrame, set_lane_hook
from ._construct import lane_distribution
from ._shared import Shared


def pyro_global_stacks() -> tuple[list, list]:
    """Pyro's global handler stack and its plate-dim allocator's stack.

    The only use of Pyro internals in batchplate's autobatch (both are private
    to `pyro.poutine.runtime`): a lane swaps their contents when it suspends
    and resumes, so that its handlers (inner plates, masks, scales) are its
    own. Pyro has no public API to run several handler stacks side by side.
    Both lists are created once by Pyro and only mutated in place.
    """
    from pyro.poutine.runtime import _DIM_ALLOCATOR, _PYRO_STACK

    return _PYRO_STACK, _DIM_ALLOCATOR._stack


HANDLERS, DIMS = pyro_global_stacks()


class Lane:
    """One execution of the program for particle `k` and datum `b`, run by a `Worker`."""

    # Until the lane reaches its batch plate (class defaults: a lane is built
    # per datum and particle, so every assignment saved counts).
    plate_name: str | None = None
    frame: BatchFrame | None = None  # the batch plate's frame at this lane's datum
    plate_scale = (1, 1)  # (N, B): Pyro's subsampling scale is N / B
    unit_scale = 1.0  # a site's scale without handlers of its own: 1.0 * N / B
    in_plate = False  # in the body of its batch plate's loop (set by the plate)
    broke = False  # its loop over the batch plate ended early (break, return)
    worker: Worker | None = None  # once started
    done = False
    answer: Any = None  # the scheduler's answer to its request, read when it resumes

    def __init__(self, phase: Any, k: int, b: int, index: int, kwargs: dict) -> None:
        # `phase`: the `_phase.Phase` running this lane (not imported: it imports us).
        self.phase, self.k, self.b, self.kwargs = phase, k, b, kwargs
        self.index = index  # flat position `k * B + b` in the `[K, B]` weights
        self.base_len = phase.base_len  # handlers below the lane's own: ours, the caller's
        self.fast_len = phase.fast_len
        self.values: dict[str, Any] = {}  # site name -> value (`Phase.values[index]`)
        self.taken = phase.taken[k]  # the particle's site names -> their datum

    def site_scale(self, scale: Any) -> Any:
        """A site's scale with the batch plate's `N / B`, computed as Pyro's plate does."""
        size, subsample_size = self.plate_scale
        return scale * size / subsample_size

    def suspend(self, request: Any) -> Any:
        """Hand `request` to the phase and run the round's next lane; return the
        answer this lane gets when it is resumed.

        Lanes hand over to each other directly (one switch per site, not two
        through the scheduler; `Phase.hand_over`). Whoever runs next finds the
        phase's base stack: a lane with handlers of its own keeps them aside
        meanwhile.
        """
        phase = self.phase
        phase.pending.append((self, request))
        if len(HANDLERS) == self.base_len:
            phase.hand_over(lane_running=True)
        else:
            mine, dims = HANDLERS[:], DIMS[:]
            HANDLERS[:], DIMS[:] = phase.base, phase.dims
            try:
                phase.hand_over(lane_running=True)
            finally:  # also when the scheduler ends the lane (GreenletExit)
                HANDLERS[:] = mine
                DIMS[:] = dims
        answer, self.answer = self.answer, None
        return answer

    def __repr__(self) -> str:
        return f"lane(k={self.k}, b={self.b})"


class Worker(greenlet):
    """A greenlet that runs lanes, one after another.

    Starting and ending a greenlet costs about 5 us, a third of a lane's whole
    overhead, so workers are kept (per thread, `pool()`) and reused: a worker
    whose lane has finished runs the round's next lane if it has not started,
    or parks in the pool until a phase hands it a lane to start. A parked
    worker's frame holds nothing of the phase (answers travel on the lanes).
    """

    lane: Lane | None = None

    def run(self, lane: Lane) -> None:  # started by the scheduler, `switch(lane)`
        while lane is not None:
            self.lane = lane
            lane.worker = self
            phase = lane.phase
            phase.spec.program(*phase.spec.args, **lane.kwargs)
            lane.done = True
            self.lane = None
            target = phase.after(lane)
            if type(target) is Lane:
                lane = target
            else:
                workers, phase, lane = phase.pool, None, None
                lane = _park(self, target, workers)


def _park(worker: Worker, target: greenlet, workers: list[Worker]) -> Lane | None:
    """Park `worker` in the pool `workers` and switch to `target`; return the lane
    it is resumed with, or `None` to end it."""
    workers.append(worker)
    return target.switch()


_local = threading.local()
MAX_PARKED = 8192  # parked workers kept per thread (a parked worker holds a few kB)


def pool() -> list[Worker]:
    """This thread's parked workers (greenlets cannot change threads)."""
    workers = getattr(_local, "pool", None)
    if workers is None:
        workers = _local.pool = []
    return workers


def current_lane() -> Lane | None:
    worker = getcurrent()
    return worker.lane if type(worker) is Worker else None


#: A lane's sample request: `(name, fn, value, is_observed, scale, mask)`, the
#: parts of Pyro's message the scheduler reads (a tuple: one is built per site
#: and lane). `value` is the observation, or `None`.
SITE_FIELDS = ("name", "fn", "value", "is_observed", "scale", "mask")


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
            lane.phase.check_site(lane, msg["name"])
            site = (msg["name"], msg["fn"], msg["value"], msg["is_observed"])
            msg["value"] = lane.suspend(site + (msg["scale"], msg["mask"]))
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


def once(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)`, computed once per autobatched draw and shared by all lanes.

    Code before a program's batch plate runs once per lane under autobatch
    (`K * B` times where the sequential program runs it `K` times): wrap an
    expensive, deterministic computation there (a normalizing constant, a
    table derived from parameters) in `once`, so that the lanes share one
    value and one autograd graph. Lanes share it when they pass the same
    function and the very same argument objects (tensors by identity, other
    values by equality). Outside autobatch it is `fn(*args, **kwargs)`.

    :param fn: a function that does not sample.
    :param args: its positional arguments.
    :param kwargs: its keyword arguments.
    """
    lane = current_lane()
    if lane is None:
        return fn(*args, **kwargs)
    return lane.phase.shared.once(fn, args, kwargs)


_PYRO_MODULE, _PYRO_SAMPLE, _PYRO_PARAM = pyro.module, pyro.sample, pyro.param


def lane_sample(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """`pyro.sample` while lanes run.

    A lane without handlers of its own (no inner plate, mask or scale open),
    run by a caller whose handlers ignore sample sites, skips Pyro's message
    machinery: the site's frame and scale are the batch plate's, known to the
    lane. Anything else takes Pyro's path, at the end of which `LaneMessenger`
    suspends the lane all the same.
    """
    worker = getcurrent()
    if type(worker) is not Worker:
        return _PYRO_SAMPLE(name, fn, *args, **kwargs)
    lane = worker.lane
    if (
        args
        or not lane.in_plate
        or len(HANDLERS) != lane.fast_len
        or (kwargs and not kwargs.keys() <= _FAST_KEYWORDS)
    ):
        return _PYRO_SAMPLE(name, fn, *args, **kwargs)
    obs, infer = kwargs.get("obs"), kwargs.get("infer")
    if infer is not None and infer.get("_deterministic", False):
        return obs
    if lane.taken.setdefault(name, lane.b) != lane.b:  # `Phase.check_site`, inlined
        lane.phase.check_site(lane, name)
    return lane.suspend((name, fn, obs, obs is not None, lane.unit_scale, None))


_FAST_KEYWORDS = frozenset(("obs", "infer"))


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
            key = (name, id(nn_module))
            if key not in shared.modules:  # registered once, through the caller's handlers
                _PYRO_MODULE(name, nn_module, update_module_params)
                shared.modules[key] = ModuleProxy(nn_module, name)
            return shared.modules[key]

        def param(name: str, *args: Any, **kwargs: Any) -> Any:
            lane = current_lane()
            if lane is not None and name in shared.params and len(HANDLERS) == lane.fast_len:
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
        COERCIONS.insert(0, lane_distribution)
        return self

    def __exit__(self, *exc: object) -> None:
        pyro.module, pyro.sample, pyro.param = _PYRO_MODULE, _PYRO_SAMPLE, _PYRO_PARAM
        set_lane_hook(None)
        COERCIONS.remove(lane_distribution)
        Distribution.set_default_validate_args(self.validate)


class _PlateHook:
    """The batch plate's view of the lanes (see `batchplate.plate.set_lane_hook`)."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared

    def position(self, plate: Any) -> tuple[int, Any, Lane] | None:
        worker = getcurrent()
        if type(worker) is not Worker:
            return None
        lane = worker.lane
        position = lane.phase.enter_plate(lane, plate)
        return position, self.shared.index_at(plate.indices, position), lane

    def plate_state(self, *plate_args: Any) -> dict | None:
        """`Shared.plate_state(*plate_args)` in a lane, `None` outside lanes."""
        if current_lane() is None:
            return None
        return self.shared.plate_state(*plate_args)
