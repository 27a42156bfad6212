"""Autobatch checks itself once against the sequential program.

Under `autobatch=True` each lane runs the program from its start for one
datum. State carried from one datum's iteration of the batch plate's loop to
the next (a running value, a list appended to, a cache filled by earlier
data), or an object the lanes share and mutate, is then not what the
sequential program sees, and autobatch cannot see Python state. So an
objective's first autobatched draw of a (model, guide) pair is compared, for
its first particle, with the sequential program replayed at the same draws
and the same minibatch: a difference is a `BatchPlateError` naming the data
(Automatic batching page, "Writing programs for it"). A program whose replay
differs from itself (randomness outside sample sites, such as dropout) cannot
be compared this way and is not.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .draw import draw_particles
from .errors import BatchPlateError
from .evaluate import replay_latents
from .plate import BatchInfo
from .weights import compute_log_weights


def check_against_sequential(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    log_w: torch.Tensor,
    values: dict,
    minibatch: dict,
    batch: BatchInfo,
) -> None:
    """Raise if autobatch's first particle `log_w[0]` is not the sequential program's.

    :param values: the first particle's draws, site name to value.
    :param minibatch: the indices the autobatched draw's plates used, by plate name.
    """
    given = dict(values)
    given.update({name: idx for name, idx in minibatch.items() if isinstance(name, str)})
    with torch.no_grad():
        first, second = (_sequential_row(model, guide, args, kwargs, given) for _ in range(2))
    if not torch.equal(first, second):
        return  # randomness outside sample sites: no reference to compare with
    mine = log_w[0].detach()
    close = torch.isclose(mine, first, rtol=1e-4, atol=1e-4)
    if bool(close.all()):
        return
    data = (~close).nonzero().flatten().tolist()
    raise BatchPlateError(
        f"autobatch and the sequential program disagree on the log weights of data {data[:10]} "
        f"of {batch} (first particle, same draws: {mine[data[0]].item():.4g} against "
        f"{first[data[0]].item():.4g}). Each lane runs the program from its start for one "
        "datum, so state carried from one datum's iteration of the batch plate's loop to the "
        "next (a running value, a list appended to, a cache filled by earlier data), or an "
        "object the lanes share and change, is not what the sequential program sees. Make "
        "each datum's iteration depend on its own datum only (data coupled this way also "
        "break the per-datum contract: batchplate.check_batch_independence finds it in the "
        "sequential program), or use autobatch=False."
    )


def _sequential_row(model, guide, args, kwargs, given: dict) -> torch.Tensor:
    particles = draw_particles(
        model,
        replay_latents(guide, given),
        args,
        kwargs,
        num_particles=1,
        vectorize_particles=False,
        max_plate_nesting=math.inf,
    )
    weights = compute_log_weights(particles)
    return (weights.log_p - weights.log_q)[0]
