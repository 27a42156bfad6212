"""Automatic batching: run a sequential batch-plate program over all `K x B` lanes at once.

A program written with a sequential batch plate (`for i in batch_plate(...)`),
exactly as for one datum at a time, runs once per lane (particle `k`, datum
`b`), on reused worker greenlets, the plate's loop yielding only that lane's
datum (`_lanes`, `_phase`). Every
`pyro.sample` and every call of a module registered with `pyro.module`
suspends its lane; when all live lanes are suspended, their requests are
grouped by what can be computed together and each group runs as one tensor
operation (`_rounds`, `_stack`). The result is the `[K, B]` `LogWeights` of the Contract page, the
same numbers as the sequential program's on the same draws. See the
Automatic batching page (docs/autobatch.md).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..errors import BatchPlateError
from ..plate import BatchInfo
from ..validation import non_finite_error
from ._lanes import installed, once
from ._phase import Phase, PhaseSpec
from ._shared import Shared
from ._stack import PARAMS, AutobatchWarning

__all__ = ["PARAMS", "AutobatchWarning", "autobatch_log_weights", "once"]

#: `(log_p, log_q, score_log_q or None, batch)`, the fields of `batchplate.LogWeights`.
Weights = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, BatchInfo]


def autobatch_log_weights(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    *,
    num_particles: int,
    vectorize_particles: bool = True,
    sleep: bool = False,
    detach_guide: bool = False,
    subsample: dict[str, Any] | None = None,
    draws: list[dict] | None = None,
) -> Weights:
    """The `[K, B]` log weights of a sequential batch-plate program, its lanes run batched.

    :param model: the model, with a sequential batch plate.
    :param guide: the guide, with the same batch plate.
    :param args: their positional arguments.
    :param kwargs: their keyword arguments.
    :param num_particles: `K`.
    :param vectorize_particles: run all `K * B` lanes together (`True`) or
        the `B` lanes of one particle at a time (`False`, less memory).
    :param sleep: reweighted wake-sleep's sleep phase: the model fantasizes
        `(z, x)` in every lane, the guide is scored on them and receives each
        particle's fantasy observations through `observations=`.
    :param detach_guide: detach the guide's draws (RWS's wake phase).
    :param subsample: minibatch indices by plate name; filled by the first
        draw that subsamples, so later draws weigh the same minibatch.
    :param draws: if given, filled with one dict per particle, site name to
        value, of the draws the weights are computed at (the guide's, or the
        model's fantasies with `sleep=True`), to check against the
        sequential program on the same draws.
    """
    shared = Shared(subsample)
    sizes = [num_particles] if vectorize_particles else [1] * num_particles
    rows, B = [], None
    with installed(shared), _collector_paused():
        for K in sizes:
            rows.append(_draw(model, guide, args, kwargs, K, B, shared, sleep, detach_guide))
            B = rows[-1][0][0].B
        weights = _weights(rows, shared, sleep, draws)
        rows.clear()  # freed before the collector resumes, which would walk them all
    return weights


def _weights(rows: list, shared: Shared, sleep: bool, draws: list[dict] | None) -> Weights:
    """The phases' `[K, B]` log weights, checked finite; `draws` filled if given."""
    batch = rows[0][0][0].batch
    log_p, log_q, score = (_cat([row[1][i] for row in rows]) for i in range(3))
    if batch.full_size != batch.size:  # the batch plate's N/B is not part of l (Contract page)
        log_p, log_q = log_p / batch.subsample_scale, log_q / batch.subsample_scale
    _check_finite(log_p, log_q, rows, batch, shared)
    if draws is not None:
        for (model_phase, guide_phase), _ in rows:
            phase = model_phase if sleep else guide_phase
            draws.extend(_per_particle(phase, phase.values))
    return log_p, log_q, score, batch


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while the lanes run.

    The lanes allocate a few containers per site (messages, distributions,
    views) that stay alive until the phase ends, so the collector's
    generation thresholds trip again and again and its full collections walk
    every live object of the process: at `B = 64, K = 16` that doubled the
    step time, and it grew faster than the number of lanes. The phases leave
    no reference cycles behind (lanes are dropped when their phase ends), so
    reference counting frees everything; the collector resumes afterwards,
    once the phases are freed (its first collection would walk them all:
    a tenth of the step).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _draw(model, guide, args, kwargs, K, B, shared, sleep, detach_guide) -> tuple:
    """One batch of particles: `(phase, (log_p, log_q, score_log_q))`."""
    if sleep:
        first = Phase(
            PhaseSpec("model", model, args, kwargs, uncondition=True, detach=True), K, B, shared
        )
        first.run()
        observations = _per_particle(first, first.observed)
        spec = PhaseSpec(
            "guide",
            guide,
            args,
            kwargs,
            replay=first.values,
            kwargs_of=lambda k: dict(kwargs, observations=observations[k]),
        )
        guide_phase = Phase(spec, K, first.B, shared).run()
        model_phase = first
    else:
        guide_phase = Phase(
            PhaseSpec("guide", guide, args, kwargs, detach=detach_guide), K, B, shared
        ).run()
        spec = PhaseSpec("model", model, args, kwargs, replay=guide_phase.values)
        model_phase = Phase(spec, K, guide_phase.B, shared).run()
    if model_phase.batch != guide_phase.batch:
        raise BatchPlateError(
            f"model and guide disagree on the batch plate: {model_phase.batch} in the model, "
            f"{guide_phase.batch} in the guide."
        )
    log_p = model_phase.per_lane(model_phase.terms)
    log_q = guide_phase.per_lane(guide_phase.terms)
    if log_p is None:
        log_p = torch.zeros_like(log_q)
    if log_q is None:
        log_q = torch.zeros_like(log_p)
    score = guide_phase.per_lane(guide_phase.score_terms)
    return (model_phase, guide_phase), (log_p, log_q, score)


def _per_particle(phase: Phase, values: dict[int, dict]) -> list[dict]:
    """Lane values merged per particle: what one sequential trace of particle `k` holds."""
    merged: list[dict] = [{} for _ in range(phase.K)]
    for index, lane_values in values.items():
        merged[index // phase.B].update(lane_values)
    return merged


def _cat(parts: list) -> torch.Tensor | None:
    if all(p is None for p in parts):
        return None
    like = next(p for p in parts if p is not None)
    return torch.cat([torch.zeros(1, like.shape[1]).to(like) if p is None else p for p in parts])


def _check_finite(log_p, log_q, rows, batch, shared) -> None:
    log_w = (log_p - log_q).detach()
    if bool(torch.isfinite(log_w).all()):
        return
    k, b = (int(i) for i in (~torch.isfinite(log_w)).nonzero()[0])
    row, kk = (0, k) if len(rows) == 1 else (k, 0)
    culprits = [c for phase in rows[row][0] for c in phase.culprits(kk, b)]
    raise non_finite_error(log_w, culprits, batch, shared.subsample.get(batch.name))
