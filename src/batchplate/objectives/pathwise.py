"""Gradient estimators that differentiate through the sample only: STL and DReG.

With a reparameterized guide site `z = z(eps, phi)`, the log weight
`l = log p(x, z) - log q_phi(z | x)` depends on the guide's parameters twice:
through the sample `z` and directly through `q_phi`'s density. Sticking the
landing (Roeder et al., 2017) and the doubly reparameterized estimators
(Tucker et al., 2019) keep only the first path, reweighted. The derivative
"through the sample only", `d l / d z` with every density parameter held fixed,
is the autograd derivative of `l` with respect to the sampled value tensor
itself: the model replays the very tensor the guide drew, and autograd's
derivative with respect to an intermediate tensor follows only the paths that
leave it. A surrogate `sum_s (g_s.detach() * z_s).sum()` then has the gradient
`g_s . dz_s/dphi` for the guide's parameters and none for the model's.

A guide whose reparameterized draw feeds another reparameterized site's
distribution (a hierarchical guide `z1 -> z2`) would count the path through
`z2` twice; it is refused (`BatchPlateError`) rather than estimated wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from pyro.poutine import Trace

from ..draw import Pair, subsample_trace
from ..errors import BatchPlateError
from ..plate import BatchInfo
from ..weights import LogWeights, density_sites, is_reparameterized, reduce_sites
from .base import BatchObjective

#: Every estimator name an objective may be given; each objective accepts a subset.
ESTIMATORS = ("standard", "stl", "dreg")


def check_estimator(estimator: str, refused: dict[str, str], owner: str) -> str:
    """`estimator` if `owner` supports it; a `ValueError` saying why otherwise.

    `refused` maps the names in `ESTIMATORS` that `owner` does not support to the reason.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; known: {', '.join(ESTIMATORS)}")
    if estimator in refused:
        raise ValueError(f"{owner} does not support estimator={estimator!r}: {refused[estimator]}")
    return estimator


def _log_prob(site: dict) -> torch.Tensor:
    return site["log_prob"]


@dataclass
class SamplePaths:
    """Collects, pair by pair while the traces are alive, what the estimators need.

    Called as `compute_log_weights`'s `extra` term, it returns the `[K, B]`
    log density of the guide's non-reparameterized sites (with mask and user
    scale, without the batch plate's `N/B`, as in `l`) and keeps the sampled
    value tensors of the reparameterized guide sites.
    """

    prior: bool = False
    """Also sum the model's latent (unobserved) sites per datum: `log p(z_b^k)`."""
    latents: list[torch.Tensor] = field(default_factory=list)
    prior_rows: list[torch.Tensor] = field(default_factory=list)
    subsample: Trace | None = None
    """The first pair's subsample sites: the minibatch of this draw."""

    def __call__(self, pair: Pair, batch: BatchInfo, K: int) -> torch.Tensor:
        model_trace, guide_trace = pair
        if self.subsample is None:
            self.subsample = subsample_trace(pair)
        sites = density_sites(guide_trace)
        self.latents.extend(
            s["value"] for s in sites if is_reparameterized(s) and s["value"].requires_grad
        )
        if self.prior:
            latent = [s for s in density_sites(model_trace) if not s["is_observed"]]
            self.prior_rows.append(self._per_datum(latent, batch, K, sites))
        score = [s for s in sites if not is_reparameterized(s)]
        return self._per_datum(score, batch, K, sites)

    @staticmethod
    def _per_datum(sites: list, batch: BatchInfo, K: int, any_sites: list) -> torch.Tensor:
        total = reduce_sites(sites, batch, K, _log_prob)
        if total is None:  # a [K, B] zero on the traces' device and dtype
            return reduce_sites(any_sites, batch, K, _log_prob).detach() * 0
        return total / batch.subsample_scale if batch.full_size != batch.size else total

    def prior_log_p(self) -> torch.Tensor:
        """`[K, B]`: `log p(z_b^k)`, the model's latent sites only."""
        return torch.cat(self.prior_rows)


def nonreparam_log_q(weights: LogWeights) -> torch.Tensor:
    """`[K, B]`: the log density of the non-reparameterized guide sites, as in `l`."""
    assert weights.extra is not None, "weigh with extra=SamplePaths()"
    return weights.extra


def through_samples(target: torch.Tensor, paths: SamplePaths) -> torch.Tensor:
    """`[B]` surrogate whose gradient is `sum_s (d target.sum() / d z_s) . dz_s/dphi`.

    The derivative with respect to each reparameterized sample `z_s` is taken
    with every density parameter held fixed and then detached, so the gradient
    reaches the guide's parameters through `z_s` only, and never the model's.
    `target` is `[K, B]`; its batch entries are summed, and the result is spread
    evenly over the `B` data so that the objective's reduction (mean, or `N/B`
    times the sum) scales it as it scales every per-datum term.
    """
    B = target.shape[-1]
    latents = paths.latents
    if not (latents and target.requires_grad and torch.is_grad_enabled()):
        return target.new_zeros(B)
    _check_no_latent_paths(latents)
    grads = torch.autograd.grad(target.sum(), latents, retain_graph=True, allow_unused=True)
    terms = [(g.detach() * z).sum() for g, z in zip(grads, latents, strict=True) if g is not None]
    if not terms:
        return target.new_zeros(B)
    return (sum(terms) / B).expand(B)


def _check_no_latent_paths(latents: list[torch.Tensor]) -> None:
    """Refuse a reparameterized sample computed from another one (`z1 -> z2`).

    `d l / d z1` would then include the path through `z2`, which the surrogate
    counts again through `dz2/dphi`. One walk over the guide's autograd graph,
    each node visited once.
    """
    if len(latents) < 2:
        return
    nodes = {z.grad_fn: i for i, z in enumerate(latents) if z.grad_fn is not None}
    leaves = {id(z) for z in latents if z.grad_fn is None}
    clean: set = set()  # nodes known not to lead to a latent
    for z in latents:
        if z.grad_fn is None:
            continue
        seen: set = set()
        stack = [n for n, _ in z.grad_fn.next_functions]
        while stack:
            node = stack.pop()
            if node is None or node in clean or node in seen:
                continue
            if node in nodes or id(getattr(node, "variable", None)) in leaves:
                raise BatchPlateError(_LATENT_PATH_MESSAGE)
            seen.add(node)
            stack.extend(n for n, _ in node.next_functions)
        clean |= seen


_LATENT_PATH_MESSAGE = (
    "estimator='stl'/'dreg' needs the guide's reparameterized sites to be drawn "
    "independently given the data and the non-reparameterized sites, but one "
    "reparameterized sample is computed from another (a hierarchical guide, "
    "z1 -> z2). The derivative through z1 would then count the path through z2 "
    "twice. Use estimator='standard', or make the dependent site "
    "non-reparameterized (it then gets a score-function term)."
)


@dataclass
class PathWeights(LogWeights):
    """`LogWeights` with the sample paths of the draw (for STL and DReG)."""

    paths: SamplePaths = field(default_factory=SamplePaths)


def weigh_paths(objective, model, guide, args: tuple, kwargs: dict, **options) -> PathWeights:
    """`objective.weigh` (the base class's), keeping the sample paths of the draw."""
    paths = SamplePaths(prior=options.pop("prior_log_p", False))
    weights = BatchObjective.weigh(objective, model, guide, args, kwargs, extra=paths, **options)
    values = {f.name: getattr(weights, f.name) for f in fields(LogWeights)}
    return PathWeights(**values, paths=paths)
