"""One run of one program (model or guide) over all lanes, round by round.

A round resumes every runnable lane until it suspends (at a sample site or
a module call) or finishes; the suspended requests are then grouped by what
can be computed together (not by site name, which differs per datum) and each
group is drawn, replayed and scored as one tensor operation. Log densities
are kept as `(lane indices, [n] terms)` and summed into `[K, B]` at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from greenlet import getcurrent

from ..errors import BatchPlateError
from ..plate import BatchFrame, BatchInfo
from ..validation import GLOBAL_LATENT_HINT
from ._lanes import (
    DIMS,
    HANDLERS,
    Call,
    Lane,
    LaneMessenger,
    PlateEntry,
    Shared,
    Worker,
    pool,
)
from ._stack import (
    as_lane_tensor,
    build,
    call_signature,
    dist_spec,
    same_objects,
    same_output,
    stack,
    stacked_call,
    warn_once,
)

Terms = list[tuple[list[int], torch.Tensor]]
_NOTHING: dict = {}


@dataclass
class PhaseSpec:
    """What a phase runs and how its sites get values.

    :param role: `"model"` or `"guide"`.
    :param program: the model or the guide.
    :param args: its positional arguments.
    :param kwargs: its keyword arguments, or per particle `k` (`kwargs_of`).
    :param replay: per lane index, site name to value: sites of these names take them.
    :param uncondition: sample observed sites too (the sleep phase's fantasies).
    :param detach: detach drawn values before scoring (RWS).
    :param kwargs_of: per-particle keyword arguments (the sleep guide's `observations`).
    """

    role: str
    program: Callable
    args: tuple
    kwargs: dict
    replay: dict[int, dict] | None = None
    uncondition: bool = False
    detach: bool = False
    kwargs_of: Callable[[int], dict] | None = None


@dataclass
class Phase:
    """The state of one phase: its lanes, their values and their log densities."""

    spec: PhaseSpec
    K: int
    B: int | None
    shared: Shared
    scheduler: Any = field(default_factory=getcurrent)
    lanes: list[Lane] = field(default_factory=list)
    runnable: list = field(default_factory=list)  # this round's lanes, answers on them
    pending: list = field(default_factory=list)  # this round's `(lane, request)`s
    position: int = 0  # the next of `runnable` to resume
    terms: Terms = field(default_factory=list)
    score_terms: Terms = field(default_factory=list)
    names: list[tuple[list[int], list[str], torch.Tensor]] = field(default_factory=list)
    values: dict[int, dict[str, Any]] = field(default_factory=dict)
    observed: dict[int, dict[str, Any]] = field(default_factory=dict)
    taken: dict[tuple[int, str], int] = field(default_factory=dict)  # (k, site) -> datum
    frame: BatchFrame | None = None  # the batch plate's (its first datum's)
    plate: PlateEntry | None = None
    base: list = field(default_factory=list)  # every lane's handler stack when it starts
    dims: list = field(default_factory=list)  # and its plate-dim allocator's
    base_len: int = 0
    pool: list = field(default_factory=list)  # parked workers (`_lanes.pool()`)

    # -- lanes -----------------------------------------------------------------

    def run(self) -> Phase:
        """Run every lane to its end, round by round."""
        outer, dims = HANDLERS[:], DIMS[:]
        self.base, self.dims = outer + [LaneMessenger(self.shared)], dims
        self.base_len = len(self.base)
        self.pool = pool()
        HANDLERS[:] = self.base  # every lane starts and resumes on it (`Lane.suspend`)
        if self.B is None:  # the first lane finds B at the batch plate and spawns the rest
            self._spawn(0, 0)
        else:
            self._spawn_all()
        try:
            while self.runnable:
                self.pending, self.position = [], 0
                while self.position < len(self.runnable):  # lanes spawned in a round join it
                    self.hand_over()  # returns when a lane ends or the round's last suspends
                self.runnable = self._execute(self.pending)
        except BaseException:
            self._end_lanes()
            raise
        finally:
            HANDLERS[:] = outer
            DIMS[:] = dims
        self._check_lanes()
        self.lanes = []  # lanes refer to their phase: no cycle left for the collector
        return self

    def hand_over(self, lane_running: bool = False) -> None:
        """Resume the round's next lane, or the scheduler after the last.

        A lane that has not started is started by a parked worker, or by a new
        one that the scheduler starts: a greenlet starts at its starter's
        recursion depth, so workers started by lanes would stack their depths
        up to Python's limit.
        """
        runnable, position = self.runnable, self.position
        if position < len(runnable):
            lane = runnable[position]
            if lane.worker is not None:
                self.position = position + 1
                lane.worker.switch()
                return
            if self.pool or not lane_running:
                self.position = position + 1
                worker = self.pool.pop() if self.pool else Worker(parent=self.scheduler)
                if worker.parent is not self.scheduler:
                    worker.parent = self.scheduler  # where a lane's exception goes
                worker.switch(lane)
                return
        self.scheduler.switch()

    def after(self, lane: Lane) -> Lane | Any:
        """A lane has returned: the round's next lane if its worker can start it, else
        the greenlet its worker hands over to before parking."""
        if lane.broke:
            self.finished(lane)
        if len(HANDLERS) != self.base_len:  # a handler the program left open is not the next's
            HANDLERS[:], DIMS[:] = self.base, self.dims
        runnable, position = self.runnable, self.position
        if position < len(runnable):
            lane = runnable[position]
            self.position = position + 1
            return lane if lane.worker is None else lane.worker
        return self.scheduler

    def _spawn(self, k: int, b: int) -> None:
        spec = self.spec
        kwargs = spec.kwargs if spec.kwargs_of is None else spec.kwargs_of(k)
        lane = Lane(self, k, b, k * (self.B or 1) + b, kwargs)
        self.values[lane.index] = lane.values
        self.lanes.append(lane)
        self.runnable.append(lane)

    def _spawn_all(self) -> None:
        """Every lane but `(0, 0)`'s, which may be running (it found `B`)."""
        spec, B, lanes, runnable, values = self.spec, self.B, self.lanes, self.runnable, self.values
        for k in range(self.K):
            kwargs = spec.kwargs if spec.kwargs_of is None else spec.kwargs_of(k)
            for b in range(B):
                if k or b or not lanes:
                    lane = Lane(self, k, b, k * B + b, kwargs)
                    values[lane.index] = lane.values
                    lanes.append(lane)
                    runnable.append(lane)

    def finished(self, lane: Lane) -> None:
        """A lane whose batch plate's loop ended early has returned."""
        if lane.broke and lane.b < self.B - 1:
            raise BatchPlateError(
                f"the {self.spec.role}'s loop over batch_plate('{lane.plate_name}') ended at "
                f"datum {lane.b} of {self.B} ({lane}): the sequential program would not reach "
                f"data {lane.b + 1} to {self.B - 1}, which would get log weight 0. Did the loop "
                "end early (a `return` or `break` inside `for i in batch_plate(...)`)?"
            )

    def _end_lanes(self) -> None:
        """End suspended lanes in their own stacks, so their `with` blocks unwind there
        (their workers end with them)."""
        for lane in self.lanes:
            worker = lane.worker
            if worker is not None and not lane.done and not worker.dead:
                try:
                    worker.throw()
                except BaseException:  # noqa: BLE001 - ending, whatever the lane raises
                    pass

    def enter_plate(self, lane: Lane, plate: Any) -> int:
        """The lane reached its sequential batch plate: its datum's position."""
        if lane.plate_name is not None and lane.plate_name != plate.name:
            raise BatchPlateError(
                f"batch_plate('{plate.name}') after batch_plate('{lane.plate_name}') in the "
                f"{self.spec.role}: a program has exactly one batch plate."
            )
        if lane.in_plate:
            raise BatchPlateError(
                f"batch_plate('{plate.name}') is nested inside batch_plate('{lane.plate_name}'): "
                "a program has exactly one batch plate; use pyro.plate inside a datum."
            )
        entry = self.shared.plate_entry(plate.name, plate.size, plate.subsample_size)
        if entry is not self.plate:
            self._plate_reached(entry, lane)
        lane.plate_name = plate.name
        lane.plate_scale, lane.unit_scale = entry.scale, entry.unit_scale
        lane.frame = entry.frames[lane.b]
        return lane.b

    def _plate_reached(self, entry: PlateEntry, lane: Lane) -> None:
        """The phase's first lane at its batch plate finds `B`; any other plate is an error."""
        frame = entry.frames[0]
        if self.B is None:
            self.B = entry.size
            self._spawn_all()
        elif entry.size != self.B:
            raise BatchPlateError(
                f"the {self.spec.role}'s batch_plate('{frame.name}') has {entry.size} data where "
                f"the other program's has {self.B}: model and guide disagree on the batch plate."
            )
        if self.plate is not None:
            raise BatchPlateError(
                f"the {self.spec.role} has batch plate '{frame.name}' (size {frame.size}) at "
                f"datum {lane.b}, '{self.frame.name}' (size {self.frame.size}) at other "
                "data: a program has exactly one batch plate."
            )
        self.plate, self.frame = entry, frame

    # -- checks ---------------------------------------------------------------

    def check_site(self, lane: Lane, name: str) -> None:
        """Site names unique within a particle (the lane's plate was checked on entry)."""
        other = self.taken.setdefault((lane.k, name), lane.b)
        if other != lane.b:
            raise BatchPlateError(
                f"{self.spec.role} site '{name}' is drawn at datum {other} and at datum "
                f"{lane.b} of particle {lane.k}. Site names must differ per datum (e.g. "
                "f'z_{i}' with i the index the batch plate yields). Under autobatch each lane "
                "runs one iteration of the batch plate's loop, so counting iterations "
                "(enumerate, a counter) sees 0 in every lane: use the yielded index or the "
                "plate's `datum`."
            )
        lane.sites += 1

    def outside_error(self, lane: Lane, msg: dict) -> BatchPlateError:
        return BatchPlateError(
            f"{self.spec.role} site '{msg['name']}' is outside the batch plate ({lane}). "
            "Under autobatch, code outside the batch plate's loop runs once per lane and must "
            f"not sample. {GLOBAL_LATENT_HINT}"
        )

    def _check_lanes(self) -> None:
        if self.B is None or self.frame is None:
            raise BatchPlateError(
                f"the {self.spec.role} has no sample site inside a batch plate: nothing to weigh"
            )
        empty = [lane for lane in self.lanes if lane.sites == 0]
        if empty and self.spec.role == "model":
            raise BatchPlateError(
                f"no model site at datum {empty[0].b} of batch plate '{self.frame.name}' "
                f"({empty[0]}): its log weight would be 0; every datum needs its sites."
            )

    @property
    def batch(self) -> BatchInfo:
        return BatchInfo.of(self.frame)

    # -- rounds ---------------------------------------------------------------

    def _execute(self, pending: list) -> list:
        """Answer every suspended lane: one group per batchable kind of request.

        Items are `(lane, request, stacked parameters, given value)`.
        """
        groups: dict[Any, list] = {}
        for lane, request in pending:
            if type(request) is Call:
                key = ("call", id(request.module), request.attr) + call_signature(
                    request.args, request.kwargs
                )
                item = (lane, request, None, None)
            else:
                key, params, value = self._sample_key(lane, request)
                item = (lane, request, params, value)
            group = groups.get(key)
            if group is None:
                groups[key] = [item]
            else:
                group.append(item)
        answered = []
        for key, items in groups.items():
            if key[0] == "call":
                outputs = self._calls(key, items)
            elif key[0] == "lane":
                outputs = [self._lane_site(item) for item in items]
            else:
                outputs = self._sites(key, items)
            for item, output in zip(items, outputs, strict=True):
                item[0].answer = output
                answered.append(item[0])
        return answered

    def _given(self, lane: Lane, msg: dict) -> tuple[str, Any]:
        """`(source, value)`: an observation, the lane's replayed value, or a draw (`None`)."""
        if msg["is_observed"] and not self.spec.uncondition:
            return "obs", as_lane_tensor(msg["value"])
        replay = self.spec.replay
        if replay is not None:
            value = replay.get(lane.index, _NOTHING).get(msg["name"])
            if value is not None:
                return "replay", value
        return "draw", None

    def _sample_key(self, lane: Lane, msg: dict) -> tuple[tuple, tuple | None, Any]:
        """`(group key, parameters, given value)` of a sample site."""
        source, value = self._given(lane, msg)
        spec = dist_spec(msg["fn"])
        if spec is None:
            warn_once(f"site '{msg['name']}' ({type(msg['fn']).__name__})", "not stackable")
            return ("lane", id(msg)), None, value
        scale = msg["scale"]
        scaled = isinstance(scale, torch.Tensor) or scale != 1.0
        shape = None if value is None else value.shape
        return ("site", spec[0], source, shape, msg["mask"] is not None, scaled), spec[1], value

    # -- sample sites -----------------------------------------------------------

    def _sites(self, key: tuple, items: list) -> list:
        """Draw, replay or observe a group's sites as one distribution; score it."""
        _, dist_key, source, _, _, _ = key
        n, first = len(items), items[0][1]["fn"]
        try:
            params = [stack([item[2][j] for item in items]) for j in range(len(items[0][2]))]
            fn = build(dist_key, params, self.shared.validate)
            if fn.batch_shape[1:] != first.batch_shape or fn.event_shape != first.event_shape:
                raise ValueError(f"stacked shape {fn.batch_shape} + {fn.event_shape}")
        except (ValueError, RuntimeError, TypeError) as e:
            warn_once(f"site '{items[0][1]['name']}' ({type(first).__name__})", str(e))
            return [self._lane_site(item) for item in items]
        dims = len(first.batch_shape) + len(first.event_shape)
        if source == "draw":
            value = fn.rsample() if fn.has_rsample else fn.sample()
            if self.spec.detach:
                value = value.detach()
            views = value.unbind(0)
        else:
            views = [item[3] for item in items]
            value = stack(views)
            if views[0].dim() < dims:  # an observation that broadcasts: align it on the right
                pad = (1,) * (dims - views[0].dim())
                value = value.reshape((n,) + pad + views[0].shape)
        self._record(items, fn.log_prob(value), not fn.has_rsample)
        self._keep(items, views)
        return views

    def _lane_site(self, item: tuple) -> Any:
        """A site that cannot be stacked, drawn and scored in its own lane."""
        fn, value = item[1]["fn"], item[3]
        if value is None:
            value = fn.rsample() if fn.has_rsample else fn.sample()
            if self.spec.detach:
                value = value.detach()
        self._record([item], fn.log_prob(value).unsqueeze(0), not fn.has_rsample)
        self._keep([item], [value])
        return value

    def _keep(self, items: list, views: list) -> None:
        """Remember the lanes' values, for the next phase's replay and the sleep's
        observations."""
        for (lane, msg, _, _), view in zip(items, views, strict=True):
            lane.values[msg["name"]] = view
            if msg["is_observed"]:
                self.observed.setdefault(lane.index, {})[msg["name"]] = view

    def _record(self, items: list, log_prob: torch.Tensor, score: bool) -> None:
        """Add each lane's masked and scaled log density (summed over its inner
        plates and event dims) to the lane's terms."""
        msgs = [item[1] for item in items]
        n, shape = log_prob.shape[0], log_prob.shape[1:]
        unscaled = log_prob
        if msgs[0]["mask"] is not None:
            mask = torch.stack([as_lane_tensor(m["mask"]).expand(shape) for m in msgs])
            unscaled = torch.where(mask, log_prob, log_prob.new_zeros(()))
        scaled = unscaled * _scales(msgs, shape, log_prob)
        ids = [item[0].index for item in items]
        names = [m["name"] for m in msgs]
        if log_prob.dim() > 1:
            scaled, unscaled = scaled.reshape(n, -1).sum(1), unscaled.reshape(n, -1).sum(1)
        self.terms.append((ids, scaled))
        self.names.append((ids, names, scaled))
        if score and self.spec.role == "guide":
            self.score_terms.append((ids, unscaled))

    # -- module calls -----------------------------------------------------------

    def _calls(self, key: tuple, items: list) -> list:
        """One call of the module for the group; lane by lane where that is not exact."""
        call = items[0][1]
        method = getattr(call.module, call.attr)
        calls = [(item[1].args, item[1].kwargs) for item in items]
        if len(calls) == 1 or same_objects(calls):  # e.g. an encoder of the whole minibatch
            return [method(*call.args, **call.kwargs)] * len(calls)
        shared = self.shared
        if key not in shared.unbatchable:
            try:
                outputs = stacked_call(method, calls)
                if key not in shared.verified:
                    with torch.no_grad():
                        reference = method(*call.args, **call.kwargs)
                    if not same_output(reference, outputs[0]):
                        raise ValueError("its stacked output differs from its lane's own")
                    shared.verified.add(key)
                return outputs
            except (ValueError, RuntimeError, TypeError, IndexError) as e:
                shared.unbatchable.add(key)
                warn_once(f"module call '{call.name}.{call.attr}'", str(e))
        return [method(*args, **kwargs) for args, kwargs in calls]

    # -- [K, B] ---------------------------------------------------------------

    def per_lane(self, terms: Terms) -> torch.Tensor | None:
        """`[K, B]`: the terms summed per lane (`None` without terms)."""
        if not terms:
            return None
        values = torch.cat([t for _, t in terms])
        index = torch.tensor([i for ids, _ in terms for i in ids], device=values.device)
        total = values.new_zeros(self.K * self.B).index_add(0, index, values)
        return total.reshape(self.K, self.B)

    def culprits(self, k: int, b: int) -> list[str]:
        """Sites with a non-finite log density in lane `(k, b)`."""
        index, found = k * self.B + b, []
        for ids, names, terms in self.names:
            for i, name, term in zip(ids, names, terms.detach(), strict=True):
                if i == index and not bool(torch.isfinite(term)):
                    found.append(f"{self.spec.role} '{name}' ({float(term)})")
        return found


def _scales(msgs: list, shape: torch.Size, like: torch.Tensor) -> torch.Tensor | float:
    """The sites' scales, `[n, 1, ...]` (or one number when they agree)."""
    scales = [m["scale"] for m in msgs]
    first = scales[0]
    if not any(isinstance(s, torch.Tensor) for s in scales):
        if all(s == first for s in scales):
            return first
        return like.new_tensor(scales).reshape((len(scales),) + (1,) * len(shape))
    return torch.stack([as_lane_tensor(s).expand(shape) for s in scales]).to(like.dtype)
