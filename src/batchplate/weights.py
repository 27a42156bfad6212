"""From traces to the ``[K, B]`` per-datum log weights.

This module is the single place that knows how a program was written:
vectorized or sequential batch plate, vectorized particles or one trace per
particle, inner plates, user masks and scales, the batch plate's subsampling
scale, and programs whose sites differ between particles and data. Everything
downstream (the objectives, ``log_evidence``) only sees ``[K, B]`` tensors.

For datum ``b`` and particle ``k`` (design.md)::

    l[k, b] = log p(x_b, z_b^k) - log q(z_b^k | x_b)

where each log density sums every sample site at batch index ``b``, over its
inner plates and event dims, with the user's mask and scale but without the
batch plate's own ``N/B`` subsampling scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer.util import MultiFrameTensor, is_validation_enabled, site_is_subsample
from pyro.poutine import Trace
from pyro.util import check_model_guide_match, check_site_shape

from .errors import BatchPlateError
from .plate import BatchFrame
from .validation import (
    check_guide_datum,
    check_sequential_coverage,
    dynamic_program_error,
    event_over_batch_error,
    missing_batch_plate_error,
    plates_disagree_error,
    report_non_finite,
)

#: Name of the outermost plate that vectorizes particles (Pyro's own name).
PARTICLE_PLATE = "num_particles_vectorized"


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
        """``N / B``: the factor ``reduction="sum"`` applies once."""
        return self.full_size / self.size

    @classmethod
    def of(cls, frame: BatchFrame) -> BatchInfo:
        full_size = frame.full_size if frame.full_size is not None else frame.size
        return cls(frame.name, int(frame.size), int(full_size), frame.dim)


@dataclass
class LogWeights:
    """Per-datum log densities of ``K`` particles for ``B`` data.

    All tensors have shape ``[K, B]`` and keep their autograd graph.
    """

    log_p: torch.Tensor
    """``log p(x_b, z_b^k)``: every model sample site at datum ``b``."""
    log_q: torch.Tensor
    """``log q(z_b^k | x_b)``: every guide sample site at datum ``b``."""
    score_log_q: torch.Tensor | None
    """The part of ``log_q`` from non-reparameterized guide sites (their score
    functions), or ``None`` when every guide site is reparameterized."""
    elbo_score: torch.Tensor | None
    """The per-datum REINFORCE surrogate of the ELBO, Rao-Blackwellized within a
    datum where plates allow, with a leave-one-out particle baseline (only
    computed when asked for; ``None`` when no site needs it)."""
    batch: BatchInfo

    @property
    def log_w(self) -> torch.Tensor:
        """``l[k, b] = log p - log q``."""
        return self.log_p - self.log_q

    @property
    def num_particles(self) -> int:
        return self.log_p.shape[0]


# ---------------------------------------------------------------------------
# Running model and guide
# ---------------------------------------------------------------------------


def guess_max_plate_nesting(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> int:
    """Run guide and model once, without particles, and count vectorized plate dims."""
    with poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    dims = [
        frame.dim
        for trace in (model_trace, guide_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return -min(dims) if dims else 0


_DYNAMIC_MESSAGES = (
    "Boolean value of Tensor with more than one value is ambiguous",
    "only one element tensors can be converted to Python scalars",
    "a Tensor with",  # "a Tensor with N elements cannot be converted to Scalar"
)


def _trace_pair(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    max_plate_nesting: float,
    detach_guide: bool,
) -> tuple[Trace, Trace]:
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    if detach_guide:
        guide_trace.detach_()
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return _scored(model_trace, guide_trace, max_plate_nesting)


def _scored(
    model_trace: Trace, guide_trace: Trace, max_plate_nesting: float
) -> tuple[Trace, Trace]:
    """Check a trace pair and compute its log probs."""
    if is_validation_enabled():
        _check_guide_batch_frames(model_trace, guide_trace)
        check_model_guide_match(model_trace, guide_trace, max_plate_nesting)
    # Subsample sites stay in the traces (their indices name data in error
    # messages); _contributes() skips them.
    model_trace.compute_log_prob(_site_filter)
    guide_trace.compute_log_prob(_site_filter)
    if is_validation_enabled():
        for trace in (model_trace, guide_trace):
            for site in trace.nodes.values():
                if site["type"] == "sample" and _contributes(site):
                    check_site_shape(site, max_plate_nesting)
    return model_trace, guide_trace


def _check_guide_batch_frames(model_trace: Trace, guide_trace: Trace) -> None:
    """Rules 2 and 3 before Pyro's shape check, which would report a guide site
    outside the batch plate, or in another one, as a bare shape mismatch."""
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or not _contributes(site):
            continue
        frame = next((f for f in site["cond_indep_stack"] if isinstance(f, BatchFrame)), None)
        if frame is None:
            raise missing_batch_plate_error(site, "guide", model_trace)
        model_site = model_trace.nodes.get(name)
        if model_site is None or model_site["type"] != "sample":
            continue
        for model_frame in model_site["cond_indep_stack"]:
            if isinstance(model_frame, BatchFrame) and not _same_plate(model_frame, frame):
                raise plates_disagree_error((model_frame, "model", name), (frame, "guide", name))


def _sleep_pair(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    max_plate_nesting: float,
    detach_guide: bool,
) -> tuple[Trace, Trace]:
    """Fantasize ``(z, x) ~ p`` for every datum slot, then score the guide on them.

    As in Pyro's RWS, the guide gets the fantasy observations through the
    ``observations=`` keyword, so amortized guides condition on them.
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


def sample_traces(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    *,
    num_particles: int,
    vectorize_particles: bool,
    max_plate_nesting: int,
    detach_guide: bool = False,
    sleep: bool = False,
    subsample: Trace | None = None,
) -> Iterable[tuple[Trace, Trace]]:
    """Draw ``K`` particles: one vectorized (model, guide) trace pair, or ``K`` pairs.

    ``max_plate_nesting`` counts the program's own vectorized plates; the
    particle plate goes one dim further left. With ``sleep=True`` the model is
    run first, unconditioned, and the guide is scored on its fantasies.

    All particles of a datum must weigh the same datum, so they share one
    minibatch: ``subsample`` (from :func:`subsample_trace`) fixes the plates'
    subsample indices; when it is ``None``, per-particle traces reuse the
    first particle's.
    """
    pair = _sleep_pair if sleep else _trace_pair
    if subsample is not None:
        model, guide = _replay_subsample(model, guide, subsample)
    if vectorize_particles and num_particles > 1:
        nesting = max_plate_nesting + 1

        def particles(fn: Callable) -> Callable:
            return pyro.plate(PARTICLE_PLATE, num_particles, dim=-nesting)(fn)

        try:
            return [pair(particles(model), particles(guide), args, kwargs, nesting, detach_guide)]
        except (RuntimeError, TypeError, ValueError) as e:
            if isinstance(e, BatchPlateError) or not any(m in str(e) for m in _DYNAMIC_MESSAGES):
                raise
            raise dynamic_program_error(e) from e
    # A generator: compute_log_weights reduces each pair as it is drawn, so the
    # K traces (and their Python objects) are never alive at once.
    return _per_particle(
        pair, model, guide, args, kwargs, num_particles, max_plate_nesting, detach_guide, subsample
    )


def subsample_trace(pair: tuple[Trace, Trace]) -> Trace | None:
    """The subsample sites (minibatch indices of subsampled plates) of a drawn pair."""
    fixed = Trace()
    for trace in pair:
        for name, site in trace.nodes.items():
            if site["type"] == "sample" and site_is_subsample(site) and name not in fixed.nodes:
                fixed.add_node(name, **site)
    return fixed if fixed.nodes else None


def _replay_subsample(model: Callable, guide: Callable, subsample: Trace):
    return poutine.replay(model, trace=subsample), poutine.replay(guide, trace=subsample)


def _per_particle(
    pair, model, guide, args, kwargs, num_particles, max_plate_nesting, detach_guide, subsample
):
    """One trace pair per particle; particles after the first reuse its minibatch
    (otherwise each would draw its own, and column ``b`` would mix data)."""
    for k in range(num_particles):
        traces = pair(model, guide, args, kwargs, max_plate_nesting, detach_guide)
        if k == 0 and subsample is None:
            subsample = subsample_trace(traces)
            if subsample is not None:
                model, guide = _replay_subsample(model, guide, subsample)
        yield traces


# ---------------------------------------------------------------------------
# Traces to [K, B]
# ---------------------------------------------------------------------------


def _to_kb(value: torch.Tensor, particle_dim: int | None, batch_dim: int | None) -> torch.Tensor:
    """Sum a site's log-prob tensor down to ``[K or 1, B or 1]``."""
    n = value.dim()
    k = value.shape[particle_dim] if particle_dim is not None and -particle_dim <= n else 1
    b = value.shape[batch_dim] if batch_dim is not None and -batch_dim <= n else 1
    keep = {d for d in (particle_dim, batch_dim) if d is not None and -d <= n}
    drop = [d for d in range(-n, 0) if d not in keep]
    if drop:  # (sum over an empty list would sum everything)
        value = value.sum(drop)
    return value.reshape(k, b)


class _Column:
    """Accumulates ``[K or 1, B]`` (vectorized plate) or per-datum ``[K or 1, 1]`` terms."""

    def __init__(self, batch: BatchInfo) -> None:
        self.batch = batch
        self.total: torch.Tensor | float = 0.0
        self.per_datum: dict[int, torch.Tensor] = {}

    def add(self, value: torch.Tensor, datum: int | None) -> None:
        if datum is None:
            self.total = self.total + value
        elif datum in self.per_datum:
            self.per_datum[datum] = self.per_datum[datum] + value
        else:
            self.per_datum[datum] = value

    def result(self, num_particles: int, like: torch.Tensor) -> torch.Tensor:
        B = self.batch.size
        if self.batch.vectorized:
            total = self.total
            if not isinstance(total, torch.Tensor):
                total = like.new_zeros(())
            return total.expand(num_particles, B)
        zero = like.new_zeros((1, 1))
        columns = [self.per_datum.get(b, zero).expand(num_particles, 1) for b in range(B)]
        return torch.cat(columns, dim=1)


@dataclass
class _Site:
    """A sample site, reduced, with what the error paths and the ELBO need."""

    role: str  # "model" or "guide"
    name: str
    value: torch.Tensor  # [K or 1, B or 1]
    datum: int | None
    trace_index: int


def _site_log_prob(site: dict, batch: BatchInfo) -> torch.Tensor:
    """The site's log prob with mask and user scale, without the batch plate's N/B."""
    log_prob = site["log_prob"]
    if batch.full_size != batch.size:
        log_prob = log_prob / batch.subsample_scale
    return log_prob


def _site_score_log_prob(site: dict) -> torch.Tensor:
    """The site's log prob for its score function: masked but never scaled.

    A user's ``poutine.scale`` reweights the site's term in the objective, but
    the particle was still drawn from the unscaled ``q``, so ``grad log q`` is
    unscaled. Masked entries are dropped, as in Pyro.
    """
    return scale_and_mask(site["unscaled_log_prob"], mask=site["mask"])


def _event_spans_batch(site: dict, batch: BatchInfo) -> bool:
    """A value with event dims but no batch-plate dim: the plate broadcast a density
    over the whole minibatch (``.to_event()`` over the data), so every datum would
    carry the joint density of all of them."""
    event_dim = getattr(site["fn"], "event_dim", 0)
    value = site["value"]
    # pyro.factor's Unit value is empty: its log factor alone carries the shape.
    return event_dim > 0 and value.numel() > 0 and value.dim() - event_dim < -batch.dim


def _same_plate(a: BatchFrame, b: BatchFrame) -> bool:
    return (a.name, a.dim, a.size, a.full_size) == (b.name, b.dim, b.size, b.full_size)


def _is_reparameterized(site: dict) -> bool:
    return bool(getattr(site["fn"], "has_rsample", False))


def _contributes(site: dict) -> bool:
    """Subsample and deterministic sites carry no density and may live anywhere."""
    return not (site_is_subsample(site) or site["infer"].get("_deterministic", False))


def _site_filter(name: str, site: dict) -> bool:
    return _contributes(site)


def _batch_frame(site: dict, role: str, model_trace: Trace) -> tuple[BatchFrame, int | None]:
    batch = None
    particle_dim = None
    for frame in site["cond_indep_stack"]:
        if isinstance(frame, BatchFrame):
            if batch is not None and batch.name != frame.name:
                raise BatchPlateError(
                    f"{role} site '{site['name']}' lies in two batch plates, "
                    f"'{frame.name}' and '{batch.name}'. A program has exactly one batch plate; "
                    "use pyro.plate for plates inside a datum."
                )
            batch = frame
        elif frame.name == PARTICLE_PLATE:
            particle_dim = frame.dim
    if batch is None:
        raise missing_batch_plate_error(site, role, model_trace)
    return batch, particle_dim


def compute_log_weights(
    pairs: Iterable[tuple[Trace, Trace]],
    num_particles: int,
    *,
    elbo_score: bool = False,
) -> LogWeights:
    """Reduce (model, guide) trace pairs to :class:`LogWeights`.

    ``pairs`` is a one-element sequence holding a vectorized pair (particles in
    the particle plate, or a single particle), or any iterable of one pair per
    particle (traces are dropped as soon as they are reduced).
    """
    vectorized_particles = num_particles == 1 or (isinstance(pairs, Sequence) and len(pairs) == 1)
    if vectorized_particles:
        pairs = list(pairs)
    subsample = None  # the batch plate's dataset indices, for error messages
    K_trace = num_particles if vectorized_particles else 1
    batch: BatchInfo | None = None
    first: tuple[BatchFrame, str, str] | None = None  # (frame, role, site) that set the plate
    sites: list[_Site] = []
    rows_p, rows_q, rows_s = [], [], []
    has_score = False
    like = None

    for index, (model_trace, guide_trace) in enumerate(pairs):
        cols = None
        for role, trace in (("model", model_trace), ("guide", guide_trace)):
            for name, site in trace.nodes.items():
                if site["type"] != "sample" or not _contributes(site):
                    continue
                frame, particle_dim = _batch_frame(site, role, model_trace)
                if first is None:
                    first = (frame, role, name)
                    batch = BatchInfo.of(frame)
                elif not _same_plate(frame, first[0]):
                    raise plates_disagree_error(first, (frame, role, name))
                if cols is None:
                    cols = [_Column(batch) for _ in range(3)]
                if role == "guide" and not frame.vectorized:
                    check_guide_datum(site, frame, model_trace)
                log_prob = _site_log_prob(site, batch)
                if batch.vectorized:
                    value = _to_kb(log_prob, particle_dim, batch.dim)
                    if value.shape[1] != batch.size or _event_spans_batch(site, batch):
                        raise event_over_batch_error(role, name, site, batch)
                    datum = None
                else:
                    value = _to_kb(log_prob, particle_dim, None)
                    datum = frame.datum
                like = value
                sites.append(_Site(role, name, value.detach(), datum, index))
                if role == "model":
                    cols[0].add(value, datum)
                else:
                    cols[1].add(value, datum)
                    if not _is_reparameterized(site):
                        has_score = True
                        score = _site_score_log_prob(site)
                        if batch.vectorized:
                            score = _to_kb(score, particle_dim, batch.dim)
                        else:
                            score = _to_kb(score, particle_dim, None)
                        cols[2].add(score, datum)
        if cols is None:
            raise BatchPlateError(
                "The model and guide have no sample sites: there is nothing to weigh. "
                "Put the model's observations inside a batch_plate."
            )
        if index == 0:
            subsample_site = model_trace.nodes.get(batch.name)
            if subsample_site is not None and site_is_subsample(subsample_site):
                subsample = subsample_site["value"]
        if not batch.vectorized:
            check_sequential_coverage(batch, cols[0].per_datum, "model")
        rows_p.append(cols[0].result(K_trace, like))
        rows_q.append(cols[1].result(K_trace, like))
        rows_s.append(cols[2].result(K_trace, like))

    log_p = torch.cat(rows_p) if len(rows_p) > 1 else rows_p[0]
    log_q = torch.cat(rows_q) if len(rows_q) > 1 else rows_q[0]
    log_w = log_p - log_q
    if not bool(torch.isfinite(log_w.detach()).all()):
        raise report_non_finite(log_w.detach(), sites, batch, subsample, vectorized_particles)
    score_log_q = None
    if has_score:
        score_log_q = torch.cat(rows_s) if len(rows_s) > 1 else rows_s[0]

    score = None
    if elbo_score and has_score:
        if vectorized_particles:
            score = _rao_blackwellized_score(pairs[0], batch, num_particles)
        else:
            # Sites need not align across per-particle traces (dynamic programs),
            # so the cost is the whole datum's log weight.
            cost = log_w.detach()
            cost = cost - _leave_one_out_mean(cost, dim=0)
            score = cost * score_log_q
    return LogWeights(log_p, log_q, score_log_q, score, batch)


def _leave_one_out_mean(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean over ``dim`` of the other entries (zero when there are none)."""
    K = x.shape[dim]
    if K < 2:
        return torch.zeros_like(x)
    return (x.sum(dim, keepdim=True) - x) / (K - 1)


def _rao_blackwellized_score(pair: tuple[Trace, Trace], batch: BatchInfo, K: int) -> torch.Tensor:
    """ELBO score-function surrogate for a vectorized-particle trace pair.

    Within each datum, a non-reparameterized guide site's cost is the sum of
    log p - log q terms that share its inner plate indices (Pyro's Trace_ELBO
    rule, which keeps the batch plate since every site lies in it), minus the
    mean cost of the other particles (a baseline independent of this
    particle's draw).
    """
    model_trace, guide_trace = pair
    groups: dict[int | None, MultiFrameTensor] = {}

    def group_of(site: dict) -> tuple[int | None, int | None]:
        frame, particle_dim = _batch_frame(site, "model", model_trace)
        return (None if frame.vectorized else frame.datum), particle_dim

    for sign, trace in ((1.0, model_trace), (-1.0, guide_trace)):
        for site in trace.nodes.values():
            if site["type"] == "sample" and _contributes(site):
                key, _ = group_of(site)
                term = sign * _site_log_prob(site, batch).detach()
                groups.setdefault(key, MultiFrameTensor()).add((site["cond_indep_stack"], term))

    result = _Column(batch)
    like = None
    for site in guide_trace.nodes.values():
        if site["type"] != "sample" or not _contributes(site) or _is_reparameterized(site):
            continue
        key, particle_dim = group_of(site)
        log_q = _site_score_log_prob(site)
        # The site's own term is in its group, so the cost has the particle dim.
        cost = groups[key].sum_to(site["cond_indep_stack"])
        if particle_dim is not None and -particle_dim <= cost.dim():
            cost = cost - _leave_one_out_mean(cost, particle_dim)
        value = _to_kb(cost * log_q, particle_dim, batch.dim)
        like = value
        result.add(value, key)
    return result.result(K, like)


# ---------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------


def log_weights(
    model: Callable,
    guide: Callable,
    *args,
    num_particles: int = 1,
    vectorize_particles: bool = False,
    max_plate_nesting: float = math.inf,
    **kwargs,
) -> torch.Tensor:
    """The ``[K, B]`` tensor of per-datum log weights ``l[k, b]`` (design.md).

    ``l[k, b] = log p(x_b, z_b^k) - log q(z_b^k | x_b)``, summed over every
    sample site at batch index ``b`` (inner plates and event dims included),
    with user masks and scales but without the batch plate's ``N/B``
    subsampling scale. The result keeps its autograd graph.

    :param model: a Pyro model whose data lie in a :class:`~batchplate.batch_plate`.
    :param guide: its guide, using the same batch plate.
    :param num_particles: ``K``.
    :param vectorize_particles: draw all particles in one vectorized trace
        (the program must have static structure).
    :param max_plate_nesting: bound on the program's nested vectorized plates;
        guessed by running the program once when omitted.
    """
    if vectorize_particles and num_particles > 1 and max_plate_nesting == math.inf:
        max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
    pairs = sample_traces(
        model,
        guide,
        args,
        kwargs,
        num_particles=num_particles,
        vectorize_particles=vectorize_particles,
        max_plate_nesting=max_plate_nesting,
    )
    return compute_log_weights(pairs, num_particles).log_w
