"""Per-datum log marginal likelihood estimates with bounded memory."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from pyro import poutine
from pyro.poutine import Trace

from .autobatch import autobatch_log_weights
from .draw import Enumeration, draw_particles, plate_nesting, subsample_trace
from .plate import check_positive_int
from .validation import global_latent_error
from .weights import compute_log_weights


def replay_latents(guide: Callable, values: Mapping[str, torch.Tensor]) -> Callable:
    """The guide with its latent sites fixed to `values`, still as draws of the guide.

    The documented way to weigh a (model, guide) pair at given latent values:
    `log_weights(model, replay_latents(guide, values), x)` scores
    `log p(x, z) - log q(z | x)` at `z = values`. Conditioning the guide
    (`poutine.condition`) would make its sites observations, which the strict
    model/guide matching rejects: an observed guide site is almost always a bug.

    :param guide: the guide program.
    :param values: site name -> value, for any subset of the guide's latent sites.
    """
    trace = Trace()
    for name, value in values.items():
        trace.add_node(name, type="sample", name=name, is_observed=False, value=value, infer={})
    return poutine.replay(guide, trace=trace)


@torch.no_grad()
def log_evidence(
    model: Callable,
    guide: Callable,
    *args,
    num_particles: int = 1000,
    chunk_size: int = 100,
    vectorize_particles: bool = True,
    max_plate_nesting: float = math.inf,
    autobatch: bool = False,
    **kwargs,
) -> torch.Tensor:
    """Importance-sampling estimates of `log p(x_b)` for each datum, shape `[B]`.

    `log (1/K) sum_k exp l[k, b]` with `K = num_particles` draws from the
    guide: the IWAE bound at large `K`, the usual test log-likelihood
    estimate (Burda et al., 2016 use `K = 5000`). Particles are drawn
    `chunk_size` at a time and combined with a streaming logsumexp, so
    memory stays that of `chunk_size` particles whatever `K` is.

    Programs whose control flow depends on sampled values need
    `vectorize_particles=False` (then particles are traced one at a time).
    With a subsampled batch plate the estimates are for the subsampled data.
    With `autobatch=True` a sequential batch-plate program's lanes run batched
    (see `batchplate.autobatch`), `chunk_size` particles of every datum at once.
    """
    check_positive_int("num_particles", num_particles)
    check_positive_int("chunk_size", chunk_size)
    chunk_size = min(chunk_size, num_particles)
    if autobatch:
        return _autobatched_evidence(model, guide, args, kwargs, num_particles, chunk_size)
    if vectorize_particles and chunk_size > 1:
        max_plate_nesting = plate_nesting(max_plate_nesting, model, guide, args, kwargs)
    total = None
    done = 0
    subsample = None  # every chunk weighs the first chunk's minibatch
    enumeration = Enumeration()  # the first chunk shows whether the program enumerates
    while done < num_particles:
        k = min(chunk_size, num_particles - done)
        particles = draw_particles(
            model,
            guide,
            args,
            kwargs,
            num_particles=k,
            vectorize_particles=vectorize_particles,
            max_plate_nesting=max_plate_nesting,
            subsample=subsample,
            enumeration=enumeration,
        )
        if done == 0:
            particles.pairs = list(particles.pairs)  # at most chunk_size pairs
            subsample = subsample_trace(particles.pairs[0])
        weights = compute_log_weights(particles)
        if weights.global_latents:  # estimates conditional on point-mass globals only
            raise global_latent_error(list(weights.global_latents), "log_evidence")
        chunk = torch.logsumexp(weights.log_w, dim=0)
        total = chunk if total is None else torch.logaddexp(total, chunk)
        done += k
    return total - math.log(num_particles)


def _autobatched_evidence(
    model: Callable, guide: Callable, args: tuple, kwargs: dict, K: int, chunk_size: int
) -> torch.Tensor:
    """`log_evidence` with lanes: chunks of `chunk_size` particles, one minibatch."""
    total, done, subsample = None, 0, {}
    while done < K:
        k = min(chunk_size, K - done)
        log_p, log_q, _, _ = autobatch_log_weights(
            model, guide, args, kwargs, num_particles=k, subsample=subsample
        )
        chunk = torch.logsumexp(log_p - log_q, dim=0)
        total = chunk if total is None else torch.logaddexp(total, chunk)
        done += k
    return total - math.log(K)
