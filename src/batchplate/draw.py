"""Draw: run guide and model for `K` particles and score their traces.

The first stage of every objective (draw, check, reduce). It knows how
particles are laid out (one vectorized trace pair, or one pair per particle),
how the sleep phase of reweighted wake-sleep runs the model first, and how
all particles of a step share one minibatch. It does not know the structural
rules (`validation`) nor how traces become `[K, B]` weights (`weights`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoGuide
from pyro.infer.util import site_is_subsample
from pyro.poutine import Trace
from pyro.poutine.enum_messenger import EnumMessenger
from pyro.poutine.messenger import Messenger

from .autoguides import adopt_batch_frames
from .errors import BatchPlateError
from .plate import check_positive_int
from .validation import (
    check_pair,
    contributes,
    dynamic_program_error,
    non_finite_data_error,
    non_finite_input_error,
)

#: Name of the outermost plate that vectorizes particles (Pyro's own name).
PARTICLE_PLATE = "num_particles_vectorized"

Pair = tuple[Trace, Trace]  # (model trace, guide trace)

# Messages of torch errors raised by control flow on a batched tensor.
_DYNAMIC_MESSAGES = (
    "Boolean value of Tensor with more than one value is ambiguous",
    "only one element tensors can be converted to Python scalars",
    "a Tensor with",  # "a Tensor with N elements cannot be converted to Scalar"
)


@dataclass
class Particles:
    """The scored trace pairs of one draw, and how they are laid out.

    `vectorized`: a single pair holds all `num_particles` particles in the
    particle plate (or `num_particles == 1`); otherwise `pairs` yields one
    pair per particle, lazily, so the reduction drops each pair once reduced.
    """

    pairs: Iterable[Pair]
    num_particles: int
    vectorized: bool


@dataclass
class Enumeration:
    """What earlier draws of a program showed about its enumerated sites.

    A program none of whose sites is marked for enumeration runs without Pyro's
    enumeration handler (about a tenth of a per-particle step); one that showed
    a marked site is enumerated directly from then on, with the plate nesting
    it was enumerated with, instead of being run plainly first to find out.
    """

    known: bool = False
    max_plate_nesting: float = math.inf


def guess_max_plate_nesting(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> int:
    """Run guide and model once, without particles, and count vectorized plate dims."""
    try:
        with poutine.block():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs
            )
    except ValueError as e:  # this first run meets a NaN datum first: name it, as wake_pair does
        error = None if isinstance(e, BatchPlateError) else non_finite_input_error(args, kwargs, e)
        if error is None:
            raise
        raise error from e
    return trace_nesting((model_trace, guide_trace))


def trace_nesting(traces: Iterable[Trace]) -> int:
    """How many vectorized plate dims the traces' sample sites use."""
    dims = [
        frame.dim
        for trace in traces
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return -min(dims) if dims else 0


def plate_nesting(
    max_plate_nesting: float, model: Callable, guide: Callable, args: tuple, kwargs: dict
) -> float:
    """`max_plate_nesting`, guessed by running the program once when it is unbounded."""
    if max_plate_nesting == math.inf:
        return guess_max_plate_nesting(model, guide, args, kwargs)
    return max_plate_nesting


def subsample_trace(pair: Pair) -> Trace | None:
    """The subsample sites (minibatch indices of subsampled plates) of a drawn pair."""
    fixed = Trace()
    for trace in pair:
        for name, site in trace.nodes.items():
            if site["type"] == "sample" and site_is_subsample(site) and name not in fixed.nodes:
                fixed.add_node(name, **site)
    return fixed if fixed.nodes else None


def subsample_indices(trace: Trace, plate_name: str) -> torch.Tensor | None:
    """The dataset indices a subsampled plate drew in `trace`, or `None`."""
    site = trace.nodes.get(plate_name)
    if site is not None and site_is_subsample(site):
        return site["value"]
    return None


def _scored(model_trace: Trace, guide_trace: Trace, max_plate_nesting: float) -> Pair:
    # Subsample sites stay in the traces: their indices name data in error messages.
    try:
        model_trace.compute_log_prob(_has_density)
    except ValueError as e:  # Pyro's support check: name the datum with a NaN/inf first
        error = None if isinstance(e, BatchPlateError) else non_finite_data_error(model_trace, e)
        if error is None:
            raise
        raise error from e
    guide_trace.compute_log_prob(_has_density)
    check_pair(model_trace, guide_trace, max_plate_nesting)
    return model_trace, guide_trace


def _has_density(name: str, site: dict) -> bool:
    return contributes(site)


def wake_pair(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    max_plate_nesting: float,
    detach_guide: bool = False,
    enumeration: Enumeration | None = None,
) -> Pair:
    """Draw `z ~ q(. | x)` from the guide, replay the model on it, score and check both.

    `detach_guide` cuts the model's dependence on the guide's parameters
    through the drawn values (reweighted wake-sleep's wake phase);
    `enumeration` remembers across draws whether the program enumerates.
    """
    try:
        run = (model, guide, args, kwargs, detach_guide)
        memo = Enumeration() if enumeration is None else enumeration
        guide_trace, model_trace, max_plate_nesting = _enumerated_wake(run, max_plate_nesting, memo)
    except ValueError as e:  # Pyro's bare support error: name the datum with a NaN first
        error = None if isinstance(e, BatchPlateError) else non_finite_input_error(args, kwargs, e)
        if error is None:
            raise
        raise error from e
    return _scored(model_trace, guide_trace, max_plate_nesting)


def _wake_traces(run: tuple) -> tuple[Trace, Trace]:
    model, guide, args, kwargs, detach_guide = run
    if detach_guide:
        guide = DetachDraws()(guide)
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    if detach_guide:
        guide_trace.detach_()
    replayed = poutine.replay(model, trace=guide_trace)
    return guide_trace, poutine.trace(replayed).get_trace(*args, **kwargs)


class DetachDraws(Messenger):
    """Each draw detached as it is drawn (RWS's wake phase takes the draws as given).

    Detaching the trace afterwards is not enough: a later site's distribution
    built from an earlier draw (a hierarchical guide's `Normal(z1, s)`, an
    autoguide's `Delta` with the Jacobian of its auxiliary draw) would keep a
    reparameterized path back to the guide's parameters, a term wake-phi's
    gradient does not have.
    """

    def _postprocess_message(self, msg: dict) -> None:
        value = msg["value"]
        if msg["type"] == "sample" and not msg["is_observed"] and isinstance(value, torch.Tensor):
            msg["value"] = value.detach()


def _enumerated_wake(
    run: tuple, max_plate_nesting: float, memo: Enumeration
) -> tuple[Trace, Trace, float]:
    """Guide and model traces with sites marked `enumerate="parallel"` enumerated,
    and the plate nesting they were enumerated with.

    As in Pyro's `TraceEnum_ELBO`, the guide's enumeration dims start left of
    the program's plates (`-1 - max_plate_nesting`) and the model's continue
    after them. Unless `memo` knows the program enumerates, a first plain run
    shows whether anything is marked (and how deep the plates go): a marked
    site must never be silently sampled.
    """
    model, guide, args, kwargs, detach_guide = run
    if memo.known and max_plate_nesting == math.inf:
        max_plate_nesting = memo.max_plate_nesting
    if not memo.known:
        rng = _rng_state()
        traces = _wake_traces(run)
        if not marked_for_enumeration(traces):
            return (*traces, max_plate_nesting)
        if max_plate_nesting == math.inf:
            max_plate_nesting = trace_nesting(traces)
        memo.known, memo.max_plate_nesting = True, max_plate_nesting
        _set_rng_state(rng)  # the enumerated run draws what it would have drawn alone
    guide = EnumMessenger(first_available_dim=-1 - max_plate_nesting)(guide)
    model = EnumMessenger()(model)  # keeps the guide's allocation state, as Pyro does
    traces = _wake_traces((model, guide, args, kwargs, detach_guide))
    check_enumeration(traces)
    return (*traces, max_plate_nesting)


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def marked_for_enumeration(traces: Iterable[Trace]) -> bool:
    """Whether any unobserved sample site asks for enumeration."""
    return any(
        site["type"] == "sample" and not site["is_observed"] and site["infer"].get("enumerate")
        for trace in traces
        for site in trace.nodes.values()
    )


def check_enumeration(traces: Iterable[Trace]) -> None:
    """Every site marked for enumeration was enumerated (never silently sampled)."""
    for trace in traces:
        for name, site in trace.nodes.items():
            strategy = site["infer"].get("enumerate") if site["type"] == "sample" else None
            if strategy is None or site["is_observed"]:
                continue
            if site["infer"].get("_enumerate_dim") is None:
                raise BatchPlateError(
                    f"site '{name}' is marked infer={{'enumerate': {strategy!r}}}, which "
                    "batchplate does not enumerate (only 'parallel' enumeration is supported): "
                    "it would be sampled instead. Mark it 'parallel' (config_enumerate's "
                    "default), or remove the mark to sample it."
                )


def sleep_pair(
    model: Callable, guide: Callable, args: tuple, kwargs: dict, max_plate_nesting: float
) -> Pair:
    """Fantasize `(z, x) ~ p` for every datum slot, then score the guide on them.

    As in Pyro's RWS, the guide gets the fantasy observations through the
    `observations=` keyword, so amortized guides condition on them.
    """
    model_trace = poutine.trace(poutine.uncondition(model)).get_trace(*args, **kwargs)
    model_trace.detach_()
    observations = {}
    for name, site in model_trace.nodes.items():
        if site["type"] == "sample" and site["infer"].get("was_observed"):
            site["is_observed"] = True
            observations[name] = site["value"]
    guide_kwargs = dict(kwargs, observations=observations)
    guide_trace = poutine.trace(poutine.replay(guide, trace=model_trace)).get_trace(
        *args, **guide_kwargs
    )
    return _scored(model_trace, guide_trace, max_plate_nesting)


def prior_pair(
    model: Callable, guide: Callable, args: tuple, kwargs: dict, max_plate_nesting: float
) -> Pair:
    """Draw the latents from the model's prior (observed sites stay observed), then
    score the guide on them: defensive importance sampling's prior component.

    The draws are detached: they do not depend on the guide's parameters.
    """
    model_trace = poutine.trace(model).get_trace(*args, **kwargs)
    model_trace.detach_()
    guide_trace = poutine.trace(poutine.replay(guide, trace=model_trace)).get_trace(*args, **kwargs)
    return _scored(model_trace, guide_trace, max_plate_nesting)


def draw_particles(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    *,
    num_particles: int,
    vectorize_particles: bool,
    max_plate_nesting: float,
    sleep: bool = False,
    prior: bool = False,
    detach_guide: bool = False,
    subsample: Trace | None = None,
    enumeration: Enumeration | None = None,
) -> Particles:
    """Draw `K` particles: one vectorized (model, guide) pair, or `K` pairs.

    `max_plate_nesting` counts the program's own vectorized plates (guessed
    when unbounded and particles are vectorized); the particle plate goes one
    dim further left. With `sleep=True` the model runs first, unconditioned,
    and the guide is scored on its fantasies; with `prior=True` the latents come
    from the model's prior at the observed data (`prior_pair`); otherwise `detach_guide`
    detaches the guide's draws (see `wake_pair`).

    All particles of a datum must weigh the same datum, so they share one
    minibatch: `subsample` (from `subsample_trace`) fixes the plates'
    subsample indices; when it is `None`, per-particle pairs reuse the first
    particle's. `enumeration` carries what earlier draws showed about enumerated
    sites (see `Enumeration`); every particle of this draw shares it.
    """
    check_positive_int("num_particles", num_particles)
    if isinstance(guide, AutoGuide):  # its plain plate over the data is the batch plate
        guide = adopt_batch_frames(guide)(guide)
    memo = Enumeration() if enumeration is None else enumeration
    wake = functools.partial(wake_pair, detach_guide=detach_guide, enumeration=memo)
    pair = sleep_pair if sleep else wake
    pair = prior_pair if prior else pair
    fixed = subsample is not None
    if fixed:
        model, guide = _replay_subsample(model, guide, subsample)
    if not (vectorize_particles and num_particles > 1):
        call = (model, guide, args, kwargs, max_plate_nesting)
        pairs = _per_particle(pair, call, num_particles, fixed)
        return Particles(pairs, num_particles, vectorized=num_particles == 1)
    nesting = plate_nesting(max_plate_nesting, model, guide, args, kwargs) + 1
    plate = pyro.plate(PARTICLE_PLATE, num_particles, dim=-nesting)
    try:
        drawn = pair(plate(model), plate(guide), args, kwargs, nesting)
    except (RuntimeError, TypeError, ValueError) as e:
        if isinstance(e, BatchPlateError) or not any(m in str(e) for m in _DYNAMIC_MESSAGES):
            raise
        raise dynamic_program_error(e) from e
    return Particles([drawn], num_particles, vectorized=True)


def _replay_subsample(model: Callable, guide: Callable, subsample: Trace):
    return poutine.replay(model, trace=subsample), poutine.replay(guide, trace=subsample)


def _per_particle(pair: Callable, call: tuple, num_particles: int, fixed: bool) -> Iterator[Pair]:
    """One pair per particle; unless the minibatch is `fixed`, particles after
    the first reuse its minibatch (otherwise each would draw its own, and
    column `b` would mix data)."""
    model, guide, args, kwargs, nesting = call
    first = pair(model, guide, args, kwargs, nesting)
    subsample = None if fixed else subsample_trace(first)
    yield first
    del first
    if subsample is not None:
        model, guide = _replay_subsample(model, guide, subsample)
    for _ in range(num_particles - 1):
        yield pair(model, guide, args, kwargs, nesting)
