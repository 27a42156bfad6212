"""Objectives: thin reductions of the `[K, B]` per-datum log weights."""

from .base import BatchObjective
from .elbo import Trace_ELBO
from .enum import TraceEnum_ELBO
from .renyi import RenyiELBO
from .rws import ReweightedWakeSleep
from .tail_adaptive import TraceTailAdaptive_ELBO
from .vimco import VIMCO

__all__ = [
    "BatchObjective",
    "RenyiELBO",
    "ReweightedWakeSleep",
    "TraceEnum_ELBO",
    "TraceTailAdaptive_ELBO",
    "Trace_ELBO",
    "VIMCO",
]
