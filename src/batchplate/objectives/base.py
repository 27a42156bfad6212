"""What every batchplate objective shares: particles, traces, the batch reduction.

An objective is a thin reduction of the ``[K, B]`` log weights. Subclasses
implement :meth:`BatchObjective.per_datum`, returning the per-datum objective
``L_b`` and a per-datum surrogate whose gradient is the estimator's; this base
class averages (``reduction="mean"``) or sums with the ``N/B`` scale
(``reduction="sum"``) over the batch, and exposes Pyro's interface (``loss``,
``loss_and_grads``, ``differentiable_loss``, ``__call__`` for PyTorch loops).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from pyro.infer.elbo import ELBO
from pyro.util import warn_if_nan

from ..weights import (
    BatchInfo,
    LogWeights,
    compute_log_weights,
    guess_max_plate_nesting,
    sample_traces,
)

REDUCTIONS = ("mean", "sum")


class BatchObjective(ELBO):
    """Base class of per-datum objectives; a drop-in for Pyro's ELBO classes.

    :param num_particles: ``K``, particles per datum.
    :param max_plate_nesting: bound on the program's nested vectorized plates
        (the batch plate included, the particle plate not); guessed by running
        the program once when omitted.
    :param vectorize_particles: trace all particles at once in an outer plate
        (static program structure required).
    :param reduction: ``"mean"`` (default) averages the per-datum objectives,
        so plain SGD sees the per-datum gradient scale; ``"sum"`` returns
        ``N/B`` times their sum, an unbiased estimate of the whole-dataset sum
        (Pyro's convention for subsampled plates).

    Pyro's other ELBO keywords (``strict_enumeration_warning``,
    ``ignore_jit_warnings``, ``jit_options``, ``retain_graph``) are accepted.
    """

    #: Set by subclasses that need the ELBO's Rao-Blackwellized score term.
    _needs_elbo_score = False

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: float = math.inf,
        max_iarange_nesting: float | None = None,
        vectorize_particles: bool = False,
        strict_enumeration_warning: bool = True,
        ignore_jit_warnings: bool = False,
        jit_options: dict | None = None,
        retain_graph: bool | None = None,
        tail_adaptive_beta: float = -1.0,
        reduction: str = "mean",
    ) -> None:
        if max_iarange_nesting is not None:
            warnings.warn(
                "max_iarange_nesting is deprecated; use max_plate_nesting instead",
                DeprecationWarning,
                stacklevel=2,
            )
            max_plate_nesting = max_iarange_nesting
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if not (isinstance(num_particles, int) and num_particles >= 1):
            raise ValueError(f"num_particles must be a positive int, got {num_particles!r}")
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            strict_enumeration_warning=strict_enumeration_warning,
            ignore_jit_warnings=ignore_jit_warnings,
            jit_options=jit_options,
            retain_graph=retain_graph,
            tail_adaptive_beta=tail_adaptive_beta,
        )
        # Pyro's ELBO adds the particle plate to max_plate_nesting; we keep the
        # program's own nesting and let sample_traces place the particle plate.
        self.max_plate_nesting = max_plate_nesting
        self.reduction = reduction

    # -- traces to weights -------------------------------------------------

    def log_weights(
        self,
        model: Callable,
        guide: Callable,
        args: tuple,
        kwargs: dict,
        *,
        detach_guide: bool = False,
    ) -> LogWeights:
        """Run model and guide for ``num_particles`` particles; return the ``[K, B]`` weights."""
        pairs = self._draw(
            model, guide, args, kwargs, self.num_particles, detach_guide=detach_guide
        )
        return compute_log_weights(pairs, self.num_particles, elbo_score=self._needs_elbo_score)

    def _draw(
        self,
        model: Callable,
        guide: Callable,
        args: tuple,
        kwargs: dict,
        num_particles: int,
        *,
        detach_guide: bool = False,
        sleep: bool = False,
    ) -> list:
        vectorize = self.vectorize_particles and num_particles > 1
        if vectorize and self.max_plate_nesting == math.inf:
            self.max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
        return sample_traces(
            model,
            guide,
            args,
            kwargs,
            num_particles=num_particles,
            vectorize_particles=vectorize,
            max_plate_nesting=self.max_plate_nesting,
            detach_guide=detach_guide,
            sleep=sleep,
        )

    def reduce(self, per_datum: torch.Tensor, batch: BatchInfo) -> torch.Tensor:
        """Mean over the batch, or ``N/B`` times the sum."""
        if self.reduction == "mean":
            return per_datum.mean(-1)
        return per_datum.sum(-1) * batch.subsample_scale

    # -- the objective ---------------------------------------------------------

    def per_datum(self, weights: LogWeights) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(L_b, surrogate_b)``, both of shape ``[B]``.

        ``L_b`` is the per-datum objective (to be maximized); ``surrogate_b``
        is any tensor whose gradient is the estimator of ``grad E[L_b]``.
        """
        raise NotImplementedError

    # -- Pyro's interface ------------------------------------------------------

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args, **kwargs
    ) -> torch.Tensor:
        """A scalar tensor: its value is the loss ``-L``, its gradient the estimator's."""
        weights = self.log_weights(model, guide, args, kwargs)
        value, surrogate = self.per_datum(weights)
        loss = -self.reduce(value, weights.batch).detach()
        surrogate_loss = -self.reduce(surrogate, weights.batch)
        if surrogate_loss.requires_grad:
            loss = loss + (surrogate_loss - surrogate_loss.detach())
        warn_if_nan(loss, "loss")
        return loss

    def loss(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """The loss ``-L`` as a float, without gradients."""
        with torch.no_grad():
            weights = self.log_weights(model, guide, args, kwargs)
            value, _ = self.per_datum(weights)
            loss = -self.reduce(value, weights.batch).item()
        warn_if_nan(loss, "loss")
        return loss

    def loss_and_grads(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """The loss as a float; accumulates the estimator's gradients into ``.grad``."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return loss.item()

    def _get_trace(self, model, guide, args, kwargs):  # pragma: no cover - ELBO's abstract hook
        raise NotImplementedError("batchplate objectives draw particles through log_weights()")
