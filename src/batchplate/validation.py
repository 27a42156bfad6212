"""The structural rules of design.md, as clear errors.

Each function here builds (or raises) a :class:`BatchPlateError` whose message
names the site, the plate and, where it applies, the datum, and says how to
fix the program. ``weights.py`` calls them while it walks the traces, so the
rules cost nothing beyond that walk.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .errors import BatchPlateError
from .plate import BatchFrame

if TYPE_CHECKING:
    from pyro.poutine import Trace

    from .weights import BatchInfo

GLOBAL_LATENT_HINT = (
    "Per-datum objectives need every sample site of model and guide inside the one "
    "batch plate, so that the data of a minibatch are independent. A site outside it "
    "(a global latent or a global observation) is shared by all data. For models with "
    "global latents, use pyro.plate and Pyro's own objectives (pyro.infer.Trace_ELBO, "
    "pyro.infer.RenyiELBO), which treat the plate as part of the model."
)


def _plate_str(frame: BatchFrame) -> str:
    kind = f"vectorized, dim={frame.dim}" if frame.vectorized else "sequential"
    size = f"size={frame.full_size}" if frame.full_size is not None else f"size={frame.size}"
    if frame.full_size is not None and frame.full_size != frame.size:
        size += f", subsample_size={frame.size}"
    return f"batch_plate('{frame.name}', {size}; {kind})"


def _find_batch_frame(trace: Trace) -> BatchFrame | None:
    for site in trace.nodes.values():
        if site["type"] == "sample":
            for frame in site["cond_indep_stack"]:
                if isinstance(frame, BatchFrame):
                    return frame
    return None


def missing_batch_plate_error(site: dict, role: str, model_trace: Trace) -> BatchPlateError:
    """Rules 1 and 2: a sample site outside the batch plate."""
    name = site["name"]
    model_site = model_trace.nodes.get(name) if role == "guide" else None
    if model_site is not None and model_site["type"] == "sample":
        model_frame = next(
            (f for f in model_site["cond_indep_stack"] if isinstance(f, BatchFrame)), None
        )
        if model_frame is not None:
            return BatchPlateError(
                f"guide site '{name}' is outside the batch plate, but the model's site '{name}' "
                f"is inside {_plate_str(model_frame)}. A guide site outside the batch plate "
                "draws one value for the whole minibatch and so couples the data points. "
                f"Sample '{name}' inside batch_plate('{model_frame.name}', ...) in the guide too, "
                "one value per datum."
            )
    frame = _find_batch_frame(model_trace)
    if frame is None:
        return BatchPlateError(
            f"{role} site '{name}' is not inside a batch plate, and the model has none. "
            "Mark the plate over your minibatch with batchplate.batch_plate(name, size, ...) "
            "in both model and guide. " + GLOBAL_LATENT_HINT
        )
    return BatchPlateError(
        f"{role} site '{name}' is outside {_plate_str(frame)}. " + GLOBAL_LATENT_HINT
    )


def plates_disagree_error(
    first: tuple[BatchFrame, str, str], other: tuple[BatchFrame, str, str]
) -> BatchPlateError:
    """Rules 3 and 4: two different batch plates in one (model, guide) pair."""
    (a, role_a, site_a), (b, role_b, site_b) = first, other
    where = (
        f"{role_a} site '{site_a}' lies in {_plate_str(a)}, "
        f"{role_b} site '{site_b}' in {_plate_str(b)}"
    )
    if a.name != b.name and role_a == role_b:
        return BatchPlateError(
            f"The {role_a} has more than one batch plate: {where}. A program has exactly one "
            "batch plate, the plate over the minibatch; reuse that plate object for every "
            "datum-level site, and use pyro.plate for plates inside a datum."
        )
    return BatchPlateError(
        f"Model and guide disagree on the batch plate: {where}. Use the same "
        "batch_plate(name, size, subsample_size/subsample) in both, vectorized in both or "
        "sequential in both, with the same dim."
    )


def check_guide_datum(site: dict, frame: BatchFrame, model_trace: Trace) -> None:
    """Rule 2 for sequential plates: a guide site must sit at the model's datum."""
    model_site = model_trace.nodes.get(site["name"])
    if model_site is None or model_site["type"] != "sample":
        return
    for model_frame in model_site["cond_indep_stack"]:
        if isinstance(model_frame, BatchFrame):
            if model_frame.counter != frame.counter:
                raise BatchPlateError(
                    f"guide site '{site['name']}' is drawn at datum {frame.datum} of "
                    f"{_plate_str(frame)}, but the model's site '{site['name']}' is at datum "
                    f"{model_frame.datum}. A datum's latents must be drawn in that datum's "
                    "iteration of the batch plate, from that datum's input only."
                )
            return


def check_sequential_coverage(batch: BatchInfo, per_datum: dict, role: str) -> None:
    """Every datum of a sequential batch plate needs at least one model site."""
    missing = [b for b in range(batch.size) if b not in per_datum]
    if missing:
        shown = missing if len(missing) <= 10 else missing[:10] + ["..."]
        raise BatchPlateError(
            f"The {role} has no sample site at data {shown} of the sequential batch plate "
            f"'{batch.name}' (size {batch.size}): those data would get log weight 0. "
            "Did the loop over the plate end early (a `return` or `break` inside "
            "`for i in batch_plate(...)`)?"
        )


def dynamic_program_error(error: Exception) -> BatchPlateError:
    """Rule 6: control flow on sampled values under vectorize_particles=True."""
    return BatchPlateError(
        "The program's control flow depends on sampled values (it failed with "
        f"'{error}' while all particles were traced at once), which "
        "vectorize_particles=True cannot trace. Use vectorize_particles=False (one trace "
        "per particle; with a sequential batch plate when the structure differs between "
        "data), or write the program in padded form."
    )


def _datum_index(subsample: torch.Tensor | None, b: int) -> str:
    if subsample is None:
        return ""
    return f" (dataset index {int(subsample[b])})"


def report_non_finite(
    log_w: torch.Tensor,
    sites: list,
    batch: BatchInfo,
    subsample: torch.Tensor | None,
    vectorized_particles: bool,
) -> BatchPlateError:
    """Rule 5: name the datum, the particle and the sites with non-finite densities."""
    bad = (~torch.isfinite(log_w)).nonzero()
    k, b = (int(i) for i in bad[0])
    data = sorted({int(i) for i in bad[:, 1]})
    culprits = []
    for s in sites:
        if not vectorized_particles and s.trace_index != k:
            continue
        if s.datum is not None and s.datum != b:
            continue
        value = s.value[
            min(k, s.value.shape[0] - 1) if vectorized_particles else 0, b if s.datum is None else 0
        ]
        if not bool(torch.isfinite(value)):
            culprits.append(f"{s.role} '{s.name}' ({float(value)})")
    if culprits:
        cause = "sites with a non-finite log density there: " + ", ".join(culprits)
    else:
        cause = "each site is finite but log p - log q is not (both infinite)"
    shown = data if len(data) <= 10 else data[:10] + ["..."]
    return BatchPlateError(
        f"Non-finite log weight l[k={k}, b={b}] = {float(log_w[k, b])} at datum {b}"
        f"{_datum_index(subsample, b)} of batch plate '{batch.name}'; {cause}. "
        f"Data with non-finite weights: {shown}. Check the data at those indices, the support "
        "of the guide against the model's, and the guide's parameters."
    )


def event_over_batch_error(role: str, name: str, site: dict, batch) -> BatchPlateError:
    """Rule 1 in disguise: a density whose event dims run over the minibatch."""
    fn = site["fn"]
    return BatchPlateError(
        f"{role} site '{name}' lies in batch plate '{batch.name}' (size {batch.size}, dim "
        f"{batch.dim}) but its value has shape {tuple(site['value'].shape)} with event shape "
        f"{tuple(getattr(fn, 'event_shape', ()))} and no batch dimension: its density couples "
        "the data of the minibatch (an event dim over the batch, via .to_event() or a "
        "multivariate distribution), and the plate would give every datum the joint density "
        "of all of them. Make each datum its own batch element (event dims only inside a "
        "datum); if every datum really observes the same value, expand it to the batch "
        "(obs=value.expand(B, ...))."
    )
