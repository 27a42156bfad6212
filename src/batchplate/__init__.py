"""batchplate: correct minibatch training of probabilistic programs in Pyro.

Mark the plate over your minibatch with `batch_plate` and swap Pyro's
objective for batchplate's: importance-weighted objectives then take the
logsumexp over particles per datum, ELBO gradients have the per-datum scale,
and guides that couple data points are caught.
"""

from .autobatch import AutobatchWarning
from .errors import BatchPlateError
from .evaluate import log_evidence, replay_latents
from .independence import IndependenceReport, check_batch_independence
from .objectives import (
    VIMCO,
    BatchObjective,
    JitRenyiELBO,
    JitTrace_ELBO,
    JitTraceEnum_ELBO,
    JitTraceGraph_ELBO,
    JitTraceMeanField_ELBO,
    JitVIMCO,
    RenyiELBO,
    ReweightedWakeSleep,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
    TraceTailAdaptive_ELBO,
)
from .padded import Lanes, LaneStack, PaddedLoopError
from .plate import BatchFrame, batch_plate
from .weights import LogWeights, log_weights

__version__ = "0.1.0"

__all__ = [
    "AutobatchWarning",
    "BatchFrame",
    "BatchObjective",
    "BatchPlateError",
    "IndependenceReport",
    "JitRenyiELBO",
    "JitTraceEnum_ELBO",
    "JitTraceGraph_ELBO",
    "JitTraceMeanField_ELBO",
    "JitTrace_ELBO",
    "JitVIMCO",
    "LaneStack",
    "Lanes",
    "LogWeights",
    "PaddedLoopError",
    "RenyiELBO",
    "ReweightedWakeSleep",
    "TraceEnum_ELBO",
    "TraceGraph_ELBO",
    "TraceMeanField_ELBO",
    "TraceTailAdaptive_ELBO",
    "Trace_ELBO",
    "VIMCO",
    "batch_plate",
    "check_batch_independence",
    "log_evidence",
    "log_weights",
    "replay_latents",
]
