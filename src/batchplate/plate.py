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

from dataclasses import dataclass
from typing import Any

import torch
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.runtime import get_plates
from pyro.primitives import plate

from .errors import BatchPlateError


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
        super().__init__(name, size, subsample_size, subsample, dim, device=device)

    def __enter__(self) -> Any:
        # A sequential plate re-enters on every iteration; its first one suffices.
        if self.counter <= 1:
            self._check_not_nested()
        return super().__enter__()

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
