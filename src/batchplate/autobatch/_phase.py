"""One run of one program (model or guide) over all lanes, round by round.

A round resumes every runnable lane until it suspends (at a sample site or
a module call) or finishes; the suspended requests are then grouped by what
can be computed together (not by site name, which differs per datum) and each
group is drawn, replayed and scored as one tensor operation (`_rounds`). Log
densities are kept as `(lane indices, [n] terms)` and summed into `[K, B]` at
the end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from greenlet import getcurrent
from pyro.poutine.trace_messenger import TraceMessenger

from ..errors import BatchPlateError
from ..plate import BatchFrame, BatchInfo
from ..validation import GLOBAL_LATENT_HINT
from ._lanes import (
    DIMS,
    HANDLERS,
    MAX_PARKED,
    Lane,
    LaneMessenger,
    Worker,
    pool,
)
from ._rounds import answer_round
from ._shared import PlateEntry, Shared

Terms = list[tuple[list[int], torch.Tensor]]


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
    names: list[tuple[list[int], tuple, torch.Tensor]] = field(default_factory=list)  # sites
    values: dict[int, dict[str, Any]] = field(default_factory=dict)
    observed: dict[int, dict[str, Any]] = field(default_factory=dict)
    taken: list[dict[str, int]] = field(default_factory=list)  # per particle: site -> datum
    frame: BatchFrame | None = None  # the batch plate's (its first datum's)
    plate: PlateEntry | None = None
    base: list = field(default_factory=list)  # every lane's handler stack when it starts
    dims: list = field(default_factory=list)  # and its plate-dim allocator's
    base_len: int = 0
    fast_len: int = -1  # the stack's length at which a site may skip Pyro's messages
    pool: list = field(default_factory=list)  # parked workers (`_lanes.pool()`)

    # -- lanes -----------------------------------------------------------------

    def run(self) -> Phase:
        """Run every lane to its end, round by round."""
        outer, dims = HANDLERS[:], DIMS[:]
        # Lanes suspend below the caller's handlers, which see every site as in
        # the sequential program; sites skip Pyro's messages only where none of
        # them would act on a sample site (SVI's parameter capture).
        self.base, self.dims = [LaneMessenger(self.shared)] + outer, dims
        self.base_len = len(self.base)
        self.fast_len = self.base_len if all(map(_ignores_samples, outer)) else -1
        self.pool = pool()
        self.taken = [{} for _ in range(self.K)]
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
                self.runnable = answer_round(self, self.pending)
        except BaseException:
            self._end_lanes()
            raise
        finally:
            HANDLERS[:] = outer
            DIMS[:] = dims
        self._check_lanes()
        self.lanes = []  # lanes refer to their phase: no cycle left for the collector
        del self.pool[MAX_PARKED:]  # the rest end (a phase with more lanes started them)
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
        other = lane.taken.setdefault(name, lane.b)
        if other != lane.b:
            raise BatchPlateError(
                f"{self.spec.role} site '{name}' is drawn at datum {other} and at datum "
                f"{lane.b} of particle {lane.k}. Site names must differ per datum (e.g. "
                "f'z_{i}' with i the index the batch plate yields). Under autobatch each lane "
                "runs one iteration of the batch plate's loop, so counting iterations "
                "(enumerate, a counter) sees 0 in every lane: use the yielded index or the "
                "plate's `datum`."
            )

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
        empty = [lane for lane in self.lanes if not lane.values]
        if empty and self.spec.role == "model":
            raise BatchPlateError(
                f"no model site at datum {empty[0].b} of batch plate '{self.frame.name}' "
                f"({empty[0]}): its log weight would be 0; every datum needs its sites."
            )

    @property
    def batch(self) -> BatchInfo:
        return BatchInfo.of(self.frame)

    # -- rounds ---------------------------------------------------------------

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
        for ids, sites, terms in self.names:
            for i, site, term in zip(ids, sites, terms.detach(), strict=True):
                if i == index and not bool(torch.isfinite(term)):
                    found.append(f"{self.spec.role} '{site[0]}' ({float(term)})")
        return found


def _ignores_samples(handler: Any) -> bool:
    """A caller's handler that does nothing to sample sites (`pyro.infer.SVI`'s
    parameter capture)."""
    return type(handler) is TraceMessenger and handler.param_only
