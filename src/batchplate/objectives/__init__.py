"""Objectives: thin reductions of the `[K, B]` per-datum log weights."""

from .base import BatchObjective
from .elbo import Trace_ELBO
from .enum import JitTraceEnum_ELBO, TraceEnum_ELBO
from .jit import (
    JitRenyiELBO,
    JitTrace_ELBO,
    JitTraceGraph_ELBO,
    JitTraceMeanField_ELBO,
    JitVIMCO,
)
from .meanfield import TraceMeanField_ELBO
from .renyi import RenyiELBO
from .rws import ReweightedWakeSleep
from .tail_adaptive import TraceTailAdaptive_ELBO
from .tracegraph import TraceGraph_ELBO
from .vimco import VIMCO

__all__ = [
    "BatchObjective",
    "JitRenyiELBO",
    "JitTraceEnum_ELBO",
    "JitTraceGraph_ELBO",
    "JitTraceMeanField_ELBO",
    "JitTrace_ELBO",
    "JitVIMCO",
    "RenyiELBO",
    "ReweightedWakeSleep",
    "TraceEnum_ELBO",
    "TraceGraph_ELBO",
    "TraceMeanField_ELBO",
    "TraceTailAdaptive_ELBO",
    "Trace_ELBO",
    "VIMCO",
]
