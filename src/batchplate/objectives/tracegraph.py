"""The per-datum TraceGraph ELBO: downstream costs and baselines within each datum."""

from __future__ import annotations

from collections.abc import Callable

import torch
from pyro.infer.tracegraph_elbo import TrackNonReparam
from pyro.infer.util import MultiFrameTensor
from pyro.ops.provenance import detach_provenance, extract_provenance

from ..draw import Pair, subsample_indices
from ..errors import BatchPlateError
from ..plate import BatchInfo, batch_frame
from ..weights import (
    LogWeights,
    density_sites,
    is_reparameterized,
    reduce_sites,
    score_log_prob,
    site_log_prob,
)
from .base import BatchObjective
from .baseline import baseline
from .pathwise import ELBO_HAS_NO_DREG, check_estimator

#: The trace-node key where `TraceGraph_ELBO.prepare` keeps the names of the
#: non-reparameterized guide sites a log density depends on (its provenance).
PROVENANCE = "_batchplate_provenance"


class TraceGraph_ELBO(BatchObjective):
    r"""Per-datum ELBO with downstream-cost Rao-Blackwellization and baselines;
    a drop-in for `pyro.infer.TraceGraph_ELBO`.

    The value is `Trace_ELBO`'s, $L_b = \frac{1}{K}\sum_k l[k, b]$. The
    gradient of a non-reparameterized guide site `s` is, per datum,
    `(1/K) sum_k (c_s - baseline_s) grad log q_s(z_b^k)`, where the
    downstream cost `c_s` sums only the `log p - log q` terms that depend on
    `s`'s value (Pyro's provenance tracking), summed to `s`'s plates: the
    batch plate is kept, so each datum's cost is its own, and with a
    sequential plate a cost term from another datum is a `BatchPlateError`
    (the data would be coupled).

    Baselines follow Pyro's spec in the guide site's
    `infer={"baseline": {...}}` (`nn_baseline` with `nn_baseline_input`,
    `baseline_value`, `use_decaying_avg_baseline` with `baseline_beta`), with
    one baseline value per datum: a learned baseline has the cost's shape and
    is trained by the squared error `(c_s - baseline_s)^2` per datum, reduced
    like the objective; a decaying average is kept per dataset index when the
    batch plate subsamples, else per position (see
    `batchplate.objectives.baseline.decaying_average`).

    As everywhere in batchplate the score `grad log q_s` is masked but not
    scaled, and costs leave out the batch plate's `N/B`; stock Pyro scales
    both, so its score terms differ from these by `N/B` squared (subsampling)
    or a user scale squared.

    References: Schulman, Heess, Weber & Abbeel (2015), *Gradient estimation
    using stochastic computation graphs*; Mnih & Gregor (2014), *Neural
    variational inference and learning in belief networks*.
    """

    uses_baselines = True
    # Reparameterized global latents enter once, as the term G of Trace_ELBO; a
    # score-function one is refused in graph_surrogate.
    global_latents_allowed = True

    def __init__(self, *args, estimator: str = "standard", **kwargs) -> None:
        self.estimator = check_estimator(estimator, _REFUSED, type(self).__name__)
        super().__init__(*args, **kwargs)

    def weigh(self, model: Callable, guide: Callable, args: tuple, kwargs: dict, **options):
        options.setdefault("extra", graph_surrogate)
        # Outermost, as in Pyro: its hook tags a sampled value before the trace copies it.
        with TrackNonReparam():
            return super().weigh(model, guide, args, kwargs, **options)

    def prepare(self, pair: Pair) -> Pair:
        """Unwrap the provenance of every site's log densities once, keeping it aside
        for `downstream_costs`: the reductions then run on plain tensors (each op on a
        provenance tensor walks its arguments in Python)."""
        for trace in pair:
            for site in density_sites(trace):
                for key in ("log_prob", "unscaled_log_prob"):
                    value, provenance = extract_provenance(site[key])
                    site[key] = value
                    if key == "log_prob":
                        site[PROVENANCE] = provenance  # this trace node's own dict
        return pair

    def per_datum(self, weights: LogWeights) -> tuple[torch.Tensor, torch.Tensor]:
        log_w = detach_provenance(weights.log_w)
        if weights.extra is None:
            return log_w.mean(0), log_w.mean(0)
        return log_w.mean(0), (log_w + detach_provenance(weights.extra)).mean(0)


_REFUSED = {
    "stl": (
        "not implemented: TraceGraph_ELBO differs from Trace_ELBO only in its "
        "score-function sites (downstream costs, baselines), which STL leaves as they are; "
        "for STL on the reparameterized sites use Trace_ELBO(estimator='stl')"
    ),
    "dreg": ELBO_HAS_NO_DREG,
}


def graph_surrogate(pair: Pair, batch: BatchInfo, K: int) -> torch.Tensor:
    """`[K, B]`: what turns `l` into the TraceGraph surrogate of one trace pair.

    Per non-reparameterized guide site: `score * (cost - baseline)` with the
    signal detached, minus the learned baseline's squared error, plus the
    site's own `log q` (which `l` subtracts, and whose pathwise derivative the
    surrogate leaves out, as Pyro's).
    """
    model_trace, guide_trace = pair
    sites = [s for s in density_sites(guide_trace) if not is_reparameterized(s)]
    outside = [s["name"] for s in sites if batch_frame(s) is None]
    if outside:
        raise BatchPlateError(
            f"guide sites {outside} lie outside the batch plate and are not reparameterized: "
            "TraceGraph_ELBO keeps each score-function cost within its datum, and a global "
            "draw's cost spans every datum. Use batchplate.Trace_ELBO (a score term for "
            "global latents), a reparameterized distribution, or a point mass (MAP)."
        )
    if not sites:
        any_site = (density_sites(model_trace) or density_sites(guide_trace))[0]
        return detach_provenance(any_site["log_prob"]).new_zeros(K, batch.size)
    costs = downstream_costs(pair, batch)
    indices = subsample_indices(model_trace, batch.name)
    terms = {}
    for site in sites:
        name = site["name"]
        cost = costs[name].sum_to(site["cond_indep_stack"]) if name in costs else 0.0
        cost = torch.as_tensor(cost)
        base, base_loss = baseline(site, cost, batch, indices)
        signal = (cost - base).detach()
        own = detach_provenance(site_log_prob(site, batch))
        terms[name] = detach_provenance(score_log_prob(site)) * signal - base_loss + own
    return reduce_sites(sites, batch, K, lambda site: terms[site["name"]])


def downstream_costs(pair: Pair, batch: BatchInfo) -> dict[str, MultiFrameTensor]:
    """Detached `log p - log q` terms, by the non-reparameterized guide site they depend on.

    The batch plate's `N/B` is left out, as in `l`. With a sequential plate a
    term may only depend on sites of its own datum.
    """
    model_trace, guide_trace = pair
    costs: dict[str, MultiFrameTensor] = {}
    for negate, trace in zip((False, True), pair, strict=True):
        for site in density_sites(trace):
            log_prob, provenance = site_log_prob(site, batch), site[PROVENANCE]
            if not provenance:
                continue
            # (negated, not multiplied by a sign: no `1.0 * log p` op per model site)
            term = -log_prob.detach() if negate else log_prob.detach()
            for name in provenance:
                if not batch.vectorized:
                    _check_same_datum(site, guide_trace.nodes[name])
                costs.setdefault(name, MultiFrameTensor()).add((site["cond_indep_stack"], term))
    return costs


def _check_same_datum(site: dict, source: dict) -> None:
    here, there = batch_frame(site), batch_frame(source)
    if here.datum != there.datum:
        raise BatchPlateError(
            f"site '{site['name']}' (datum {here.datum}) depends on the value of guide site "
            f"'{source['name']}' (datum {there.datum}) of the sequential batch plate "
            f"'{here.name}': the data are coupled, and a per-datum objective is undefined. "
            "Compute each datum's sites from that datum's latents and input only."
        )
