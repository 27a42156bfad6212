"""Autoguides as Pyro users build them (`AutoNormal(model)`), weighed per datum.

Autoguides rebuild the model's plates with plain `pyro.plate(name, ...)` from a
prototype trace of the model, in which the batch plate's frame is a
`BatchFrame`. `adopt_batch_frames` (applied by `batchplate.draw` to every
`AutoGuide`) gives the autoguide's sites in that plate the `BatchFrame` back,
so they are weighed per datum. A hand-written guide still uses `batch_plate`.

`AutoContinuous` guides draw every latent as one flat vector (an auxiliary
site outside every plate) and then place each site's coordinates with a
`Delta` site. Two cases when some of those latents are local (in the batch
plate):

- `AutoDiagonalNormal`: the coordinates are independent, so
  `log q(latent) = sum_j log N(latent_j)` splits exactly by datum: each
  coordinate belongs to one site and, along the batch plate's dim, to one
  datum. Each `Delta` site gets its own coordinates' `log N` added to its
  log density (with the Jacobian it already has), and the auxiliary site is
  masked out, so `l[k, b]` holds exactly datum `b`'s share. The prototype fixes
  which vector entries serve which minibatch position, so a subsampled batch
  plate has no per-datum parameters and raises (use `AutoNormal`).
- Any other `AutoContinuous` (`AutoMultivariateNormal`,
  `AutoLowRankMultivariateNormal`, flows): the covariance couples the data,
  and it raises (problem 3 of Pyro issue #2220).

Parts of an `AutoGuideList` are judged one by one: a joint part over global
latents only is fine.
"""

from __future__ import annotations

from typing import Any

import torch
from pyro.distributions import Delta
from pyro.distributions.transforms import biject_to
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide import AutoContinuous, AutoDiagonalNormal, AutoGuide, AutoGuideList
from pyro.poutine.messenger import Messenger

from .errors import BatchPlateError
from .plate import BatchFrame, batch_frame


class adopt_batch_frames(Messenger):
    """Mark an autoguide's plate over the data as the batch plate (see the module).

    :param guide: a `pyro.infer.autoguide.AutoGuide`.
    """

    def __init__(self, guide: AutoGuide) -> None:
        super().__init__()
        self.guide = guide
        self.shares: dict[str, torch.Tensor] = {}  # Delta site -> its coordinates' log q
        self.auxiliary: set[str] = set()  # the auxiliary sites drawn so far

    def _process_message(self, msg: Any) -> None:
        if msg["type"] != "sample":
            return
        mark_random_point(msg, self.auxiliary)
        batch = batch_frames(self.guide)
        if not batch:
            return
        msg["cond_indep_stack"] = tuple(
            BatchFrame(*f) if (f.name, f.dim) in batch and not isinstance(f, BatchFrame) else f
            for f in msg["cond_indep_stack"]
        )
        if msg["infer"].get("is_auxiliary") and batch_frame(msg) is None:
            part = continuous_part(self.guide, msg)
            if part is not None and local_sites(part):
                check_diagonal(part, msg["name"], batch)
                msg["mask"] = False  # its density moves to the Delta sites, datum by datum
                msg["infer"]["batchplate_diagonal"] = part
        elif msg["name"] in self.shares:
            fn, share = msg["fn"], self.shares.pop(msg["name"])
            msg["fn"] = Delta(fn.v, log_density=fn.log_density + share, event_dim=fn.event_dim)
            # A Delta at a random draw: a global one is a random global latent, not MAP.
            msg["infer"]["random_point"] = True

    def _postprocess_message(self, msg: Any) -> None:
        part = msg["infer"].get("batchplate_diagonal") if msg["type"] == "sample" else None
        if part is not None:
            self.shares = diagonal_shares(part, msg["fn"], msg["value"])


def mark_random_point(msg: dict, auxiliary: set[str]) -> None:
    """Mark `AutoNormal`'s `Delta` at the transform of its auxiliary draw
    `{name}_unconstrained` as `random_point`: a random latent, not a point estimate
    (MAP). The sample-path estimators (docs/estimators.md) then differentiate
    through the auxiliary draw, and never cut or reweight the `Delta` as a MAP site."""
    if msg["infer"].get("is_auxiliary"):
        auxiliary.add(msg["name"])
    elif isinstance(msg["fn"], Delta) and f"{msg['name']}_unconstrained" in auxiliary:
        msg["infer"]["random_point"] = True


def batch_frames(guide: AutoGuide) -> dict:
    """`{(name, dim): frame}` of the batch plate in the guide's prototype trace."""
    trace = getattr(guide, "prototype_trace", None)
    if trace is None:
        return {}
    return {
        (f.name, f.dim): f
        for _, site in trace.iter_stochastic_nodes()
        for f in site["cond_indep_stack"]
        if isinstance(f, BatchFrame)
    }


def parts(guide: AutoGuide) -> list[AutoGuide]:
    """The autoguides inside `guide` (an `AutoGuideList`'s parts, recursively)."""
    if isinstance(guide, AutoGuideList):
        return [p for part in guide for p in parts(part)]
    return [guide]


def local_sites(part: AutoGuide) -> list[str]:
    """The part's latents that lie in the batch plate (none before its first run)."""
    if part.prototype_trace is None:
        return []
    return [
        name
        for name, site in part.prototype_trace.iter_stochastic_nodes()
        if any(isinstance(f, BatchFrame) for f in site["cond_indep_stack"])
    ]


def flat_vector_parts(guide: object) -> list[str]:
    """The kinds of `guide`'s `AutoContinuous` parts that draw latents of the batch plate
    (as one flat vector outside it); none for a guide that is not an `AutoGuide`."""
    if not isinstance(guide, AutoGuide):
        return []
    return [
        type(p).__name__ for p in parts(guide) if isinstance(p, AutoContinuous) and local_sites(p)
    ]


def continuous_part(guide: AutoGuide, msg: dict) -> AutoContinuous | None:
    """The `AutoContinuous` part that drew this auxiliary flat vector (by its length)."""
    size = msg["fn"].event_shape[-1] if msg["fn"].event_shape else None
    found = [
        p
        for p in parts(guide)  # parts not run yet have no latent_dim
        if isinstance(p, AutoContinuous) and getattr(p, "latent_dim", None) == size
    ]
    if len({(type(p), bool(local_sites(p))) for p in found}) > 1:
        raise BatchPlateError(
            f"cannot tell which part of the AutoGuideList drew site '{msg['name']}': several "
            f"AutoContinuous parts have {size} coordinates. Give them different latents, or "
            "use AutoNormal for the local latents."
        )
    return found[0] if found else None


def check_diagonal(part: AutoContinuous, name: str, batch: dict) -> None:
    """Refuse a flat vector whose per-datum share is undefined."""
    if not isinstance(part, AutoDiagonalNormal):
        raise joint_autoguide_error(type(part).__name__, name, batch, local_sites(part))
    subsampled = [f.name for f in batch.values() if f.full_size not in (None, f.size)]
    if subsampled:
        raise BatchPlateError(
            f"AutoDiagonalNormal with a subsampled batch_plate('{subsampled[0]}'): its flat "
            "vector holds one entry per minibatch position, not per datum, so each step would "
            "give a datum another datum's parameters. Use AutoNormal (per-datum parameters "
            "indexed by the minibatch), or do not subsample."
        )


def diagonal_shares(part: AutoContinuous, fn: Any, value: torch.Tensor) -> dict:
    """`{site: log q share}`: the flat vector's coordinate log densities, split by site
    as `AutoContinuous` unpacks them, summed over each site's event dims."""
    while not isinstance(fn, torch.distributions.Normal):  # Independent, expanded
        fn = fn.base_dist
    log_q = fn.log_prob(value)
    batch_shape, pos, shares = value.shape[:-1], 0, {}
    for name, site in part.prototype_trace.iter_stochastic_nodes():
        shape = biject_to(site["fn"].support).inv(site["value"]).shape
        size = shape.numel()
        event_dim = site["fn"].event_dim + len(shape) - site["value"].dim()
        shape = torch.broadcast_shapes(shape, batch_shape + (1,) * event_dim)
        shares[name] = sum_rightmost(log_q[..., pos : pos + size].reshape(shape), event_dim)
        pos += size
    return shares


def joint_autoguide_error(kind: str, name: str, batch: dict, local: list[str]) -> BatchPlateError:
    plate_name = next(iter(batch))[0]
    return BatchPlateError(
        f"{kind} draws latents {local} of batch_plate('{plate_name}') jointly, as one "
        f"vector (site '{name}'). A joint guide over the data couples them: its covariance "
        "across data points (full or low-rank) is problem 3 of Pyro issue #2220, and no "
        "per-datum weight exists. Use AutoNormal or AutoDiagonalNormal (independent "
        "coordinates) or AutoDelta for the local latents, e.g. in an AutoGuideList with a "
        "joint guide on poutine.block(model, expose=[global sites]) for the global ones."
    )
