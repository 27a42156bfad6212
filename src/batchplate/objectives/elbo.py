"""The per-datum ELBO, with its Rao-Blackwellized score-function term."""

from __future__ import annotations

import torch
from pyro.infer.util import MultiFrameTensor
from pyro.poutine import Trace

from ..plate import BatchInfo, batch_frame
from ..validation import contributes
from ..weights import (
    LogWeights,
    is_reparameterized,
    particle_dim,
    score_log_prob,
    site_log_prob,
    to_kb,
)
from .base import BatchObjective, leave_one_out_mean
from .pathwise import (
    ELBO_HAS_NO_DREG,
    PathWeights,
    check_estimator,
    nonreparam_log_q,
    through_samples,
    weigh_paths,
)


class Trace_ELBO(BatchObjective):
    r"""Per-datum evidence lower bound, a drop-in for `pyro.infer.Trace_ELBO`.

    For each datum `b` of the batch plate,

    $$ L_b = \frac{1}{K} \sum_k l[k, b],
        \qquad l[k, b] = \log p(x_b, z_b^k) - \log q(z_b^k \mid x_b), $$

    and the loss is `-mean_b L_b` (`reduction="mean"`), whose gradient is
    the average of per-datum gradients: the scale plain SGD expects, where
    Pyro's plate gives the sum (B times larger). With `reduction="sum"` the
    loss is `-(N/B) sum_b L_b`, Pyro's value.

    Gradients: reparameterized sites by autodiff; non-reparameterized guide
    sites by per-datum REINFORCE, `(1/K) sum_k (cost - baseline) grad log q(z_b^k)`.
    With vectorized particles the cost of a site is Rao-Blackwellized within
    its datum over inner plates (Pyro's Trace_ELBO rule) and the baseline is
    the mean cost of the other particles; with one trace per particle the cost
    is the datum's log weight and the baseline the other particles' mean.
    Either way the estimator is unbiased and datum `b` only uses datum `b`.

    References: Wingate & Weber (2013), *Automated variational inference in
    probabilistic programming*; Ranganath, Gerrish & Blei (2014), *Black box
    variational inference*.
    """

    # Global latents enter once, as the term G (the ELBO is a sum over sites).
    global_latents_allowed = True

    def __init__(self, *args, estimator: str = "standard", **kwargs) -> None:
        self.estimator = check_estimator(estimator, _REFUSED, type(self).__name__)
        super().__init__(*args, **kwargs)

    def weigh(self, model, guide, args: tuple, kwargs: dict, **options) -> LogWeights:
        if self.estimator == "standard":
            return super().weigh(model, guide, args, kwargs, **options)
        return weigh_paths(self, model, guide, args, kwargs, **options)

    def global_term(self, weights: LogWeights) -> torch.Tensor | None:
        """`G`, plus the score-function surrogate of non-reparameterized global latents.

        A global draw changes every datum's term, so its cost is the whole
        objective of its particle, `G_k + (N/B) sum_b l[k, b]` (Pyro's rule for a
        site outside every plate), less the other particles' mean as a baseline.
        In `"sum"` units; `reduce` divides `G` by `N` for `"mean"`, which scales
        this term alike. As in Pyro, the pathwise derivative of such a site's
        `-log q` (mean zero) is left out.
        """
        G = super().global_term(weights)
        score = weights.global_score_log_q
        if G is None or score is None:
            return G
        local = weights.log_w.sum(-1) * weights.batch.subsample_scale
        cost = (weights.global_log_w + local).detach()
        cost = cost - leave_one_out_mean(cost, dim=0)
        surrogate = ((cost + 1.0) * score).mean()
        return G + (surrogate - surrogate.detach())

    def per_datum(self, weights: LogWeights) -> tuple[torch.Tensor, torch.Tensor]:
        value = weights.log_w.mean(0)
        if isinstance(weights, PathWeights):
            return value, stl_surrogate(weights)
        if weights.score_log_q is None:
            return value, value
        # The pathwise derivative of -log q at a fixed discrete draw has mean zero;
        # leaving it out (as Pyro does) only removes variance.
        pathwise = weights.log_p - (weights.log_q - weights.score_log_q)
        return value, (pathwise + score_term(weights)).mean(0)


_REFUSED = {"dreg": f"{ELBO_HAS_NO_DREG}; estimator='stl' is the ELBO's sample-path estimator"}


def stl_surrogate(weights: PathWeights) -> torch.Tensor:
    """`[B]`: sticking the landing. The standard ELBO gradient less the
    reparameterized sites' `(1/K) sum_k d_phi log q(z_k)` (density parameters
    only), whose expectation is zero given the draws it conditions on; it is also
    exactly the part that does not vanish at the exact posterior. The model's
    parameters and the score-function terms keep the standard estimator.
    """
    K = weights.num_particles
    direct = weights.log_p.mean(0)
    if weights.score_log_q is not None:
        direct = direct + score_term(weights).mean(0)
    reparam_q = weights.log_q - nonreparam_log_q(weights)
    return direct + through_samples(-reparam_q / K, weights.paths)


def score_term(weights: LogWeights) -> torch.Tensor:
    """`[K, B]`: the per-datum REINFORCE surrogate, `(cost - baseline) * log q`."""
    if weights.pair is not None:
        return rao_blackwellized_score(weights.pair, weights.batch, weights.num_particles)
    # Sites need not align across per-particle traces (dynamic programs),
    # so the cost is the whole datum's log weight.
    cost = weights.log_w.detach()
    return (cost - leave_one_out_mean(cost, dim=0)) * weights.score_log_q


def rao_blackwellized_score(pair: tuple[Trace, Trace], batch: BatchInfo, K: int) -> torch.Tensor:
    """The score surrogate of a trace pair holding every particle.

    Within each datum, a non-reparameterized guide site's cost is the sum of
    log p - log q terms that share its inner plate indices (Pyro's Trace_ELBO
    rule, which keeps the batch plate since every site lies in it), minus the
    mean cost of the other particles (a baseline independent of this
    particle's draw).
    """
    costs = _costs_by_datum(pair, batch)
    columns: dict[int | None, torch.Tensor] = {}  # datum (None: all, vectorized) -> [K, B or 1]
    for site in pair[1].nodes.values():
        if site["type"] != "sample" or not contributes(site) or is_reparameterized(site):
            continue
        datum, dim = _datum_of(site), particle_dim(site)
        # The site's own term is in its group, so the cost has the particle dim.
        cost = costs[datum].sum_to(site["cond_indep_stack"])
        if dim is not None and -dim <= cost.dim():
            cost = cost - leave_one_out_mean(cost, dim)
        value = to_kb(cost * score_log_prob(site), dim, batch.dim)
        columns[datum] = value + columns[datum] if datum in columns else value
    if batch.vectorized:
        return columns[None].expand(K, batch.size)
    zero = next(iter(columns.values())).new_zeros(1, 1)
    return torch.cat([columns.get(b, zero).expand(K, 1) for b in range(batch.size)], dim=1)


def _datum_of(site: dict) -> int | None:
    frame = batch_frame(site)
    return None if frame.vectorized else frame.datum


def _costs_by_datum(pair: tuple[Trace, Trace], batch: BatchInfo) -> dict:
    """Detached `log p - log q` terms, grouped by datum (one group for a vectorized plate)."""
    groups: dict[int | None, MultiFrameTensor] = {}
    for sign, trace in zip((1.0, -1.0), pair, strict=True):
        for site in trace.nodes.values():
            if site["type"] == "sample" and contributes(site):
                term = sign * site_log_prob(site, batch).detach()
                groups.setdefault(_datum_of(site), MultiFrameTensor()).add(
                    (site["cond_indep_stack"], term)
                )
    return groups
