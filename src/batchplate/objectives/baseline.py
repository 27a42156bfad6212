"""Baselines for score-function terms, per datum, with Pyro's baseline spec.

A guide site marks its baseline with
`infer={"baseline": {"use_decaying_avg_baseline", "baseline_beta", "nn_baseline",
"nn_baseline_input", "baseline_value"}}`, the keys of Pyro's `TraceGraph_ELBO`.
`batchplate.TraceGraph_ELBO` uses them; the other objectives do not, and warn
(`unused_baseline_check`) instead of dropping them without a word.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro.ops.provenance import detach_provenance
from pyro.poutine.messenger import Messenger

from ..plate import BatchInfo
from ..weights import particle_dim

#: Prefix of the param-store entry holding a site's decaying average (Pyro's name).
AVERAGE_PREFIX = "__baseline_avg_downstream_cost_"

_KEYS = frozenset(
    {"nn_baseline", "nn_baseline_input", "use_decaying_avg_baseline", "baseline_beta"}
    | {"baseline_value"}
)


@dataclass(frozen=True)
class BaselineSpec:
    """A guide site's `infer["baseline"]`, parsed."""

    nn: Callable | None = None
    nn_input: Any = None
    decaying: bool = False
    beta: float = 0.90
    value: torch.Tensor | None = None

    @classmethod
    def of(cls, site: dict) -> BaselineSpec:
        options = site["infer"].get("baseline", {})
        unknown = set(options) - _KEYS
        if unknown:
            raise ValueError(
                f"guide site '{site['name']}': unrecognized baseline options {sorted(unknown)}; "
                f"the baseline spec knows {sorted(_KEYS)}"
            )
        spec = cls(
            nn=options.get("nn_baseline"),
            nn_input=options.get("nn_baseline_input"),
            decaying=bool(options.get("use_decaying_avg_baseline", False)),
            beta=float(options.get("baseline_beta", 0.90)),
            value=options.get("baseline_value"),
        )
        if spec.nn is not None and spec.value is not None:
            raise ValueError(
                f"guide site '{site['name']}': use nn_baseline or baseline_value, not both"
            )
        return spec


def baseline(
    site: dict, cost: torch.Tensor, batch: BatchInfo, indices: torch.Tensor | None
) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """`(baseline, baseline_loss)` of a non-reparameterized guide site's downstream cost.

    `cost` (detached) has the site's plate dims, the batch plate's among them,
    so every datum gets its own baseline value. A learned baseline
    (`nn_baseline` or `baseline_value`) must have the cost's shape; its loss is
    the squared error `(cost - baseline)^2` per element, which trains it
    towards each datum's expected cost. `indices` are the dataset indices of
    the minibatch, when the batch plate subsamples.
    """
    spec = BaselineSpec.of(site)
    value: torch.Tensor | float = 0.0
    if spec.decaying:
        value = decaying_average(site, cost, batch, indices, spec.beta)
    if spec.nn is not None:
        learned = spec.nn(detach_provenance(spec.nn_input).detach())
    elif spec.value is not None:
        learned = detach_provenance(spec.value)
    else:
        return value, 0.0
    if learned.shape != cost.shape:
        raise ValueError(
            f"Expected the baseline of guide site '{site['name']}' to have the shape of its "
            f"downstream cost, {tuple(cost.shape)} (the site's plates, batch plate included: "
            f"one value per datum), got {tuple(learned.shape)}"
        )
    # Without a decaying average, the learned baseline alone (no `0.0 + learned` op).
    value = value + learned if spec.decaying else learned
    return value, (cost - value) ** 2


def decaying_average(
    site: dict, cost: torch.Tensor, batch: BatchInfo, indices: torch.Tensor | None, beta: float
) -> torch.Tensor:
    """The site's running average of its cost before this step; updates the average.

    The average is over steps and particles, and kept separately for each
    datum: by dataset index when the batch plate subsamples (each datum's
    average moves only when the datum is in the minibatch), otherwise by
    position in the batch plate, as in Pyro. A sequential plate's sites are
    already one per datum. It lives in the param store under Pyro's name but
    is no parameter: it gets no gradient and no optimizer state.
    """
    if torch._C._get_tracing_state():
        raise NotImplementedError(
            f"guide site '{site['name']}' uses a decaying-average baseline, whose running "
            "average a compiled (Jit) objective would freeze at its first value. Use "
            "batchplate.TraceGraph_ELBO, or an nn_baseline."
        )
    mean = cost.detach()
    dim = particle_dim(site)
    if dim is not None and -dim <= mean.dim():
        mean = mean.mean(dim, keepdim=True)  # one average over the particles of a step
    name = AVERAGE_PREFIX + site["name"]
    store = pyro.get_param_store()
    by_index = batch.vectorized and indices is not None and batch.full_size != batch.size
    if by_index:
        mean = _with_batch_dim(mean, batch)
        shape = list(mean.shape)
        shape[batch.dim] = batch.full_size
    else:
        shape = list(mean.shape)
    with torch.no_grad():
        stored = store[name].detach() if name in store else mean.new_zeros(shape)
        if list(stored.shape) != shape:
            raise ValueError(
                f"the decaying-average baseline of guide site '{site['name']}' was kept with "
                f"shape {tuple(stored.shape)}, but its cost now has shape {tuple(shape)}. "
                "When minibatches change size, give the batch plate the minibatch's dataset "
                "indices (batch_plate(name, N, subsample=indices)) so the average is kept per "
                "datum, or drop the last, smaller batch."
            )
        old = stored.index_select(batch.dim, indices) if by_index else stored
        new = (1 - beta) * mean + beta * old
        updated = stored.index_copy(batch.dim, indices, new) if by_index else new
    store[name] = updated
    return old


def _with_batch_dim(x: torch.Tensor, batch: BatchInfo) -> torch.Tensor:
    """`x` with at least `-batch.dim` dims and the minibatch's size on the batch dim."""
    if x.dim() < -batch.dim:
        x = x.reshape((1,) * (-batch.dim - x.dim()) + tuple(x.shape))
    shape = list(x.shape)
    shape[batch.dim] = batch.size
    return x.expand(shape)


# -- objectives that do not use baselines ------------------------------------------


class _UnusedBaselineCheck(Messenger):
    def __init__(self, objective: str) -> None:
        super().__init__()
        self.objective = objective
        self.sites: list[str] = []

    def _pyro_sample(self, msg: dict) -> None:
        if msg["infer"].get("baseline"):
            self.sites.append(msg["name"])


class unused_baseline_check:
    """Warn when a guide declares baselines that the running objective ignores.

    Run once per (objective, guide): the spec is part of the program, and the
    check then costs nothing in later steps.
    """

    def __init__(self, objective: str) -> None:
        self.messenger = _UnusedBaselineCheck(objective)

    def __enter__(self) -> unused_baseline_check:
        self.messenger.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.messenger.__exit__(*exc)
        sites = sorted(set(self.messenger.sites))
        if sites and exc[0] is None:
            warnings.warn(
                f"guide sites {sites} declare infer={{'baseline': ...}}, which "
                f"{self.messenger.objective} does not use: their baselines (and any baseline "
                "network) get no gradient. Use batchplate.TraceGraph_ELBO to use them.",
                UserWarning,
                stacklevel=3,
            )
