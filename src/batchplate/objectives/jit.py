"""Compiled objectives: the loss traced once with `pyro.ops.jit.trace`, then replayed.

As Pyro's Jit variants, these compile the whole step (guide, model, the
reduction to `[K, B]` and the objective) with the Pyro parameters as inputs.
The program must have static structure (the same sites and shapes every
call, no Python control flow on tensor values), take its tensors through
`*args` and its other inputs through `**kwargs` (one compilation per distinct
`**kwargs`), and read no global data but the param store.

The Python checks that run while the traces are built (the structural rules)
run during the compiling call only. The check that log weights are finite runs
on every call, on the compiled step's `[K, B]` output. Two things a compiled
step would silently freeze are refused: a sequential batch plate that
subsamples (its loop indices would be the first minibatch's forever) and a
decaying-average baseline (its running average would never move).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable

import pyro.ops.jit
import torch
from pyro.ops.provenance import detach_provenance

from ..errors import BatchPlateError
from ..plate import BatchInfo
from ..validation import non_finite_error
from ..weights import LogWeights
from .base import BatchObjective, Losses
from .elbo import Trace_ELBO
from .meanfield import TraceMeanField_ELBO
from .renyi import RenyiELBO
from .tracegraph import TraceGraph_ELBO
from .vimco import VIMCO


class JitObjective(BatchObjective):
    """Mixin: compile `local_losses` (single-loss objectives) with `pyro.ops.jit.trace`.

    `jit_options` go to `torch.jit.trace` (`check_trace` defaults to
    `False`, as in Pyro); `ignore_jit_warnings=True` silences the tracer's
    warnings. `loss` (no gradient) runs the uncompiled step, as Pyro's does.
    """

    compiles = True

    def local_losses(self, model: Callable, guide: Callable, *args, **kwargs) -> Losses:
        if not torch.is_grad_enabled():
            return super().local_losses(model, guide, *args, **kwargs)
        compiled = self._compiled_step(model, guide)
        loss, log_w = compiled(*args, **kwargs)
        batch = compiled.batch
        # One sum and a float: a finite sum proves every entry finite (see _all_finite).
        if not math.isfinite(float(log_w.sum())) and not bool(torch.isfinite(log_w).all()):
            where = "unknown under JIT: the non-Jit objective names them"
            raise non_finite_error(log_w, [where], batch, None)
        return Losses(("loss",), (loss,), batch)

    def weigh(self, model: Callable, guide: Callable, args: tuple, kwargs: dict, **options):
        weights: LogWeights = super().weigh(model, guide, args, kwargs, **options)
        self._traced_log_w = detach_provenance(weights.log_w).detach()
        return weights

    def checked_output(self, losses: Losses) -> torch.Tensor:
        """The tensor of the traced step whose finiteness every compiled call checks
        (the `[K, B]` log weights, as the uncompiled objective checks them).

        The hook for objectives whose step does not go through `weigh`.
        """
        return self._traced_log_w

    def _compiled_step(self, model: Callable, guide: Callable) -> _Step:
        steps = self.__dict__.setdefault("_steps", {})
        key = (id(model), id(guide))
        if key not in steps:
            steps[key] = _Step(self, model, guide)
        return steps[key]


class _Step:
    """One compiled step of an objective on one (model, guide)."""

    def __init__(self, objective: JitObjective, model: Callable, guide: Callable) -> None:
        owner = weakref.ref(objective)
        self.batch: BatchInfo | None = None

        def step(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
            objective = owner()
            # The uncompiled step of the objective this class compiles (next in the MRO).
            losses = super(JitObjective, objective).local_losses(model, guide, *args, **kwargs)
            self.batch = losses.batch
            return losses.values[0], objective.checked_output(losses)

        options = dict(objective.jit_options or {})
        self.compiled = pyro.ops.jit.trace(
            step, ignore_warnings=objective.ignore_jit_warnings, jit_options=options
        )

    def __call__(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        result = self.compiled(*args, **kwargs)
        batch = self.batch
        if not batch.vectorized and batch.full_size != batch.size:
            raise BatchPlateError(
                f"{batch} subsamples and is sequential: a compiled step would replay the first "
                "minibatch's loop indices on every call. Use the vectorized batch plate "
                "(with batch_plate(...)) or the objective without Jit."
            )
        return result


def _jit_doc(base: type) -> str:
    return (
        f"`batchplate.{base.__name__}`, compiled with `pyro.ops.jit.trace`: the same value "
        "and gradient on the same draws, for programs with static structure (see "
        "`batchplate.objectives.jit`)."
    )


class JitTrace_ELBO(JitObjective, Trace_ELBO):
    __doc__ = _jit_doc(Trace_ELBO)


class JitTraceGraph_ELBO(JitObjective, TraceGraph_ELBO):
    __doc__ = _jit_doc(TraceGraph_ELBO)


class JitTraceMeanField_ELBO(JitObjective, TraceMeanField_ELBO):
    __doc__ = _jit_doc(TraceMeanField_ELBO)


class JitRenyiELBO(JitObjective, RenyiELBO):
    __doc__ = _jit_doc(RenyiELBO)


class JitVIMCO(JitObjective, VIMCO):
    __doc__ = _jit_doc(VIMCO)


__all__ = [
    "JitObjective",
    "JitRenyiELBO",
    "JitTraceGraph_ELBO",
    "JitTraceMeanField_ELBO",
    "JitTrace_ELBO",
    "JitVIMCO",
]
