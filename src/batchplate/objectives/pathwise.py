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
from pyro.distributions import Delta
from pyro.poutine import Trace

from ..draw import Pair, subsample_trace
from ..errors import BatchPlateError
from ..plate import BatchInfo
from ..weights import LogWeights, density_sites, is_reparameterized, reduce_sites
from .base import BatchObjective

#: Every estimator name an objective may be given; each objective accepts a subset.
ESTIMATORS = ("standard", "stl", "dreg")

#: Which objectives take each estimator beyond "standard".
TAKEN_BY = {
    "stl": ("Trace_ELBO", "JitTrace_ELBO"),
    "dreg": ("RenyiELBO", "JitRenyiELBO", "ReweightedWakeSleep"),
}


#: Why an ELBO refuses `"dreg"` (`Trace_ELBO` and every other ELBO form).
ELBO_HAS_NO_DREG = (
    "the ELBO's weights are the constant 1/K, so there is nothing to doubly reparameterize"
)


class EstimatorError(ValueError, TypeError):
    """An `estimator=` an objective refuses: unknown, or not one it supports.

    A `ValueError` like every refused constructor option, and a `TypeError` as
    Python raises for a keyword a callable does not take: the objectives without
    a choice of estimator used to refuse the keyword itself.
    """


def check_estimator(estimator: str, refused: dict[str, str], owner: str) -> str:
    """`estimator` if `owner` supports it; an `EstimatorError` saying why otherwise.

    `refused` maps the names in `ESTIMATORS` that `owner` does not support to the
    reason; the message also names the objectives that do take it.
    """
    if estimator not in ESTIMATORS:
        raise EstimatorError(
            f"unknown estimator {estimator!r}; known: {', '.join(ESTIMATORS)} ({_takers()})"
        )
    if estimator in refused:
        takers = ", ".join(TAKEN_BY[estimator])
        raise EstimatorError(
            f"{owner} does not support estimator={estimator!r}: {refused[estimator]}. "
            f"estimator={estimator!r} is taken by {takers}; "
            "see the estimators page of the docs (docs/estimators.md)."
        )
    return estimator


def _takers() -> str:
    return "; ".join(f"{name!r}: {', '.join(owners)}" for name, owners in TAKEN_BY.items())


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
    layouts: list[tuple[dict, BatchInfo, int, int]] = field(default_factory=list)
    """Per latent: its guide site, batch plate, the pair's `K` and first row in `[K, B]`."""
    rows: int = 0
    prior_rows: list[torch.Tensor] = field(default_factory=list)
    subsample: Trace | None = None
    """The first pair's subsample sites: the minibatch of this draw."""
    point_masses: bool = False
    """Keep point-mass guide sites (MAP, `dist.Delta`) among the latents. They have
    no density parameter to reparameterize, so their gradient must stay the standard
    estimator's, which the objectives give them when they are left out; RWS-DReG
    keeps them (flagged in `masses`) to cut them, as standard RWS detaches them."""
    masses: list[bool] = field(default_factory=list)
    """Per latent: whether it is a point mass (only with `point_masses`)."""

    def __call__(self, pair: Pair, batch: BatchInfo, K: int) -> torch.Tensor:
        model_trace, guide_trace = pair
        if self.subsample is None:
            self.subsample = subsample_trace(pair)
        sites = density_sites(guide_trace)
        for s in sites:
            mass = _is_point_mass(s)
            if _is_random_point(s) or (mass and not self.point_masses):
                continue
            if is_reparameterized(s) and s["value"].requires_grad:
                self.latents.append(s["value"])
                self.layouts.append((s, batch, K, self.rows))
                self.masses.append(mass)
        self.rows += K
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


def _is_point_mass(site: dict) -> bool:
    """A `dist.Delta` guide site that is a point estimate (not an autoguide's Delta
    carrying a random draw, marked `random_point`)."""
    return _is_delta(site) and not site["infer"].get("random_point")


def _is_random_point(site: dict) -> bool:
    """An autoguide's `Delta` at a transform of its auxiliary draw (`random_point`).

    Not a latent of its own: the auxiliary draw is, and the log weight's derivative
    with respect to it follows the transform, the Jacobian in the `Delta`'s density
    and the auxiliary density alike, which is the sample path of `q` as a whole.
    """
    return _is_delta(site) and bool(site["infer"].get("random_point"))


def _is_delta(site: dict) -> bool:
    fn = site["fn"]
    while hasattr(fn, "base_dist"):  # masked, independent, expanded wrappers
        fn = fn.base_dist
    return isinstance(fn, Delta)


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
    return path_surrogate(path_grads(target, paths), paths, target)


def path_grads(target: torch.Tensor, paths: SamplePaths) -> list[torch.Tensor | None]:
    """`d target.sum() / d z_s` for each reparameterized sample `z_s`, detached
    (`None` where `target` has no path to `z_s`; all `None` without a graph)."""
    latents = paths.latents
    if not (latents and target.requires_grad and torch.is_grad_enabled()):
        return [None] * len(latents)
    _check_no_latent_paths(latents)
    grads = torch.autograd.grad(target.sum(), latents, retain_graph=True, allow_unused=True)
    return [None if g is None else g.detach() for g in grads]


def path_surrogate(
    grads: list[torch.Tensor | None], paths: SamplePaths, like: torch.Tensor
) -> torch.Tensor:
    """`[B]`: `sum_s (g_s . z_s) / B` for every `B` entry, `g_s` fixed (`like` is `[K, B]`).

    Its gradient is `sum_s g_s dz_s/dphi`: the guide's parameters only, spread evenly
    over the data so that the objective's reduction scales it as any per-datum term.
    """
    B = like.shape[-1]
    terms = [(g * z).sum() for g, z in zip(grads, paths.latents, strict=True) if g is not None]
    if not terms:
        return like.new_zeros(B)
    return (sum(terms) / B).expand(B)


def per_particle(coef: torch.Tensor, grads: list, paths: SamplePaths) -> list:
    """Each `grads[s]` times `coef[k, b]` on the entries of particle `k` and datum `b`."""
    factors = particle_factors(coef, paths, [g is not None for g in grads])
    return [None if f is None else g * f for g, f in zip(grads, factors, strict=True)]


def particle_factors(coef: torch.Tensor, paths: SamplePaths, wanted: list[bool]) -> list:
    """`coef[k, b]` laid onto the entries of particle `k` and datum `b` of each latent
    (`None` where not `wanted`), shaped to broadcast against the latent.

    The latents come in every layout (particle and batch dims anywhere, one site
    per datum in a sequential plate, one trace per particle); `reduce_sites` is a
    plain sum from a site's log-prob shape to `[K, B]`, so its vector-Jacobian
    product with `coef` places `coef[k, b]` on exactly the entries of `(k, b)`.
    """
    factors = []
    for want, z, (site, batch, K, row) in zip(wanted, paths.latents, paths.layouts, strict=True):
        if not want:
            factors.append(None)
            continue
        with torch.enable_grad():
            u = torch.zeros_like(site["log_prob"], requires_grad=True)
            kb = reduce_sites([site], batch, K, lambda _, u=u: u)
            (c,) = torch.autograd.grad(kb, u, grad_outputs=coef[row : row + K].expand_as(kb))
        factors.append(c.reshape(c.shape + (1,) * (z.dim() - c.dim())))  # event dims
    return factors


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
    keep = options.pop("point_masses", False)
    paths = SamplePaths(prior=options.pop("prior_log_p", False), point_masses=keep)
    weights = BatchObjective.weigh(objective, model, guide, args, kwargs, extra=paths, **options)
    values = {f.name: getattr(weights, f.name) for f in fields(LogWeights)}
    return PathWeights(**values, paths=paths)


def rws_dreg_paths(
    weights: PathWeights, normalized: torch.Tensor, wake_phi: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`[B]` sample-path surrogates of RWS-DReG: wake-theta's cut, wake-phi's path.

    Wake-theta's `log (1/K) sum_k exp l` reaches the guide through the draws by
    `sum_k w~_k (d log p_k / dz_k) dz_k/dphi`; the cut is minus exactly that, so
    wake-theta keeps only the model's gradient. Wake-phi's DReG gradient
    `sum_k (w~_k - w~_k^2)(d log p_k / dz_k - d log q_k / dz_k) dz_k/dphi` (guide
    only) reuses the same vector-Jacobian product through the model, times
    `1 - w~_k` per particle (`log p[k, b]` depends on `z_b^k` only: the data and
    the particles are independent), plus the guide density's own, which stops at
    the draws. One pass through the model instead of two: RWS-DReG's extra cost.
    `wake_phi=False` skips the wake-phi path (`None`).
    """
    model_path = path_grads(normalized * weights.log_p, weights.paths)
    cut = path_surrogate([None if g is None else -g for g in model_path], weights.paths, normalized)
    if not wake_phi:
        return cut, None
    c = normalized - normalized * normalized
    density_path = path_grads(c * weights.log_q, weights.paths)
    # A point mass is cut and no more: standard RWS detaches its draw and its log q
    # does not depend on its parameter, so its wake-phi gradient is zero.
    masses = weights.paths.masses
    own = [None if mass else g for g, mass in zip(model_path, masses, strict=True)]
    scaled = per_particle(1 - normalized, own, weights.paths)
    phi = [
        None if mass else _minus(a, b)
        for a, b, mass in zip(scaled, density_path, masses, strict=True)
    ]  # (1 - w~) w~ dlog p/dz - c dlog q/dz
    return cut, path_surrogate(phi, weights.paths, normalized)


def _minus(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if b is None:
        return a
    return -b if a is None else a - b


def rws_dreg_fused(weights: PathWeights, normalized: torch.Tensor, insomnia: float) -> torch.Tensor:
    """`[B]` zero-valued surrogate for wake-theta that makes the gradient of the
    **sum** `wake_theta + phi` RWS-DReG's, with no pass through the model but the
    backward pass itself (`rws_dreg_paths` is the form whose two losses are right
    one by one; this one serves `loss_and_grads`, which backpropagates the sum).

    Wake-theta, its draws not cut, sends `w~_k d log p_k / dz_k` to each draw and
    the model's gradient to the model; `rescaled_paths` with the factor
    `insomnia (1 - w~_k)` makes that `insomnia (w~_k - w~_k^2)(d log p_k / dz_k -
    d log q_k / dz_k)`, wake-phi's DReG path times its mixing weight.
    """
    factor = insomnia * (1 - normalized)
    return rescaled_paths(weights, normalized, factor, cut=insomnia == 0)


def can_rescale_paths(weights: PathWeights) -> bool:
    """Whether `rescaled_paths` applies: every guide site reparameterized and inside
    the batch plate, and every draw a fresh tensor of this step (a hook on a leaf,
    a parameter used as the draw itself, would outlive the step)."""
    latents = weights.paths.latents
    local = weights.score_log_q is None and weights.global_log_w is None
    return local and all(z.grad_fn is not None for z in latents)


def rescaled_paths(
    weights: PathWeights, w: torch.Tensor, factor: torch.Tensor, cut: bool = False
) -> torch.Tensor:
    """`[B]` zero-valued surrogate, for an objective whose own backward pass sends each
    draw `w_k d log p_k / dz_k` (`w` detached, `[K, B]`): with it, the draws pass on
    `factor_k w_k (d log p_k / dz_k - d log q_k / dz_k)` instead.

    A hook on each draw scales what arrives by `factor[k, b]` on the entries of
    particle `k` and datum `b` (`log p[k, b]` depends on `z_b^k` only); the
    surrogate adds `-w_k d log q_k / dz_k` at the draws (a product through the
    guide's densities only, which stops at the draws), which the hook scales too.
    So the model's pass is shared: no second pass to the draws. Only valid where
    `can_rescale_paths` (a non-reparameterized site's density may also reach the
    draws; a global draw is shared by every datum); the hook is not recorded by a
    compiled (Jit) step. `cut=True`
    says `factor` is zero: the draws pass nothing on, and no density product is needed.
    A point mass among the latents (RWS-DReG keeps them, `SamplePaths.masses`) passes
    nothing on either.
    """
    paths = weights.paths
    if cut:
        density = [None] * len(paths.latents)
    else:
        density = path_grads(w * weights.log_q, paths)
    masses = paths.masses
    wanted = [z.requires_grad and not m for z, m in zip(paths.latents, masses, strict=True)]
    factors = particle_factors(factor, paths, wanted)
    for z, f, mass in zip(paths.latents, factors, masses, strict=True):
        if mass:  # kept only by RWS-DReG, to be cut: standard RWS detaches its draw
            z.register_hook(torch.zeros_like)
        elif f is not None:
            z.register_hook(lambda g, f=f: g * f)
    return path_surrogate([None if g is None else -g for g in density], paths, w)
