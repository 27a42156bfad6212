"""The per-datum ELBO."""

from __future__ import annotations

import torch

from ..weights import LogWeights
from .base import BatchObjective


class Trace_ELBO(BatchObjective):
    r"""Per-datum evidence lower bound, a drop-in for :class:`pyro.infer.Trace_ELBO`.

    For each datum ``b`` of the batch plate,

    .. math:: L_b = \frac{1}{K} \sum_k l[k, b],
        \qquad l[k, b] = \log p(x_b, z_b^k) - \log q(z_b^k \mid x_b),

    and the loss is ``-mean_b L_b`` (``reduction="mean"``), whose gradient is
    the average of per-datum gradients: the scale plain SGD expects, where
    Pyro's plate gives the sum (B times larger). With ``reduction="sum"`` the
    loss is ``-(N/B) sum_b L_b``, Pyro's value.

    Gradients: reparameterized sites by autodiff; non-reparameterized guide
    sites by per-datum REINFORCE, ``(1/K) sum_k (cost - baseline) grad log q(z_b^k)``.
    With vectorized particles the cost of a site is Rao-Blackwellized within
    its datum over inner plates (Pyro's Trace_ELBO rule) and the baseline is
    the mean cost of the other particles; with one trace per particle the cost
    is the datum's log weight and the baseline the other particles' mean.
    Either way the estimator is unbiased and datum ``b`` only uses datum ``b``.

    References: Wingate & Weber (2013), *Automated variational inference in
    probabilistic programming*; Ranganath, Gerrish & Blei (2014), *Black box
    variational inference*.
    """

    _needs_elbo_score = True

    def per_datum(self, weights: LogWeights) -> tuple[torch.Tensor, torch.Tensor]:
        value = weights.log_w.mean(0)
        if weights.score_log_q is None:
            return value, value
        # The pathwise derivative of -log q at a fixed discrete draw has mean zero;
        # leaving it out (as Pyro does) only removes variance.
        pathwise = weights.log_p - (weights.log_q - weights.score_log_q)
        return value, (pathwise + weights.elbo_score).mean(0)
