"""The per-datum ELBO with exact enumeration of discrete sites (`TraceEnum_ELBO`)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from pyro.infer.util import is_validation_enabled

from ..contraction import dice_terms
from ..draw import marked_for_enumeration, plate_nesting
from ..weights import pair_batch
from .base import BatchObjective, Losses
from .jit import JitObjective
from .pathwise import ELBO_HAS_NO_DREG, check_estimator


class TraceEnum_ELBO(BatchObjective):
    r"""Per-datum ELBO with enumeration, a drop-in for `pyro.infer.TraceEnum_ELBO`.

    Sites marked `infer={"enumerate": "parallel"}` (or by `config_enumerate`)
    are summed exactly, in the model (sites absent from the guide) and in the
    guide; other guide sites are sampled, with Pyro's Dice score-function
    terms for the non-reparameterized ones. Inner plates and `pyro.markov`
    work as in Pyro. For each datum `b`,

    $$ L_b = \frac{1}{K} \sum_k \mathbb E_{q_{\text{enum}}}\Big[\log \sum_{e}
        p(x_b, z_b^k, e) - \log q(z_b^k \mid x_b)\Big], $$

    computed by Pyro's contraction with the batch plate's dim kept, so that
    `reduction="sum"` gives stock `TraceEnum_ELBO`'s value and gradient on the
    same draws and `reduction="mean"` that divided by `N` (by `B` without
    subsampling). Sites outside the batch plate (global latents, MAP sites)
    enter once, as their term `G`: `"sum"` is `G + (N/B) sum_b L_b`, `"mean"`
    that divided by `N`. A sequential batch plate is contracted datum by
    datum, so datum `b`'s score terms use only datum `b`'s costs (the same
    expectation as Pyro's, without its cross-datum terms).

    Only parallel enumeration is supported; a site marked `"sequential"`
    raises instead of being sampled.

    :param num_particles: `K`, particles per datum.
    :param max_plate_nesting: bound on the program's nested vectorized plates;
        guessed by running the program once when omitted (as Pyro does).
        Enumeration dims go to its left.
    :param strict_enumeration_warning: warn (as Pyro does) when no site is
        marked for enumeration.
    :param kwargs: the keywords of `batchplate.BatchObjective` (`reduction`,
        `vectorize_particles`, ...).
    """

    global_latents_allowed = True

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: float = math.inf,
        strict_enumeration_warning: bool = True,
        estimator: str = "standard",
        **kwargs,
    ) -> None:
        self.estimator = check_estimator(estimator, _REFUSED, type(self).__name__)
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            strict_enumeration_warning=strict_enumeration_warning,
            **kwargs,
        )

    def local_losses(self, model: Callable, guide: Callable, *args, **kwargs) -> Losses:
        """This step's loss and batch plate (Pyro's contraction, kept per datum)."""
        if self.max_plate_nesting == math.inf:  # enumeration dims need it; guessed once
            self.max_plate_nesting = plate_nesting(math.inf, model, guide, args, kwargs)
        K = self.num_particles
        vectorize = self.vectorize_particles and K > 1
        particles = self._draw(model, guide, (args, kwargs), K)
        rows, globals_ = [], []
        for pair in particles.pairs:
            batch = pair_batch(pair)
            self._warn_if_nothing_enumerated(pair)
            local, global_term = dice_terms(pair, batch, K if vectorize else 1)
            rows.append(local)
            globals_.append(global_term)
        per_datum = torch.cat(rows).mean(0)
        global_term = torch.cat(globals_).sum() / K
        loss = -self.reduce(per_datum, batch, global_term)
        # The per-datum values name a datum whose term is not finite (as the others do).
        return Losses(("loss",), (loss,), batch, per_datum=per_datum.detach())

    def _warn_if_nothing_enumerated(self, pair: tuple) -> None:
        if self.strict_enumeration_warning and is_validation_enabled():
            if not marked_for_enumeration(pair):
                warnings.warn(
                    "TraceEnum_ELBO found no sample sites configured for enumeration. "
                    "Mark sites with @config_enumerate or infer={'enumerate': 'parallel'}, "
                    "or use batchplate.Trace_ELBO.",
                    stacklevel=4,
                )
                self.strict_enumeration_warning = False  # once per objective


_REFUSED = {
    "stl": (
        "not implemented: its gradient comes from Pyro's contraction of the enumerated "
        "sites (with Dice factors for sampled discrete ones), which has no per-draw log "
        "weight to build a sample-path surrogate from; without enumerated sites, "
        "Trace_ELBO(estimator='stl') is the same objective"
    ),
    "dreg": ELBO_HAS_NO_DREG,
}


class JitTraceEnum_ELBO(JitObjective, TraceEnum_ELBO):
    """`batchplate.TraceEnum_ELBO`, compiled with `pyro.ops.jit.trace`: the same value
    and gradient on the same draws, for programs with static structure (see
    `batchplate.objectives.jit`). Stock `pyro.infer.JitTraceEnum_ELBO` divided by
    `N` (`reduction="mean"`) or equal to it (`"sum"`) on the same draws.
    An omitted `max_plate_nesting` is guessed by one uncompiled run before compiling."""

    def local_losses(self, model: Callable, guide: Callable, *args, **kwargs) -> Losses:
        if self.max_plate_nesting == math.inf:  # guessed before compiling, not inside it
            self.max_plate_nesting = plate_nesting(math.inf, model, guide, args, kwargs)
        return super().local_losses(model, guide, *args, **kwargs)

    def checked_output(self, losses: Losses) -> torch.Tensor:
        """The per-datum values `[1, B]`: the contraction builds no `[K, B]` log weights."""
        return losses.per_datum[None]
