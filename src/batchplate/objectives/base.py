"""What every batchplate objective shares: particles, traces, the batch reduction.

An objective is a thin reduction of the `[K, B]` log weights. Subclasses
implement `BatchObjective.per_datum`, returning the per-datum objective
`L_b` and a per-datum surrogate whose gradient is the estimator's; this base
class averages (`reduction="mean"`) or sums with the `N/B` scale
(`reduction="sum"`) over the batch, and exposes Pyro's interface (`loss`,
`loss_and_grads`, `differentiable_loss`, `__call__` for PyTorch loops) and
`local_losses` for wrappers such as `batchplate.distributed`.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from pyro import poutine
from pyro.infer.elbo import ELBO
from pyro.poutine import Trace
from pyro.poutine.messenger import Messenger

from ..autobatch import autobatch_log_weights
from ..draw import Enumeration, Pair, Particles, draw_particles, plate_nesting
from ..plate import BatchInfo, check_positive_int
from ..sequential_check import check_against_sequential
from ..validation import (
    NoSampleSitesError,
    global_latent_error,
    non_finite_gradient_error,
    non_finite_loss_error,
)
from ..weights import LogWeights, PairTerm, compute_log_weights
from .baseline import unused_baseline_check

REDUCTIONS = ("mean", "sum")


def leave_one_out_mean(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean over `dim` of the other entries (zero when there are none): a baseline
    for entry `k` that does not depend on entry `k`."""
    K = x.shape[dim]
    if K < 2:
        return torch.zeros_like(x)
    return (x.sum(dim, keepdim=True) - x) / (K - 1)


@dataclass(frozen=True)
class Losses:
    """One step's loss tensors of an objective on a (local) batch."""

    names: tuple[str, ...]
    """`("loss",)`, or `("wake_theta_loss", "phi_loss")` for reweighted wake-sleep."""
    values: tuple[torch.Tensor, ...]
    """Scalar tensors whose gradients are the estimator's. A skipped phase
    (RWS's wake-theta with `model_has_params=False, insomnia=0`) is a NaN
    tensor without gradient."""
    batch: BatchInfo | None
    """The batch plate of this step (`None` for a program without sample sites)."""
    skipped: tuple[str, ...] = ()
    """Names of the losses that were not computed (their values are NaN)."""
    per_datum: torch.Tensor | None = None
    """The per-datum objective values `L_b`, when known (to name a non-finite datum)."""

    def check_finite(self) -> None:
        """Raise `BatchPlateError` if a computed loss is NaN or infinite."""
        for name, value in zip(self.names, self.values, strict=True):
            # (math.isfinite on the scalar: torch.isfinite is several ops, ~40 us a call)
            if name not in self.skipped and not math.isfinite(float(value.detach())):
                raise non_finite_loss_error(name, value.detach(), self.per_datum)

    def result(self) -> float | tuple[float, ...]:
        """What `loss` and `loss_and_grads` return: a float, or a tuple of floats."""
        floats = tuple(v.item() for v in self.values)
        return floats[0] if len(floats) == 1 else floats

    def total(self) -> torch.Tensor:
        """The sum of the losses that were computed: one backward serves all of them."""
        pairs = zip(self.names, self.values, strict=True)
        computed = [value for name, value in pairs if name not in self.skipped]
        return computed[0] if len(computed) == 1 else sum(computed)


class BatchObjective(ELBO):
    """Base class of per-datum objectives; a drop-in for Pyro's ELBO classes.

    Pyro's other ELBO keywords (`ignore_jit_warnings`, `jit_options`,
    `retain_graph`, `strict_enumeration_warning`) are accepted, and act or raise.

    :param num_particles: `K`, particles per datum.
    :param max_plate_nesting: bound on the program's nested vectorized plates
        (the batch plate included, the particle plate not); guessed by running
        the program once when omitted.
    :param vectorize_particles: trace all particles at once in an outer plate
        (static program structure required).
    :param reduction: `"mean"` (default) averages the per-datum objectives,
        so plain SGD sees the per-datum gradient scale; `"sum"` returns
        `N/B` times their sum, an unbiased estimate of the whole-dataset sum
        (Pyro's convention for subsampled plates).
    :param strict_enumeration_warning: `True` warns (as Pyro's
        `TraceEnum_ELBO` does) when the first step finds no latent site marked
        for enumeration; these objectives sum the sites the model enumerates
        exactly in each datum. Off by default, except in `TraceEnum_ELBO`.
    :param autobatch: run a program written with a sequential batch plate
        over all its lanes (particle, datum) at once, batching sample sites and
        module calls across lanes (see `batchplate.autobatch`); same numbers as
        the sequential program on the same draws.
    """

    compiles = False
    """Whether `local_losses` is compiled (the Jit variants)."""
    uses_baselines = False
    """Whether the objective uses guide sites' `infer["baseline"]` specs."""

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: float = math.inf,
        max_iarange_nesting: float | None = None,
        vectorize_particles: bool = False,
        strict_enumeration_warning: bool | None = None,
        ignore_jit_warnings: bool = False,
        jit_options: dict | None = None,
        retain_graph: bool | None = None,
        reduction: str = "mean",
        autobatch: bool = False,
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
        if not self.compiles and (jit_options is not None or ignore_jit_warnings):
            # Pyro's uncompiled objectives accept and ignore these; a keyword must act.
            raise ValueError(
                f"jit_options and ignore_jit_warnings apply to compiled objectives; "
                f"{type(self).__name__} does not compile. Use its Jit variant "
                "(batchplate.JitTrace_ELBO, ...) or drop the keyword."
            )
        if autobatch and strict_enumeration_warning:
            raise ValueError(
                "strict_enumeration_warning checks the traces of a step, which autobatch=True "
                "does not build; drop one of the two keywords"
            )
        check_positive_int("num_particles", num_particles)
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            strict_enumeration_warning=strict_enumeration_warning,
            ignore_jit_warnings=ignore_jit_warnings,
            jit_options=jit_options,
            retain_graph=retain_graph,
        )
        # Pyro's ELBO adds the particle plate to max_plate_nesting; we keep the
        # program's own nesting and let draw_particles place the particle plate.
        self.max_plate_nesting = max_plate_nesting
        self.reduction = reduction
        self.autobatch = autobatch
        self._baselines_checked: set[int] = set()
        self._enumeration_unchecked = strict_enumeration_warning is True
        self._enumeration = Enumeration()  # learned on the first draw, reused after
        self._autobatch_checked: set[tuple] = set()  # (model, guide) pairs checked once

    # -- draw, check, reduce ---------------------------------------------------

    def weigh(
        self,
        model: Callable,
        guide: Callable,
        args: tuple,
        kwargs: dict,
        *,
        num_particles: int | None = None,
        sleep: bool = False,
        detach_guide: bool = False,
        extra: PairTerm | None = None,
        prior: bool = False,
        subsample: Trace | None = None,
    ) -> LogWeights:
        """Draw `num_particles` (default `K`) particles and reduce them to `[K, B]` weights.

        `sleep`, `prior` and `detach_guide` select reweighted wake-sleep's phases
        and proposals, `subsample` fixes the minibatch (see
        `batchplate.draw.draw_particles`); `extra` is an estimator's own per-pair
        term (see `batchplate.weights.compute_log_weights`).
        """
        K = self.num_particles if num_particles is None else num_particles
        if self.autobatch:
            return self._weigh_autobatched(
                model, guide, args, kwargs, K, sleep, detach_guide, extra, prior, subsample
            )
        with self._unused_baseline_check(guide), self._enumeration_check():
            particles = self._draw(
                model,
                guide,
                (args, kwargs),
                K,
                sleep=sleep,
                prior=prior,
                detach_guide=detach_guide,
                subsample=subsample,
            )
            particles.pairs = map(self.prepare, particles.pairs)  # lazily, pair by pair
            return compute_log_weights(particles, extra)

    def _draw(self, model: Callable, guide: Callable, call: tuple, K: int, **options) -> Particles:
        """`K` particles in this objective's layout, with what earlier draws showed
        (the guessed plate nesting, whether the program enumerates)."""
        args, kwargs = call
        vectorize = self.vectorize_particles and K > 1
        if vectorize and self.max_plate_nesting == math.inf:  # guessed once per objective
            self.max_plate_nesting = plate_nesting(math.inf, model, guide, args, kwargs)
        return draw_particles(
            model,
            guide,
            args,
            kwargs,
            num_particles=K,
            vectorize_particles=vectorize,
            max_plate_nesting=self.max_plate_nesting,
            enumeration=self._enumeration,
            **options,
        )

    def prepare(self, pair: Pair) -> Pair:
        """A drawn, checked trace pair, before it is reduced: a hook (identity here)."""
        return pair

    def _unused_baseline_check(self, guide: Callable) -> contextlib.AbstractContextManager:
        """On a guide's first step, warn about baseline specs this objective ignores."""
        if self.uses_baselines or id(guide) in self._baselines_checked:
            return contextlib.nullcontext()
        self._baselines_checked.add(id(guide))
        return unused_baseline_check(type(self).__name__)

    def _enumeration_check(self) -> contextlib.AbstractContextManager:
        """With `strict_enumeration_warning=True`, on the first step: warn if no site
        is marked for enumeration (the marks belong to the program: once is enough)."""
        if not self._enumeration_unchecked:
            return contextlib.nullcontext()
        self._enumeration_unchecked = False
        return _warn_without_enumeration(type(self).__name__)

    def _weigh_autobatched(
        self, model, guide, args, kwargs, K, sleep, detach_guide, extra, prior, subsample
    ) -> LogWeights:
        """`weigh` with `autobatch=True`: lanes instead of traces (no trace pairs)."""
        if extra is not None or prior:
            what = "an estimator's per-pair term" if extra is not None else "prior proposals"
            raise ValueError(
                f"{type(self).__name__} needs {what}, which autobatch does not provide yet; "
                "use autobatch=False"
            )
        fixed = {}  # filled with the draw's minibatch
        if subsample is not None:
            fixed = {n: s["value"] for n, s in subsample.nodes.items() if s["type"] == "sample"}
        check = not sleep and (model, guide) not in self._autobatch_checked
        draws: list[dict] | None = [] if check else None
        drawn = autobatch_log_weights(
            model,
            guide,
            args,
            kwargs,
            num_particles=K,
            vectorize_particles=self.vectorize_particles,
            sleep=sleep,
            detach_guide=detach_guide,
            subsample=fixed,
            draws=draws,
        )
        if check:  # once per pair: lanes must not carry state between data
            log_w = drawn[0] - drawn[1]
            check_against_sequential(model, guide, args, kwargs, log_w, draws[0], fixed, drawn[3])
            self._autobatch_checked.add((model, guide))
        return LogWeights(*drawn)

    def reduce(
        self, per_datum: torch.Tensor, batch: BatchInfo, global_term: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean over the batch, or `N/B` times the sum.

        `global_term` (the sites outside the batch plate, `G`) enters once:
        `"sum"` gives `G + (N/B) sum_b L_b`, the unbiased full-data estimate, and
        `"mean"` that divided by `N`, which keeps the per-datum scale.
        """
        if self.reduction == "mean":
            total = per_datum.mean(-1)
            return total if global_term is None else total + global_term / batch.full_size
        total = per_datum.sum(-1) * batch.subsample_scale
        return total if global_term is None else total + global_term

    # -- the objective ---------------------------------------------------------

    #: Whether guide sites outside the batch plate may be random (not point masses):
    #: true for the ELBO family, whose objective is a sum over sites.
    global_latents_allowed: bool = False

    def global_term(self, weights: LogWeights) -> torch.Tensor | None:
        """`G`, the sites outside the batch plate, averaged over particles (`None` without).

        Objectives that take a logsumexp per datum refuse random global latents
        (`global_latents_allowed`): the per-datum bound is undefined for them.
        """
        if weights.global_log_w is None:
            return None
        if weights.global_latents and not self.global_latents_allowed:
            raise global_latent_error(list(weights.global_latents), type(self).__name__)
        return weights.global_log_w.mean()

    def per_datum(self, weights: LogWeights) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `(L_b, surrogate_b)`, both of shape `[B]`.

        `L_b` is the per-datum objective (to be maximized); `surrogate_b`
        is any tensor whose gradient is the estimator of `grad E[L_b]`.
        """
        raise NotImplementedError

    # -- Pyro's interface ------------------------------------------------------

    def local_losses(self, model: Callable, guide: Callable, *args, **kwargs) -> Losses:
        """This step's loss tensors and batch plate, for wrappers that combine batches.

        A program without sample sites has loss 0 and no gradient, as in Pyro.
        """
        try:
            weights = self.weigh(model, guide, args, kwargs)
        except NoSampleSitesError:
            return Losses(("loss",), (torch.zeros(()),), None)
        value, surrogate = self.per_datum(weights)
        G = self.global_term(weights)
        # (detached first: the value needs no autograd nodes)
        loss = -self.reduce(value.detach(), weights.batch, None if G is None else G.detach())
        surrogate_loss = -self.reduce(surrogate, weights.batch, G)
        if surrogate_loss.requires_grad:
            loss = loss + (surrogate_loss - surrogate_loss.detach())
        return Losses(("loss",), (loss,), weights.batch, per_datum=value.detach())

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args, **kwargs
    ) -> torch.Tensor:
        """A scalar tensor: its value is the loss `-L`, its gradient the estimator's.

        A non-finite loss raises `BatchPlateError` (see `loss_and_grads`).
        """
        losses = self.local_losses(model, guide, *args, **kwargs)
        losses.check_finite()
        return losses.total()

    def loss(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """The loss `-L` as a float (a tuple for several losses), without gradients.

        A non-finite loss raises `BatchPlateError` naming the data.
        """
        with torch.no_grad():
            losses = self.local_losses(model, guide, *args, **kwargs)
        losses.check_finite()
        return losses.result()

    def loss_and_grads(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """The loss as a float; accumulates the estimator's gradients into `.grad`.

        The step is atomic: if the loss or the gradient of any Pyro parameter
        is NaN or infinite, every `.grad` is left as it was and
        `BatchPlateError` names the loss (and data) or the parameters. Raised
        inside `pyro.infer.SVI.step`, before its optimizer step, it leaves the
        parameters and the optimizer state unchanged too. To skip such steps
        instead of stopping, catch it: `try: svi.step(x)` /
        `except BatchPlateError: pass`.
        """
        with poutine.trace(param_only=True) as capture:
            losses = self.local_losses(model, guide, *args, **kwargs)
        losses.check_finite()
        total = losses.total()
        if total.requires_grad:
            atomic_backward(total, step_params(capture.trace), self.retain_graph)
        return losses.result()

    def _get_trace(self, model, guide, args, kwargs):  # pragma: no cover - ELBO's abstract hook
        raise NotImplementedError("batchplate objectives draw particles through weigh()")


class _EnumerationMarks(Messenger):
    """Records whether a latent sample site asks for enumeration."""

    found = False

    def _pyro_sample(self, msg: dict) -> None:
        if msg["infer"].get("enumerate") and not msg["is_observed"]:
            self.found = True


@contextlib.contextmanager
def _warn_without_enumeration(objective: str) -> Iterator[None]:
    marks = _EnumerationMarks()
    with marks:
        yield
    if not marks.found:
        warnings.warn(
            f"{objective} found no sample sites configured for enumeration "
            "(strict_enumeration_warning=True). Mark sites with @config_enumerate or "
            "infer={'enumerate': 'parallel'}, or drop the keyword.",
            stacklevel=5,
        )


def step_params(trace: Trace) -> dict[str, torch.Tensor]:
    """The unconstrained leaf tensors of the Pyro parameters a step used (SVI's set)."""
    return {
        name: site["value"].unconstrained()
        for name, site in trace.nodes.items()
        if site["type"] == "param"
    }


def atomic_backward(
    total: torch.Tensor,
    params: dict[str, torch.Tensor],
    retain_graph: bool | None,
    combine: Callable[[dict[str, torch.Tensor], BaseException | None], None] | None = None,
) -> None:
    """`total.backward()`, kept only if every parameter's new gradient is finite.

    The earlier `.grad` tensors are set aside during the backward pass (no
    copy), so on failure each is put back as it was; on success `.grad` holds
    the earlier gradient plus the step's, as after a plain backward pass (on
    the CPU in the fresh gradient's buffer, see `_check_and_accumulate`).

    :param combine: called with the parameters, whose `.grad` then holds only
        this step's gradient, and the local failure (or `None`) after the
        local backward pass and check, even when they failed; it may replace
        the fresh gradients (`batchplate.distributed` sums them over ranks) and
        raises to make the step fail (where any rank failed), which puts the
        earlier gradients back here too.
    """
    previous = {name: p.grad for name, p in params.items()}
    for p in params.values():
        p.grad = None
    try:
        if combine is None:
            total.backward(retain_graph=retain_graph)
            _check_and_accumulate(params, previous)
            return
        failure = None
        try:
            total.backward(retain_graph=retain_graph)
            _check_finite_gradients(params, list(params))
        except Exception as e:
            failure = e  # the peers must still hear of it, or they would wait forever
        combine(params, failure)
    except BaseException:
        for name, p in params.items():
            p.grad = previous[name]
        raise
    _accumulate(params, previous, list(params))


def _check_and_accumulate(
    params: dict[str, torch.Tensor], previous: dict[str, torch.Tensor | None]
) -> None:
    """Check the fresh gradients finite and add the earlier ones to them.

    On the CPU a tensor's own check needs no device sync, so each fresh
    gradient is summed and, when finite, gets the earlier gradient added at
    once, while it is still in cache (two passes over cold gradients, the sum
    then the add, cost ~4% of a small VAE's step). The earlier gradient is
    added into the fresh buffer, so it stays intact if a later check fails.
    The rest (other devices, or a non-finite sum) are checked together below.
    """
    pending = []
    for name, p in params.items():
        fresh, old = p.grad, previous[name]
        if fresh is not None and fresh.is_cpu:
            if math.isfinite(float(fresh.sum())):
                if old is not None:
                    fresh.add_(old)  # = old + fresh, in fresh's buffer
                continue
        pending.append(name)
    _check_finite_gradients(params, pending)
    _accumulate(params, previous, pending)


def _check_finite_gradients(params: dict[str, torch.Tensor], names: list[str]) -> None:
    fresh = [params[n].grad for n in names if params[n].grad is not None]
    # One device sync for all parameters; names are looked up only on failure.
    if fresh and not _all_finite(fresh):
        bad = [n for n in names if params[n].grad is not None and not _finite(params[n].grad)]
        raise non_finite_gradient_error(bad)


def _accumulate(
    params: dict[str, torch.Tensor], previous: dict[str, torch.Tensor | None], names: list[str]
) -> None:
    """Add the earlier gradients of `names` to this step's, as a plain backward would."""
    for name in names:
        p, old = params[name], previous[name]
        if old is not None:
            p.grad = old if p.grad is None else old.add_(p.grad)


def _finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every entry of every tensor is finite, with one pass over each.

    A NaN or infinite entry makes its tensor's sum non-finite, so a finite total
    proves every entry finite; `torch.isfinite` takes several passes and a mask
    per tensor (about 15% of a small VAE's step). Only a non-finite total (which
    finite entries reach by overflow alone) needs the exact check.
    """
    sums = [t.sum() for t in tensors]
    if any(s.dtype != sums[0].dtype for s in sums):  # stack needs one dtype
        sums = [s.double() for s in sums]
    # (A finite sum of sums that overflows takes the exact check below.)
    if math.isfinite(float(torch.stack(sums).sum())):
        return True
    return all(_finite(t) for t in tensors)
