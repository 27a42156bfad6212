"""The per-datum mean-field ELBO: analytic KL divergences where registered."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer.util import is_validation_enabled
from torch.distributions import kl_divergence

from ..contraction import model_enumerated
from ..draw import Pair
from ..plate import BatchInfo, batch_frame
from ..weights import LogWeights, density_sites, is_reparameterized, reduce_sites, site_log_prob
from .base import BatchObjective
from .pathwise import ELBO_HAS_NO_DREG, check_estimator


class TraceMeanField_ELBO(BatchObjective):
    r"""Per-datum ELBO with analytic KL terms; a drop-in for `pyro.infer.TraceMeanField_ELBO`.

    For every latent site whose guide and prior have a registered
    `torch.distributions.kl_divergence`, the Monte Carlo term
    `log p(z) - log q(z)` of `l[k, b]` is replaced by `-KL(q || p)`, computed
    per datum (summed over the site's inner plates and event dims), masked and
    scaled by the guide site's mask and user scale, without the batch plate's
    `N/B`; other latent sites keep their Monte Carlo term, as in Pyro. Then

    $$ L_b = \frac{1}{K} \sum_k \Big(\log p(x_b \mid z_b^k)
        + \sum_{s \text{ MC}} (\log p_s - \log q_s)[k, b]
        - \sum_{s \text{ KL}} \mathrm{KL}_s[k, b]\Big), $$

    reduced over the batch like every objective. The value is the analytic
    one (as Pyro's), of lower variance than `Trace_ELBO`'s; its expectation
    is the same ELBO.

    Like Pyro's, the estimator assumes a mean-field guide (no latent's prior
    depends on a latent drawn after it in the guide), and warns as Pyro's does
    when model and guide draw their sites in different orders (see
    `check_site_order`). A latent whose prior depends on a site enumerated in
    the model keeps its Monte Carlo term, summed exactly over the enumerated
    values. Sites outside the batch plate (global latents, MAP sites) enter
    once, as the term `G` of `batchplate.Trace_ELBO`, with their Monte Carlo
    term. Every guide site must be reparameterized: a non-reparameterized one raises
    `NotImplementedError`, whatever Pyro's validation setting (it would get no
    score-function term, a silently biased gradient).
    """

    global_latents_allowed = True  # a sum over sites, as the ELBO: G enters once

    def __init__(self, *args, estimator: str = "standard", **kwargs) -> None:
        self.estimator = check_estimator(estimator, _REFUSED, type(self).__name__)
        super().__init__(*args, **kwargs)

    def weigh(self, model: Callable, guide: Callable, args: tuple, kwargs: dict, **options):
        options.setdefault("extra", kl_correction)
        return super().weigh(model, guide, args, kwargs, **options)

    def per_datum(self, weights: LogWeights) -> tuple[torch.Tensor, torch.Tensor]:
        value = (weights.log_w + weights.extra).mean(0)
        return value, value


_REFUSED = {
    "stl": (
        "its sites with a registered KL enter as the exact -KL(q || p), not as a sampled "
        "log p - log q, so there is no sampled density term for STL to drop, and the "
        "sampled likelihood's path gradient does not vanish at the posterior; its guides "
        "are all reparameterized, so Trace_ELBO(estimator='stl') takes the same programs"
    ),
    "dreg": ELBO_HAS_NO_DREG,
}


def kl_correction(pair: Pair, batch: BatchInfo, K: int) -> torch.Tensor:
    """`[K, B]`: `-KL - (log p - log q)` summed per datum over the sites with an analytic KL.

    A latent whose prior depends on a site the model enumerates keeps its Monte
    Carlo term: its density is summed over the enumerated values inside
    `log_p` (`batchplate.contraction.marginal_log_p`), so no single prior is
    there to take a KL against.
    """
    model_trace, guide_trace = pair
    if is_validation_enabled():
        check_site_order(pair)
    enum_dims = [site["infer"]["_enumerate_dim"] for site in model_enumerated(pair)]
    corrections: dict[str, torch.Tensor] = {}
    for guide_site in density_sites(guide_trace):
        if not is_reparameterized(guide_site):
            raise NotImplementedError(
                f"guide site '{guide_site['name']}' ({type(guide_site['fn']).__name__}) is not "
                "reparameterized: TraceMeanField_ELBO needs every guide distribution fully "
                "reparameterized. Use batchplate.TraceGraph_ELBO or batchplate.Trace_ELBO."
            )
        model_site = model_trace.nodes[guide_site["name"]]
        if batch_frame(guide_site) is None or _depends_on(model_site["log_prob"], enum_dims):
            continue  # a global latent's Monte Carlo term is in G, outside the [K, B] terms
        try:
            kl = kl_divergence(guide_site["fn"], model_site["fn"])
        except NotImplementedError:
            continue  # no registered KL: the Monte Carlo term stays, as in Pyro
        scale = guide_site["scale"]
        if batch.full_size != batch.size:
            scale = scale / batch.subsample_scale
        kl = scale_and_mask(kl, scale=scale, mask=guide_site["mask"])
        mc = site_log_prob(model_site, batch) - site_log_prob(guide_site, batch)
        corrections[guide_site["name"]] = -kl - mc
    sites = [s for s in density_sites(guide_trace) if s["name"] in corrections]
    total = reduce_sites(sites, batch, K, lambda site: corrections[site["name"]])
    if total is None:
        any_site = (density_sites(model_trace) or density_sites(guide_trace))[0]
        return any_site["log_prob"].new_zeros(K, batch.size)
    return total


def _depends_on(log_prob: torch.Tensor, enum_dims: list[int]) -> bool:
    """Whether a log density varies along one of the model's enumeration dims."""
    return any(-d <= log_prob.dim() and log_prob.shape[d] > 1 for d in enum_dims)


def check_site_order(pair: Pair) -> None:
    """Warn, as Pyro's `TraceMeanField_ELBO` does, when model and guide draw their
    latents in different orders.

    The analytic `KL(q(z) || p(z | y))` is taken at the guide's draw of the prior's
    parents `y`. Its expectation is the ELBO's `E[log q(z) - log p(z | y)]` only if
    `y` was not drawn from a guide distribution that depends on `z`: when the guide
    draws `z` before `y` and uses `z` for `y`, the KL is biased. Sites in the same
    order in both programs rule that out (sufficient, not necessary, as in Pyro).
    """
    model_trace, guide_trace = pair
    model_sites = [s["name"] for s in density_sites(model_trace) if s["name"] in guide_trace]
    guide_sites = [s["name"] for s in density_sites(guide_trace) if s["name"] in model_trace]
    if model_sites != guide_sites:
        warnings.warn(
            "Failed to verify mean field restriction on the guide: model and guide draw "
            f"their latents in different orders (model: {model_sites}, guide: {guide_sites}). "
            "The analytic KL of a latent is biased if the guide drew one of its prior's "
            "parents from a distribution that depends on it. To eliminate this warning, "
            "draw the guide's sites in the model's order.",
            UserWarning,
            stacklevel=2,
        )
