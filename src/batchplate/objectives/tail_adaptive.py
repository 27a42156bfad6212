"""Tail-adaptive f-divergence (Wang, Liu & Liu, 2018), per datum."""

from __future__ import annotations

import warnings

import torch

from ..errors import BatchPlateError
from ..weights import LogWeights
from .base import BatchObjective
from .pathwise import check_estimator


class TraceTailAdaptive_ELBO(BatchObjective):
    r"""Per-datum tail-adaptive f-divergence; a drop-in for `pyro.infer.TraceTailAdaptive_ELBO`.

    For each datum `b`, the `K` particles are ranked by their log weights and
    particle `k` gets the weight

    $$ \gamma[k, b] = \Big(\#\{j : l[j, b] \ge l[k, b]\}\Big)^{\beta}, \qquad -1 \le \beta < 0, $$

    the empirical tail probability of its importance weight to the power $\beta$
    (Wang, Liu & Liu 2018, Algorithm 1: the largest weight gets the largest
    $\gamma$). The guide's gradient is the reparameterized
    $\sum_k \gamma[k, b]\, \nabla l[k, b] / \sum_k \gamma[k, b]$, with $\gamma$ held
    constant. The ranks are taken **per datum**; stock Pyro ranks the particles
    by the log weight of the whole batch, and does not support subsampling.

    Stock Pyro's `loss` raises; here the value of `loss` and of
    `differentiable_loss` is the per-datum ELBO, $\frac1K \sum_k l[k, b]$, for
    monitoring (the tail-adaptive divergence itself is never estimated). Every
    guide site must be reparameterized (`BatchPlateError` otherwise). Both
    particle layouts work; with `num_particles=1` the estimator is the ELBO's
    (warned, as in Pyro).

    Reference: Wang, Liu & Liu (2018), *Variational inference with tail-adaptive
    f-divergence*, NeurIPS.

    :param num_particles: `K`.
    :param tail_adaptive_beta: the exponent $\beta$, in `[-1, 0)` (Pyro's default `-1`).
    """

    def __init__(
        self,
        num_particles: int = 2,
        tail_adaptive_beta: float = -1.0,
        estimator: str = "standard",
        **kwargs,
    ) -> None:
        self.estimator = check_estimator(estimator, _REFUSED, type(self).__name__)
        if not (isinstance(tail_adaptive_beta, int | float) and -1.0 <= tail_adaptive_beta < 0.0):
            raise ValueError(f"tail_adaptive_beta must be in [-1, 0), got {tail_adaptive_beta!r}")
        super().__init__(num_particles=num_particles, **kwargs)
        self.tail_adaptive_beta = float(tail_adaptive_beta)
        if num_particles == 1:
            warnings.warn(
                "For num_particles == 1 TraceTailAdaptive_ELBO is the Trace_ELBO estimator. "
                "Increase num_particles to get an adaptive f-divergence.",
                stacklevel=2,
            )

    def per_datum(self, weights: LogWeights) -> tuple[torch.Tensor, torch.Tensor]:
        if weights.score_log_q is not None:
            raise BatchPlateError(
                "TraceTailAdaptive_ELBO needs every guide site to be reparameterized: its "
                "gradient differentiates the log weights through the samples"
            )
        log_w = weights.log_w
        gamma = tail_weights(log_w.detach(), self.tail_adaptive_beta)
        return log_w.mean(0), (gamma * log_w).sum(0) / gamma.sum(0)


_REFUSED = dict.fromkeys(
    ("stl", "dreg"),
    "its gradient sum_k gamma_k grad l_k / sum_k gamma_k already follows each draw's "
    "path, weighted by ranks that depend on the draws: dropping the density term would "
    "be biased (as for IWAE), and no doubly reparameterized form of it is derived here",
)


def tail_weights(log_w: torch.Tensor, beta: float) -> torch.Tensor:
    """`[K, B]`: `(#{j : l[j, b] >= l[k, b]})^beta`, per datum."""
    at_least = (log_w.unsqueeze(0) >= log_w.unsqueeze(1)).sum(1)  # [k, j, b] summed over j
    return at_least.to(log_w.dtype).pow(beta)
