"""The batch plate: a `pyro.plate` that marks "the datum" for the objectives.

A batch plate behaves exactly like `pyro.plate` (vectorized as a context
manager, sequential as an iterator, with subsampling and broadcasting), so a
program written with it still runs under stock Pyro objectives and gives
Pyro's numbers there. The only difference is that every sample site inside it
carries a `BatchFrame` in its `cond_indep_stack`; batchplate's objectives use
that frame to group log probabilities per datum. `batch_frame` is the one
place that finds it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.runtime import get_plates
from pyro.primitives import plate

from .errors import BatchPlateError

# Set by `batchplate.autobatch` while its lanes run; a hook, not an import, so
# the plate does not depend on autobatch. In a lane, `hook.position(plate)` is
# `(position of the lane's datum, its index, the lane)`, the lane flagged
# `in_plate` during the loop's body and `broke` if the body left early,
# and `hook.plate_state(name, size, subsample_size, subsample, dim, device)` the
# plate's checked attributes, shared by the lanes (minibatch included); outside
# lanes both return `None`.
_lane_hook: list[Any] = []


def set_lane_hook(hook: Any) -> None:
    """Install (or, with `None`, remove) autobatch's lane hook."""
    _lane_hook[:] = [] if hook is None else [hook]


class BatchFrame(CondIndepStackFrame):
    """A `CondIndepStackFrame` of a batch plate.

    It compares and hashes like the plain frame, so Pyro's own machinery
    (model/guide matching, broadcasting, Rao-Blackwellization) is unaffected.
    """

    __slots__ = ()

    @property
    def datum(self) -> int:
        """Position of this frame's datum in the minibatch (sequential plates)."""
        return self.counter - 1


def batch_frame(site: dict) -> BatchFrame | None:
    """The batch plate's frame in a sample site's `cond_indep_stack`, if any."""
    for frame in site["cond_indep_stack"]:
        if isinstance(frame, BatchFrame):
            return frame
    return None


@dataclass(frozen=True)
class BatchInfo:
    """The batch plate as seen in a trace."""

    name: str
    size: int  # B, the minibatch size
    full_size: int  # N, the dataset size
    dim: int | None  # None for a sequential plate

    @property
    def vectorized(self) -> bool:
        return self.dim is not None

    @property
    def subsample_scale(self) -> float:
        """`N / B`: the factor `reduction="sum"` applies once."""
        return self.full_size / self.size

    @classmethod
    def of(cls, frame: BatchFrame) -> BatchInfo:
        full_size = frame.full_size if frame.full_size is not None else frame.size
        return cls(frame.name, int(frame.size), int(full_size), frame.dim)

    def __str__(self) -> str:
        kind = f"vectorized, dim={self.dim}" if self.vectorized else "sequential"
        size = f"size={self.full_size}"
        if self.full_size != self.size:
            size += f", subsample_size={self.size}"
        return f"batch_plate('{self.name}', {size}; {kind})"


def check_positive_int(name: str, value: object) -> int:
    """`value` as a positive `int`; bools and floats are refused, not truncated."""
    if isinstance(value, torch.Tensor) and torch._C._get_tracing_state():
        # A Jit objective traces the program: `x.shape[0]` is then a 0-dim int tensor.
        if value.dim() == 0 and not value.is_floating_point() and int(value) >= 1:
            return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BatchPlateError(f"{name} must be a positive int, got {value!r}")
    return value


def check_subsample(name: str, size: int, subsample: torch.Tensor) -> None:
    """Explicit minibatch indices: a 1-D integer tensor of distinct indices in `[0, size)`.

    A duplicated index weighs one datum twice, an out-of-range one indexes
    another datum (or none) while `N/B` still counts it.
    """
    where = f"batch_plate('{name}', size={size}, subsample=...)"
    if not isinstance(subsample, torch.Tensor) or subsample.dim() != 1:
        raise BatchPlateError(f"{where}: subsample must be a 1-D tensor of dataset indices")
    if subsample.dtype.is_floating_point or subsample.dtype.is_complex:
        raise BatchPlateError(
            f"{where}: subsample must hold integer indices, got dtype {subsample.dtype}; "
            "use torch.long indices (e.g. torch.randperm(size)[:B])"
        )
    if subsample.numel() == 0:
        raise BatchPlateError(f"{where}: subsample is empty; a minibatch needs at least one datum")
    low, high = int(subsample.min()), int(subsample.max())
    if low < 0 or high >= size:
        raise BatchPlateError(
            f"{where}: subsample indices must lie in [0, {size}), got min {low}, max {high}"
        )
    if subsample.unique().numel() != subsample.numel():
        raise BatchPlateError(
            f"{where}: subsample has duplicated indices; each datum of a minibatch must be "
            "distinct (a repeated index weighs one datum twice)"
        )


def check_sizes(
    name: str, size: object, subsample_size: object, subsample: torch.Tensor | None
) -> None:
    """Refuse sizes Pyro would turn into a `ZeroDivisionError`, a misleading
    model/guide message or a silently wrong minibatch."""
    check_positive_int(f"batch_plate('{name}') size", size)
    if subsample_size is not None:
        check_positive_int(f"batch_plate('{name}') subsample_size", subsample_size)
        if subsample_size > size:
            raise BatchPlateError(
                f"batch_plate('{name}', size={size}, subsample_size={subsample_size}): the "
                "minibatch cannot be larger than the dataset; use subsample_size <= size "
                "(or leave it out to use every datum)"
            )
    if subsample is not None:
        check_subsample(name, size, subsample)
        if subsample_size is not None and subsample_size != len(subsample):
            raise BatchPlateError(
                f"batch_plate('{name}'): subsample_size={subsample_size} but "
                f"subsample has {len(subsample)} indices"
            )


class batch_plate(plate):
    """Mark the plate over the data of a minibatch.

    Use it exactly like `pyro.plate`, in the model and in the guide:

    ```python
    with batch_plate("data", len(x)):          # vectorized
        z = pyro.sample("z", dist.Normal(0., 1.))
        pyro.sample("x", dist.Normal(z, 1.), obs=x)

    for i in batch_plate("data", len(x)):      # sequential
        ...
    ```

    Inside a batch plate, Pyro's own subsampling scale `N/B` applies as usual,
    so stock Pyro objectives see an ordinary plate. batchplate's objectives
    remove that scale from the per-datum log weights and apply it once in
    `reduction="sum"`.

    :param name: plate name, shared by model and guide.
    :param size: size of the dataset `N` (or of the minibatch when not subsampling).
    :param subsample_size: draw a random minibatch of this size `B`.
    :param subsample: explicit minibatch indices (a 1-D tensor of length `B`).
    :param dim: the batch dimension, counting from the right (vectorized use).
    :param device: device of the subsample indices.
    """

    def __init__(
        self,
        name: str,
        size: int,
        subsample_size: int | None = None,
        subsample: torch.Tensor | None = None,
        dim: int | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        if size is None:
            raise BatchPlateError(
                f"batch_plate('{name}') needs a size: the number of data N in the dataset "
                "(or in the minibatch, when not subsampling)."
            )
        if isinstance(device, torch.device):
            device = str(device)
        if _lane_hook:
            state = _lane_hook[0].plate_state(name, size, subsample_size, subsample, dim, device)
            if state is not None:
                # An autobatch lane: every lane builds the plate, so the lanes share
                # one checked state (and one minibatch) without Pyro's subsample message.
                self.__dict__.update(state)
                return
        check_sizes(name, size, subsample_size, subsample)
        super().__init__(name, size, subsample_size, subsample, dim, device=device)

    def __enter__(self) -> Any:
        # A sequential plate re-enters on every iteration; its first one suffices.
        if self.counter <= 1:
            self._check_not_nested()
        return super().__enter__()

    @property
    def datum(self) -> int:
        """Position in the minibatch of the current iteration's datum (sequential use).

        Use it instead of counting iterations (`enumerate`): under autobatch a
        lane's loop runs one iteration, that of its own datum.
        """
        return self.counter - 1

    def __iter__(self) -> Iterator[Any]:
        lane = _lane_hook[0].position(self) if _lane_hook else None
        if lane is None:
            yield from super().__iter__()
            return
        # An autobatch lane: one iteration, its datum's (same frame counter as
        # Pyro's loop, hence the same `BatchFrame.datum`). The plate is not
        # pushed on Pyro's stack: autobatch adds its frame and scale to the
        # lane's sites itself, which is several times faster per site.
        position, index, inside = lane
        if self.dim is not None:
            raise ValueError(f"cannot use plate {self.name} as both vectorized and sequential")
        self.counter = position
        self.next_context()
        inside.in_plate = True
        try:
            yield index
        except GeneratorExit:
            # The loop body left early (`break`, `return`): the sequential
            # program would not have reached the later data. The hook raises
            # once the lane has finished (an error here would be lost).
            inside.broke = True
            raise
        finally:
            inside.in_plate = False

    def _check_not_nested(self) -> None:
        outer = next((f for f in get_plates() if isinstance(f, BatchFrame)), None)
        if outer is not None and outer.name != self.name:
            raise BatchPlateError(
                f"batch_plate('{self.name}') is nested inside batch_plate('{outer.name}'). "
                "A program has exactly one batch plate, the plate over the minibatch; "
                "use pyro.plate for plates inside a datum."
            )

    def _process_message(self, msg: Any) -> None:
        super()._process_message(msg)
        stack = msg["cond_indep_stack"]
        msg["cond_indep_stack"] = (BatchFrame(*stack[0]),) + stack[1:]
