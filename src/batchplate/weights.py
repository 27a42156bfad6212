"""Reduce: scored trace pairs to the `[K, B]` per-datum log weights.

The last stage before the objectives (draw, check, reduce). For datum `b`
and particle `k` (the Contract page, docs/contract.md):

$$ l[k, b] = \\log p(x_b, z_b^k) - \\log q(z_b^k \\mid x_b), $$

where each log density sums every sample site at batch index `b`, over its
inner plates and event dims, with the user's mask and scale but without the
batch plate's own `N/B` subsampling scale. The pairs come checked from
`batchplate.draw`; the layout (vectorized or per-particle particles) comes
with them, and the batch plate's (vectorized or sequential) from its frame.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pyro.distributions import Delta
from pyro.distributions.util import scale_and_mask
from pyro.poutine import Trace

from .autobatch import autobatch_log_weights
from .contraction import guide_enumerated, marginal_log_p, model_enumerated
from .draw import PARTICLE_PLATE, Pair, Particles, draw_particles, subsample_indices
from .errors import BatchPlateError
from .plate import BatchInfo, batch_frame
from .validation import contributes, non_finite_error


@dataclass
class LogWeights:
    """Per-datum log densities of `K` particles for `B` data.

    All tensors have shape `[K, B]` and keep their autograd graph.
    """

    log_p: torch.Tensor
    """`log p(x_b, z_b^k)`: every model sample site at datum `b`."""
    log_q: torch.Tensor
    """`log q(z_b^k | x_b)`: every guide sample site at datum `b`."""
    score_log_q: torch.Tensor | None
    """The part of `log_q` from non-reparameterized guide sites, masked but not
    scaled (their score functions), or `None` when every guide site is
    reparameterized."""
    batch: BatchInfo
    pair: Pair | None = None
    """The one trace pair holding every particle (vectorized particles), for
    estimators that look inside a datum; `None` for one pair per particle."""
    extra: torch.Tensor | None = None
    """`[K, B]`: the estimator's own per-pair term (see `compute_log_weights`)."""
    global_log_w: torch.Tensor | None = None
    """`[K]`: `G`, the `log p - log q` of the sites outside the batch plate (global
    latents, MAP sites, global observations), `None` without them. Not part of
    `log_w`: the reductions add it once (`BatchObjective.reduce`)."""
    global_latents: tuple[str, ...] = ()
    """Guide sites outside the batch plate that are not point masses (`dist.Delta`)."""
    global_score_log_q: torch.Tensor | None = None
    """`[K]`: the score-function log probs of the non-reparameterized guide sites
    outside the batch plate (masked, not scaled), `None` without any."""

    @property
    def log_w(self) -> torch.Tensor:
        """`l[k, b] = log p - log q` (computed once: each extra `log p - log q` is an op
        forward and backward; `log_p` and `log_q` are not reassigned)."""
        cached = self.__dict__.get("_log_w")
        if cached is None or cached[0] is not self.log_p or cached[1] is not self.log_q:
            cached = (self.log_p, self.log_q, self.log_p - self.log_q)
            self.__dict__["_log_w"] = cached
        return cached[2]

    @property
    def num_particles(self) -> int:
        return self.log_p.shape[0]


# -- one site's terms ------------------------------------------------------------


def site_log_prob(site: dict, batch: BatchInfo) -> torch.Tensor:
    """The site's log prob with mask and user scale, without the batch plate's `N/B`."""
    if batch.full_size != batch.size:
        return site["log_prob"] / batch.subsample_scale
    return site["log_prob"]


def score_log_prob(site: dict) -> torch.Tensor:
    """The site's log prob for its score function: masked but never scaled.

    A user's `poutine.scale` reweights the site's term in the objective, but
    the particle was still drawn from the unscaled `q`, so `grad log q` is
    unscaled. Masked entries are dropped, as in Pyro.
    """
    return scale_and_mask(site["unscaled_log_prob"], mask=site["mask"])


def is_reparameterized(site: dict) -> bool:
    return bool(getattr(site["fn"], "has_rsample", False))


def particle_dim(site: dict) -> int | None:
    """The dim of the particle plate in the site's log prob, if particles are vectorized."""
    for frame in site["cond_indep_stack"]:
        if frame.name == PARTICLE_PLATE:
            return frame.dim
    return None


def to_kb(value: torch.Tensor, particle: int | None, batch: int | None) -> torch.Tensor:
    """Sum a site's log-prob tensor down to `[K or 1, B or 1]`, keeping the given dims."""
    n = value.dim()
    keep = [d for d in (particle, batch) if d is not None and -d <= n]
    shape = (
        value.shape[particle] if particle in keep else 1,
        value.shape[batch] if batch in keep else 1,
    )
    drop = [d for d in range(-n, 0) if d not in keep]
    if drop:  # (sum over an empty list would sum everything)
        value = value.sum(drop)
    return value.reshape(shape)


def _datum_total(value: torch.Tensor, site: dict) -> torch.Tensor:
    """A site's term summed within its datum (sequential plate): `[]`, or `[K]`."""
    dim = particle_dim(site)
    if dim is not None:
        return to_kb(value, dim, None).reshape(-1)
    return value if value.dim() == 0 else value.sum()


# -- sites to [K, B] -----------------------------------------------------------------


def reduce_sites(
    sites: list[dict], batch: BatchInfo, K: int, term: Callable[[dict], torch.Tensor]
) -> torch.Tensor | None:
    """`[K, B]`: `term(site)` (a tensor shaped like the site's log prob) summed per
    datum over `sites`, in the batch plate's layout; `None` without sites.

    The building block of the weights and of estimators that need per-site terms
    (score functions, analytic KL, baselines).
    """
    if not sites:
        return None
    if batch.vectorized:
        # Summed from the first term, not from 0: `sum` would add a zero (one more op
        # forward and backward per reduction).
        terms = (to_kb(term(site), particle_dim(site), batch.dim) for site in sites)
        total = next(terms)
        for value in terms:
            total = total + value
        return total.expand(K, batch.size)
    # One scatter per trace, not one add per site: sequential plates have many sites.
    # (Site log probs, not Pyro's `log_prob_sum`: its NaN hooks would run in every
    # backward pass.)
    terms = torch.stack([_datum_total(term(site), site) for site in sites])
    index = torch.tensor([batch_frame(site).datum for site in sites], device=terms.device)
    per_datum = terms.new_zeros((batch.size, *terms.shape[1:]))
    per_datum.index_add_(0, index, terms)
    return per_datum.reshape(batch.size, -1).T.expand(K, batch.size)


def density_sites(trace: Trace) -> list[dict]:
    """The sample sites that carry a density (not subsample or deterministic sites)."""
    return [s for s in trace.nodes.values() if s["type"] == "sample" and contributes(s)]


def _reduce_trace(
    trace: Trace, batch: BatchInfo, K: int, score: bool = False, skip: set[str] = frozenset()
) -> torch.Tensor | None:
    """`[K, B]`: the trace's log probs summed per datum (`None` without sites).

    `score=True` sums the score-function terms of non-reparameterized sites.
    The batch plate's `N/B` stays in the log-prob terms.
    """
    sites = [site for site in local_sites(trace) if site["name"] not in skip]
    if score:
        sites = [site for site in sites if not is_reparameterized(site)]
    return reduce_sites(sites, batch, K, score_log_prob if score else _log_prob)


def _log_prob(site: dict) -> torch.Tensor:
    return site["log_prob"]


# -- pairs to [K, B] ----------------------------------------------------------------


def pair_batch(pair: Pair) -> BatchInfo:
    """The batch plate of a checked pair (every contributing site lies in it)."""
    for trace in pair:
        for site in trace.nodes.values():
            if site["type"] == "sample" and contributes(site) and batch_frame(site) is not None:
                return BatchInfo.of(batch_frame(site))
    raise AssertionError("validation.check_pair lets no pair without sites through")


def _reduce_pair(pair: Pair, batch: BatchInfo, K: int) -> tuple[torch.Tensor, ...]:
    """`(log_p, log_q, score_log_q or None)` of one pair, each `[K, B]`."""
    model_trace, guide_trace = pair
    enumerated_guide = guide_enumerated(pair)
    if enumerated_guide:
        raise guide_enumeration_error(enumerated_guide)
    # Sites touching a model-enumerated site are summed out exactly, per datum.
    enumerated, marginal = marginal_log_p(pair, batch, K)
    log_p = _reduce_trace(model_trace, batch, K, skip=enumerated)
    log_q = _reduce_trace(guide_trace, batch, K)
    scale = _common_score_scale(guide_trace)
    if scale is None:
        score = _reduce_trace(guide_trace, batch, K, score=True)
    else:  # the score terms are log q itself, unscaled: no op per site
        score = log_q if scale == 1 else log_q / scale
    if log_p is None:
        log_p = torch.zeros_like(log_q if log_q is not None else marginal)
    if log_q is None:
        log_q = torch.zeros_like(log_p)
    if batch.full_size != batch.size:
        log_p, log_q = log_p / batch.subsample_scale, log_q / batch.subsample_scale
    if marginal is not None:  # already without the batch plate's N/B
        log_p = log_p + marginal
    return log_p, log_q, score


def _common_score_scale(trace: Trace) -> float | None:
    """The one numeric scale of a trace whose sites are all unmasked and
    non-reparameterized, or `None` when the sites differ in any of that."""
    scales = set()
    for site in trace.nodes.values():
        if site["type"] == "sample" and contributes(site):
            scale = site["scale"]
            if is_reparameterized(site) or site["mask"] is not None:
                return None
            if isinstance(scale, torch.Tensor) or scale == 0:
                return None
            scales.add(scale)
    return scales.pop() if len(scales) == 1 else None


def _culprits(pair: Pair, batch: BatchInfo, k: int, b: int) -> list[str]:
    """The sites with a non-finite log density at particle `k` (of this pair) and datum `b`."""
    found = []
    for role, trace in zip(("model", "guide"), pair, strict=True):
        for site in trace.nodes.values():
            frame = batch_frame(site) if site["type"] == "sample" else None
            if frame is None or not contributes(site):
                continue
            if not frame.vectorized and frame.datum != b:
                continue
            value = to_kb(site_log_prob(site, batch).detach(), particle_dim(site), frame.dim)
            value = value[min(k, value.shape[0] - 1), b if frame.vectorized else 0]
            if not bool(torch.isfinite(value)):
                found.append(f"{role} '{site['name']}' ({float(value)})")
    return found


def _check_finite(rows: tuple, pair: Pair, batch: BatchInfo, first_particle: int) -> None:
    log_w = (rows[0] - rows[1]).detach()
    if bool(torch.isfinite(log_w).all()):
        return
    bad = (~torch.isfinite(log_w)).nonzero()
    culprits = _culprits(pair, batch, int(bad[0, 0]), int(bad[0, 1]))
    subsample = subsample_indices(pair[0], batch.name)
    raise non_finite_error(log_w, culprits, batch, subsample, first_particle)


#: An estimator's own per-pair term: `(pair, batch, K) -> [K, B]`, computed while
#: the pair's traces are alive (per-particle traces are dropped once reduced).
PairTerm = Callable[[Pair, BatchInfo, int], torch.Tensor]


def compute_log_weights(particles: Particles, extra: PairTerm | None = None) -> LogWeights:
    """Reduce drawn, checked particles to `LogWeights`.

    Per-particle pairs are reduced as they are drawn and then dropped, so the
    `K` traces are never alive at once. `extra`, if given, is evaluated on every
    pair and concatenated over particles into `LogWeights.extra`.
    """
    K = particles.num_particles if particles.vectorized else 1
    rows, extras, globals_, scores, pair = [], [], [], [], None
    for pair in particles.pairs:
        batch = pair_batch(pair)
        reduced = _reduce_pair(pair, batch, K)
        _check_finite(reduced, pair, batch, first_particle=len(rows))
        rows.append(reduced)
        if extra is not None:
            extras.append(extra(pair, batch, K))
        globals_.append(global_terms(pair, K))
        scores.append(global_score_log_q(pair, K))
    log_p, log_q = (_cat([row[i] for row in rows]) for i in (0, 1))
    score_log_q = None
    if any(row[2] is not None for row in rows):  # dynamic programs: in some particles only
        score_log_q = _cat([_or_zeros(row[2], row[0]) for row in rows])
    # An enumerated pair's site terms are not per-site costs (they carry enumeration dims).
    # Nor are a pair's with global sites, whose costs span the whole batch.
    whole = particles.vectorized and not model_enumerated(pair) and globals_[0][0] is None
    weights = LogWeights(log_p, log_q, score_log_q, batch, pair if whole else None)
    weights.extra = _cat(extras) if extras else None
    if globals_[0][0] is not None:
        _attach_globals(weights, globals_, scores, K)
    return weights


def _attach_globals(weights: LogWeights, globals_: list, scores: list, K: int) -> None:
    """The sites outside the batch plate: their `[K]` term `G`, names and score terms."""
    weights.global_log_w = torch.cat([g.expand(K) for g, _ in globals_])
    weights.global_latents = globals_[0][1]
    if any(s is not None for s in scores):  # dynamic programs: in some particles only
        like = weights.global_log_w[:K]
        weights.global_score_log_q = torch.cat([_or_zeros(s, like) for s in scores])


def global_score_log_q(pair: Pair, K: int) -> torch.Tensor | None:
    """`[K]`: the score functions' log q of the non-reparameterized guide sites outside
    the batch plate (`None` without any): a global draw's cost spans every datum."""
    total = None
    for site in density_sites(pair[1]):
        if batch_frame(site) is None and not is_reparameterized(site):
            term = to_kb(score_log_prob(site), particle_dim(site), None).reshape(-1)
            total = term if total is None else total + term
    return None if total is None else total.expand(K)


def global_terms(pair: Pair, K: int) -> tuple[torch.Tensor | None, tuple[str, ...]]:
    """`([K], names)`: `G = log p - log q` of the sites outside the batch plate (`None`
    without any), and the guide's global latents that are not point masses."""
    total, latents = None, []
    for sign, trace in zip((1.0, -1.0), pair, strict=True):
        for site in density_sites(trace):
            if batch_frame(site) is not None:
                continue
            term = sign * to_kb(site["log_prob"], particle_dim(site), None).reshape(-1)
            total = term if total is None else total + term
            # A masked-out site carries no density (AutoDiagonalNormal's flat vector, whose
            # density its Delta sites carry per datum): not a global latent.
            point_mass = _is_point_mass(site["fn"]) and not site["infer"].get("random_point")
            if sign < 0 and not point_mass and site["mask"] is not False:
                latents.append(site["name"])
    return (None if total is None else total.expand(K)), tuple(latents)


def _is_point_mass(fn) -> bool:
    while hasattr(fn, "base_dist"):  # masked, independent, expanded wrappers
        fn = fn.base_dist
    return isinstance(fn, Delta)


def local_sites(trace: Trace) -> list[dict]:
    """The density sites inside the batch plate (weighed per datum)."""
    return [site for site in density_sites(trace) if batch_frame(site) is not None]


def guide_enumeration_error(names: list[str]) -> BatchPlateError:
    """Guide-side enumeration under an importance-weighted objective."""
    return BatchPlateError(
        f"guide sites {names} are enumerated (infer={{'enumerate': 'parallel'}} or "
        "config_enumerate on the guide). Importance-weighted objectives and log_evidence weigh "
        "particles drawn from the guide, and an enumerated guide site is not a draw: its "
        "weight would need q's probabilities inside the logsumexp. Use batchplate.TraceEnum_ELBO "
        "for guide-side enumeration, or enumerate the site in the model (remove it from the "
        "guide) so that it is summed exactly inside each datum, or sample it in the guide."
    )


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    # One particle (or one vectorized pair) needs no copy: a cat of one tensor is a
    # copy forward and a graph node backward, a few us each per step.
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _or_zeros(value: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if value is None else value


def log_weights(
    model: Callable,
    guide: Callable,
    *args,
    num_particles: int = 1,
    vectorize_particles: bool = False,
    max_plate_nesting: float = math.inf,
    autobatch: bool = False,
    **kwargs,
) -> torch.Tensor:
    """The `[K, B]` tensor of per-datum log weights `l[k, b]` (the Contract page).

    `l[k, b] = log p(x_b, z_b^k) - log q(z_b^k | x_b)`, summed over every
    sample site at batch index `b` (inner plates and event dims included),
    with user masks and scales but without the batch plate's `N/B`
    subsampling scale. The result keeps its autograd graph.

    :param model: a Pyro model whose data lie in a `batchplate.batch_plate`.
    :param guide: its guide, using the same batch plate.
    :param num_particles: `K`.
    :param vectorize_particles: draw all particles in one vectorized trace
        (the program must have static structure).
    :param max_plate_nesting: bound on the program's nested vectorized plates;
        guessed by running the program once when omitted.
    :param autobatch: run a sequential batch-plate program's lanes batched
        (see `batchplate.autobatch`); `vectorize_particles=False` then runs the
        `B` lanes of one particle at a time.
    """
    if autobatch:
        drawn = autobatch_log_weights(
            model,
            guide,
            args,
            kwargs,
            num_particles=num_particles,
            vectorize_particles=vectorize_particles,
        )
        return LogWeights(*drawn).log_w
    particles = draw_particles(
        model,
        guide,
        args,
        kwargs,
        num_particles=num_particles,
        vectorize_particles=vectorize_particles,
        max_plate_nesting=max_plate_nesting,
    )
    return compute_log_weights(particles).log_w
