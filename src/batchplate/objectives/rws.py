"""Reweighted wake-sleep, per datum."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from pyro.util import warn_if_nan

from ..autoguides import flat_vector_parts
from ..errors import BatchPlateError
from ..plate import check_positive_int
from ..validation import NoSampleSitesError
from ..weights import LogWeights
from .base import BatchObjective, Losses
from .pathwise import (
    PathWeights,
    can_rescale_paths,
    check_estimator,
    nonreparam_log_q,
    rws_dreg_fused,
    rws_dreg_paths,
    weigh_paths,
)


class ReweightedWakeSleep(BatchObjective):
    r"""Reweighted wake-sleep with per-datum importance weights; a drop-in for
    `pyro.infer.ReweightedWakeSleep` that supports minibatches.

    With `l[k, b]` the per-datum log weights of `K` guide particles (guide
    samples detached) and `w~[k, b] = softmax_k l[k, b]` normalized **per
    datum**:

    - wake-theta loss (model parameters):
      `-(1/B) sum_b log (1/K) sum_k exp l[k, b]`, guide terms detached;
    - wake-phi loss (guide parameters):
      `-(1/B) sum_b sum_k w~[k, b] log q(z_b^k | x_b)`, weights detached;
    - sleep-phi loss (guide parameters): the model is run unconditioned,
      producing one fantasy `(z, x) ~ p` per datum slot of the batch plate
      and sleep particle; loss `-mean log q(z | x)`. The guide receives the
      fantasy observations through its `observations=` keyword (Pyro's
      convention), so amortized guides work;
    - phi loss: `insomnia * wake_phi + (1 - insomnia) * sleep_phi`.

    `loss` and `loss_and_grads` return `(wake_theta_loss, phi_loss)`,
    as Pyro's does, and work under `pyro.infer.SVI`. With
    `reduction="sum"` the batch means become `N/B` times batch sums.
    Stock Pyro sums every site over the batch before normalizing, so its
    wake-theta loss is B times the per-datum value and its wake-phi weights
    are normalized over the joint batch.

    No score-function estimator is needed for discrete latents, which makes
    RWS the method of choice for models with stochastic control flow.

    References: Bornschein & Bengio (2015), *Reweighted wake-sleep*, ICLR;
    Le, Kosiorek, Siddharth, Teh & Wood (2019), *Revisiting reweighted
    wake-sleep for models with stochastic control flow*, UAI.

    :param num_particles: `K >= 2` guide particles per datum.
    :param insomnia: mixing of wake-phi (1) and sleep-phi (0), in `[0, 1]`.
    :param model_has_params: when `False` and `insomnia == 0`, the wake
        phase is skipped (Pyro's shortcut; the wake-theta loss is then NaN).
    :param num_sleep_particles: fantasies per datum slot (default `K`).
    :param vectorize_particles: vectorize particles (default `True`, as Pyro).
    """

    def __init__(
        self,
        num_particles: int = 2,
        insomnia: float = 1.0,
        model_has_params: bool = True,
        num_sleep_particles: int | None = None,
        vectorize_particles: bool = True,
        estimator: str = "standard",
        defensive: float = 0.0,
        **kwargs,
    ) -> None:
        self.estimator = check_estimator(estimator, _REFUSED, type(self).__name__)
        self.defensive = check_defensive(defensive, self.estimator, insomnia)
        if isinstance(num_particles, bool) or not (
            isinstance(num_particles, int) and num_particles >= 2
        ):
            raise ValueError(
                "ReweightedWakeSleep needs num_particles >= 2 for self-normalized importance "
                f"weights, got {num_particles!r}"
            )
        if not 0.0 <= insomnia <= 1.0:
            raise ValueError(f"insomnia must be in [0, 1], got {insomnia!r}")
        super().__init__(
            num_particles=num_particles, vectorize_particles=vectorize_particles, **kwargs
        )
        self.insomnia = insomnia
        self.model_has_params = model_has_params
        self._sum_only = False  # set while only the sum of the two losses is differentiated
        self.num_sleep_particles = (
            num_particles
            if num_sleep_particles is None
            else check_positive_int("num_sleep_particles", num_sleep_particles)
        )

    def losses(
        self, model: Callable, guide: Callable, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(wake_theta_loss, phi_loss)` as tensors with their gradient graphs.

        The wake-theta loss is NaN when the wake phase is skipped
        (`model_has_params=False` and `insomnia=0`).
        """
        return self.local_losses(model, guide, *args, **kwargs).values

    def local_losses(self, model: Callable, guide: Callable, *args, **kwargs) -> Losses:
        """`wake_theta_loss` and `phi_loss` of this step, with the batch plate.

        The wake-theta loss only reaches model parameters and the phi loss only
        guide parameters, so one backward pass of their sum serves both. A
        program without sample sites has both losses 0 and no gradient, as every
        objective (stock Pyro's `ReweightedWakeSleep` fails on a float there).
        """
        try:
            return self._phases(model, guide, args, kwargs)
        except NoSampleSitesError:
            names = ("wake_theta_loss", "phi_loss")
            return Losses(names, (torch.zeros(()), torch.zeros(())), None)

    def _phases(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> Losses:
        wake_theta = wake_phi = sleep_phi = None
        if self.model_has_params or self.insomnia > 0:
            weights = _local_only(self._wake_weights(model, guide, args, kwargs), guide)
            wake_theta, wake_phi = self._wake(weights, (model, guide, args, kwargs))
            batch = weights.batch
        if self.insomnia < 1:
            S = self.num_sleep_particles
            weights = _local_only(
                self.weigh(model, guide, args, kwargs, num_particles=S, sleep=True), guide
            )
            sleep_phi = -self.reduce(weights.log_q.mean(0), weights.batch)
            warn_if_nan(sleep_phi, "sleep phi loss")
            if wake_theta is not None and weights.batch != batch:
                raise RuntimeError(
                    f"the batch plate changed within one step: {batch} in the wake phase, "
                    f"{weights.batch} in the sleep phase"
                )
            batch = weights.batch
        if sleep_phi is None:
            phi = wake_phi
        elif wake_phi is None:
            phi = sleep_phi
        else:
            phi = self.insomnia * wake_phi + (1.0 - self.insomnia) * sleep_phi
        names = ("wake_theta_loss", "phi_loss")
        if wake_theta is None:
            return Losses(names, (phi.new_tensor(math.nan), phi), batch, skipped=names[:1])
        return Losses(names, (wake_theta, phi), batch)

    def _wake_weights(self, model: Callable, guide: Callable, args, kwargs) -> LogWeights:
        """Guide particles for the wake phases: detached, except for DReG, which
        differentiates through them (and keeps wake-theta off the guide itself)."""
        if self.estimator == "dreg":  # (a point mass is cut, with no wake-phi path)
            return weigh_paths(self, model, guide, args, kwargs, point_masses=True)
        if self.defensive > 0:
            return weigh_paths(
                self, model, guide, args, kwargs, detach_guide=True, prior_log_p=True
            )
        return self.weigh(model, guide, args, kwargs, detach_guide=True)

    def _wake(self, weights: LogWeights, call: tuple) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Wake-theta and (with `insomnia > 0`) wake-phi losses of guide particles."""
        log_w = weights.log_p - weights.log_q.detach()
        K = weights.num_particles
        normalized = torch.softmax(log_w.detach(), dim=0)
        theta = torch.logsumexp(log_w, 0) - math.log(K)
        paths = None
        if self.estimator == "dreg" and self._sum_only and can_rescale_paths(weights):
            # Only the sum is differentiated: wake-theta's own path to the draws,
            # rescaled, is wake-phi's (see rws_dreg_fused); phi keeps no path.
            fused = rws_dreg_fused(weights, normalized, self.insomnia)
            theta = theta + (fused - fused.detach())  # the value stays wake-theta's
            paths = torch.zeros_like(theta)
        elif self.estimator == "dreg":  # the draws carry the guide's graph: cut it here
            cut, paths = rws_dreg_paths(weights, normalized, wake_phi=self.insomnia > 0)
            theta = theta + (cut - cut.detach())  # the value stays wake-theta's
        wake_theta = -self.reduce(theta, weights.batch)
        warn_if_nan(wake_theta, "wake theta loss")
        if self.insomnia == 0:
            return wake_theta, None
        if self.estimator == "dreg":
            phi = rws_dreg_objective(weights, normalized, paths)
        elif self.defensive > 0:
            phi = self._defensive_objective(weights, call)
        else:
            phi = (normalized * weights.log_q).sum(0)
        wake_phi = -self.reduce(phi, weights.batch)
        warn_if_nan(wake_phi, "wake phi loss")
        return wake_theta, wake_phi

    def _defensive_objective(self, weights: PathWeights, call: tuple) -> torch.Tensor:
        """`[B]`: `sum_k w~[k, b] log q(z_b^k | x_b)` with `z_b^k` from the mixture
        `(1 - eps) q + eps p(z)` and `w~` normalizing `p(x, z) / ((1 - eps) q + eps p)`.

        Particle `(k, b)` takes the guide's draw or the prior's, by a coin of bias
        `eps`: that is a draw from the mixture, since data are independent.
        """
        model, guide, args, kwargs = call
        subsample = weights.paths.subsample
        options = dict(prior=True, prior_log_p=True, subsample=subsample)
        prior = weigh_paths(self, model, guide, args, kwargs, **options)
        if prior.batch != weights.batch:
            raise RuntimeError(
                f"the batch plate changed within one step: {weights.batch} for the guide's "
                f"particles, {prior.batch} for the prior's"
            )
        eps = self.defensive
        pick = torch.rand(weights.log_p.shape, device=weights.log_p.device) < eps

        def mix(guide_value: torch.Tensor, prior_value: torch.Tensor) -> torch.Tensor:
            return torch.where(pick, prior_value, guide_value)

        log_q = mix(weights.log_q, prior.log_q)
        log_z = mix(weights.paths.prior_log_p(), prior.paths.prior_log_p())
        log_mixture = torch.logaddexp(math.log1p(-eps) + log_q, math.log(eps) + log_z)
        log_w = mix(weights.log_p, prior.log_p) - log_mixture
        return (torch.softmax(log_w.detach(), dim=0) * log_q).sum(0)

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs):
        """`wake_theta_loss + phi_loss` as one tensor, for plain PyTorch loops.

        Its gradient is the wake-theta gradient for model parameters and the phi
        gradient for guide parameters. Use `losses` for the two values (each with
        its own gradient: with `estimator="dreg"` that costs one more pass through
        the model, which the sum does not need).
        """
        with self._sum_only_differentiated():
            return self.local_losses(model, guide, *args, **kwargs).total()

    def loss_and_grads(self, model: Callable, guide: Callable, *args, **kwargs):
        """`(wake_theta_loss, phi_loss)` as floats; accumulates the wake-theta
        gradient into the model's parameters and the phi gradient into the guide's
        (one backward pass of their sum; atomic, see `BatchObjective.loss_and_grads`).
        """
        with self._sum_only_differentiated():
            return super().loss_and_grads(model, guide, *args, **kwargs)

    @contextlib.contextmanager
    def _sum_only_differentiated(self) -> Iterator[None]:
        """While only the sum of the losses is differentiated, RWS-DReG may let the
        two share the pass through the model (`pathwise.rws_dreg_fused`)."""
        self._sum_only = True
        try:
            yield
        finally:
            self._sum_only = False


_REFUSED = {
    "stl": (
        "the wake-phi gradient sum_k w~[k, b] grad log q(z_b^k) has no sample path to "
        "stick to (the draws are detached); estimator='dreg' is its reparameterized form"
    )
}


def _local_only(weights: LogWeights, guide: Callable) -> LogWeights:
    """`weights`, refused if the program has sample sites outside the batch plate.

    The phases detach the guide's draws, so a global point-mass (MAP) site would get
    no gradient from the model, and the wake-theta and sleep losses have no term
    for a site shared by all data: a global site would be silently ignored.
    """
    if weights.global_log_w is None:
        return weights
    flat = flat_vector_parts(guide)
    if flat:
        raise BatchPlateError(
            f"ReweightedWakeSleep cannot use {flat[0]} for latents in the batch plate: it "
            "draws them as one flat vector, a sample site outside the batch plate, and "
            "computes each datum's log q from that draw before wake-phi can detach it, so "
            "wake-phi would differentiate through the draw. Use AutoNormal (a site per "
            "latent in the batch plate) or a hand-written guide."
        )
    raise BatchPlateError(
        "ReweightedWakeSleep found sample sites outside the batch plate. Its phases "
        "detach the guide's draws, so a global point-mass (MAP) site would never learn "
        "and a global term would be left out of its losses. Make a global point "
        "estimate a pyro.param in the model, or use batchplate.RenyiELBO / Trace_ELBO."
    )


def check_defensive(defensive: float, estimator: str, insomnia: float) -> float:
    """`defensive` if it can act: in `[0, 1)`, with a wake-phi phase, without DReG."""
    if not (isinstance(defensive, int | float) and 0.0 <= defensive < 1.0):
        raise ValueError(f"defensive must be in [0, 1), got {defensive!r}")
    if defensive > 0 and estimator == "dreg":
        raise ValueError(
            "defensive > 0 cannot be combined with estimator='dreg': prior draws do not "
            "depend on the guide's parameters, so the DReG identity does not hold for them"
        )
    if defensive > 0 and insomnia == 0:
        raise ValueError(
            "defensive > 0 changes the wake-phi proposals, but insomnia=0 has no wake-phi phase"
        )
    return float(defensive)


def rws_dreg_objective(
    weights: PathWeights, normalized: torch.Tensor, paths: torch.Tensor
) -> torch.Tensor:
    """`[B]`: the RWS-DReG wake-phi objective (Tucker et al., 2019, eq. 8).

    Reparameterizing `sum_k w~_k d_phi log q(z_k)` (density parameters of the
    reparameterized sites) gives `sum_k (w~_k - w~_k^2) dl_k/dz_k dz_k/dphi`, the
    sample-path surrogate `paths` (`rws_dreg_paths`); the non-reparameterized
    sites keep `sum_k w~_k grad log q`. Its value is the standard wake-phi
    objective's, `sum_k w~_k log q(z_k)`, so the reported losses do not depend
    on the estimator.
    """
    surrogate = (normalized * nonreparam_log_q(weights)).sum(0) + paths
    value = (normalized * weights.log_q).sum(0).detach()
    return value + (surrogate - surrogate.detach())
