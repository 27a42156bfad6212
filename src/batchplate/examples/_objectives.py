"""The objectives the examples train with, by the names ``batchplate run`` accepts."""

from __future__ import annotations

from collections.abc import Sequence

import batchplate

#: ``rws`` is wake-wake (insomnia 1), ``ws`` wake-sleep (insomnia 0).
ALL = ("elbo", "iwae", "vimco", "rws", "ws")


def make_objective(
    name: str,
    num_particles: int,
    *,
    vectorize_particles: bool = True,
    max_plate_nesting: int = 1,
    allowed: Sequence[str] = ALL,
) -> batchplate.BatchObjective:
    """The batchplate objective called ``name`` with ``K = num_particles``.

    The examples' only vectorized plate is the batch plate, hence
    ``max_plate_nesting=1``; ``allowed`` is the example's own list, named in the error.
    """
    if name not in allowed:
        raise ValueError(f"unknown objective {name!r}; choose one of {tuple(allowed)}")
    kw = {
        "num_particles": num_particles,
        "vectorize_particles": vectorize_particles,
        "max_plate_nesting": max_plate_nesting,
    }
    if name == "elbo":
        return batchplate.Trace_ELBO(**kw)
    if name == "iwae":
        return batchplate.RenyiELBO(alpha=0.0, **kw)
    if name == "vimco":
        return batchplate.VIMCO(**kw)
    return batchplate.ReweightedWakeSleep(insomnia=1.0 if name == "rws" else 0.0, **kw)
