"""Check: every structural rule of a batch-plate program, in one pass over a trace pair.

The rules are those of the Contract page (docs/contract.md, "Structural
rules"). Each violation raises a `BatchPlateError` whose message names the
site, the plate and, where it applies, the datum, and says how to fix the
program. Pyro's own checks (model/guide match, site shapes) follow ours when
Pyro's validation is enabled, so a batch-plate mistake is reported as one and
not as a bare shape mismatch.
"""

from __future__ import annotations

import difflib
import math
from typing import TYPE_CHECKING

import torch
from pyro.infer.util import is_validation_enabled, site_is_subsample
from pyro.util import check_model_guide_match, check_site_shape

from .errors import BatchPlateError
from .plate import BatchFrame, BatchInfo, batch_frame

if TYPE_CHECKING:
    from pyro.poutine import Trace

GLOBAL_LATENT_HINT = (
    "Per-datum objectives weigh each datum of the batch plate on its own, so the data must "
    "lie in one. Sites outside it (global latents, MAP sites) are allowed next to it: the "
    "ELBO family weighs them once, and the importance-weighted objectives accept them with a "
    "point-mass guide (AutoDelta, dist.Delta)."
)

Located = tuple[BatchFrame, str, str]  # (frame, role, site name)


class NoSampleSitesError(BatchPlateError):
    """Model and guide have no sample site: no `[K, B]` weights exist. The objectives
    catch it and return loss 0 without gradient, as Pyro does (an auxiliary loss on
    a batch without labels); `log_weights` and `log_evidence` raise it."""


def contributes(site: dict) -> bool:
    """Subsample and deterministic sites carry no density and may live anywhere."""
    return not (site_is_subsample(site) or site["infer"].get("_deterministic", False))


def same_plate(a: BatchFrame, b: BatchFrame) -> bool:
    """One batch plate, whatever datum (sequential counter) each frame is at."""
    return (a.name, a.dim, a.size, a.full_size) == (b.name, b.dim, b.size, b.full_size)


def check_pair(model_trace: Trace, guide_trace: Trace, max_plate_nesting: float) -> None:
    """Raise on the first structural rule the scored (model, guide) pair breaks.

    Strict matching (model and guide agree on every latent site, its plates and
    its observed status) runs whether or not Pyro's validation is on: a
    mismatch changes the number, not just its variance.
    """
    first: Located | None = None
    outside: tuple[dict, str] | None = None  # a site outside the batch plate: a global site
    model_data: set[int] = set()
    # (role, observed) -> site names: one set insertion per site, compared once below.
    names: dict[tuple[str, bool], set[str]] = {
        key: set() for key in (("model", False), ("model", True), ("guide", False), ("guide", True))
    }
    for role, trace in (("model", model_trace), ("guide", guide_trace)):
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or not contributes(site):
                continue
            if not site["infer"].get("is_auxiliary"):  # an autoguide's helper, as in Pyro
                names[role, bool(site["is_observed"])].add(name)
            frame = _site_frame(site, role, model_trace)
            if frame is None:  # weighed once, as the global term, never per datum
                if role == "model" and first is not None:
                    raise global_after_local_error(name, first[2])
                outside = outside or (site, role)
                continue
            if first is None:
                first = (frame, role, name)
            elif not same_plate(frame, first[0]):
                raise plates_disagree_error(first, (frame, role, name))
            if role == "guide":
                _check_guide_site(site, frame, model_trace)
            elif not frame.vectorized:
                model_data.add(frame.datum)
            if frame.vectorized and _spans_batch(site, frame):
                raise event_over_batch_error(role, name, site, BatchInfo.of(frame))
    if first is None and outside is not None:
        raise missing_batch_plate_error(outside[0], outside[1], model_trace)
    if first is None:
        raise NoSampleSitesError(
            "The model and guide have no sample sites: there is nothing to weigh. "
            "Put the model's observations inside a batch_plate. (The objectives return "
            "loss 0 without gradient for such a program, as Pyro does.)"
        )
    check_match(names, model_trace, guide_trace)
    batch = BatchInfo.of(first[0])
    if not batch.vectorized:
        check_sequential_coverage(batch, model_data, "model")
    if is_validation_enabled():
        _check_pyro_rules(model_trace, guide_trace, max_plate_nesting)


def check_match(
    names: dict[tuple[str, bool], set[str]], model_trace: Trace, guide_trace: Trace | None = None
) -> None:
    """Strict matching: the guide samples exactly the model's latent sites.

    Each way of breaking it returns a number that weighs the wrong thing: a
    model latent the guide misses is drawn from the prior and weighed as if
    the guide had proposed it, an extra guide site adds `-log q` with no
    `log p`, and an observed guide site adds a density of a value the guide
    did not draw.
    """
    model_latent, model_observed = names["model", False], names["model", True]
    guide_latent, guide_observed = names["guide", False], names["guide", True]
    if guide_observed:
        raise guide_observes_error(sorted(guide_observed), model_latent)
    if model_latent == guide_latent:  # the common case: one set comparison per step
        return
    sampled_observed = sorted(guide_latent & model_observed)
    if sampled_observed:
        raise BatchPlateError(
            f"guide site '{sampled_observed[0]}' is sampled in the guide but observed in the "
            "model: its value is data, which the guide must not draw (it would replace the "
            f"observation). Remove '{sampled_observed[0]}' from the guide."
        )
    extra = sorted(guide_latent - model_latent)
    # Sites the model enumerates are summed out exactly, not proposed by the guide.
    missing = sorted(
        n for n in model_latent - guide_latent if not _is_enumerated(model_trace.nodes[n])
    )
    if not (extra or missing):
        return
    traces = (model_trace,) if guide_trace is None else (model_trace, guide_trace)
    loops = sorted({_padded_loop(t, n) for t in traces for n in extra + missing} - {None})
    raise mismatch_error(extra, missing, loops)


def _padded_loop(trace: Trace, name: str) -> str | None:
    """The `batchplate.Lanes` loop that drew site `name`, if any (it marks its sites)."""
    site = trace.nodes.get(name)
    return None if site is None else site["infer"].get("padded_loop")


def _is_enumerated(site: dict) -> bool:
    return site["infer"].get("enumerate") is not None


def guide_observes_error(observed: list[str], model_latent: set[str]) -> BatchPlateError:
    """A guide site with `obs=` (or conditioned): `log q` would score a value it did not draw."""
    name = observed[0]
    kind = "a latent site of the model" if name in model_latent else "not a latent of the model"
    return BatchPlateError(
        f"guide site '{name}' is observed (obs= or poutine.condition), and is {kind}. A guide "
        "proposes the latents; an observed guide site adds log q of a value the guide did not "
        f"draw, and the weights are wrong. Remove obs= from '{name}' in the guide (observations "
        "belong in the model). To weigh model and guide at given latent values, use "
        "batchplate.replay_latents(guide, values) instead of conditioning the guide."
    )


def mismatch_error(extra: list[str], missing: list[str], loops: list = ()) -> BatchPlateError:
    """Model latents the guide does not sample, or guide sites the model does not have."""
    parts = []
    if extra:
        hint = _nearest(extra[0], missing)
        parts.append(
            f"guide sites {_shown(extra)} are not latent sites of the model{hint}: each adds "
            "-log q with no log p, or the model never sees the value"
        )
    if missing:
        hint = _nearest(missing[0], extra)
        parts.append(
            f"model latent sites {_shown(missing)} are not sampled by the guide{hint}: they "
            "would be drawn from the prior and weighed as if the guide had proposed them"
        )
    return BatchPlateError(
        "Model and guide disagree on the latent sites: "
        + "; ".join(parts)
        + ". The guide must sample every latent site of the model, under the same name "
        "(check for typos and for poutine.block around a site), and nothing else."
        + (_padded_hint(loops, "ran a different number of steps than") if loops else "")
    )


def _padded_hint(loops: list, what: str) -> str:
    return (
        f" These are steps of padded loop(s) {loops} (batchplate.Lanes): the model's loop "
        f"{what} the guide's. Its done test (lanes.finish) must be the guide's, a function of "
        "the sampled values and the data only."
    )


def _nearest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1)
    return f" (did you mean '{close[0]}' for '{name}'?)" if close else ""


def _shown(names: list[str]) -> list:
    return names if len(names) <= 10 else names[:10] + ["..."]


def _check_pyro_rules(model_trace: Trace, guide_trace: Trace, max_plate_nesting: float) -> None:
    check_model_guide_match(model_trace, guide_trace, max_plate_nesting)
    for trace in (model_trace, guide_trace):
        for site in trace.nodes.values():
            if site["type"] == "sample" and contributes(site):
                check_site_shape(site, max_plate_nesting)


def _site_frame(site: dict, role: str, model_trace: Trace) -> BatchFrame | None:
    """Rules 1, 2 and 4: a site lies in at most one batch plate (`None`: a global site),
    and a guide site lies in it where the model's does."""
    frame = batch_frame(site)
    if frame is None:
        model_site = model_trace.nodes.get(site["name"]) if role == "guide" else None
        if model_site is not None and _sample_frame(model_site) is not None:
            raise missing_batch_plate_error(site, role, model_trace)
        return None
    for other in site["cond_indep_stack"]:
        if isinstance(other, BatchFrame) and other.name != frame.name:
            raise BatchPlateError(
                f"{role} site '{site['name']}' lies in two batch plates, "
                f"'{other.name}' and '{frame.name}'. A program has exactly one batch plate; "
                "use pyro.plate for plates inside a datum."
            )
    return frame


def _check_guide_site(site: dict, frame: BatchFrame, model_trace: Trace) -> None:
    """Rules 2 and 3: a guide site sits in the model's batch plate, at the model's datum."""
    model_site = model_trace.nodes.get(site["name"])
    if model_site is None or model_site["type"] != "sample":
        return
    model_frame = batch_frame(model_site)
    name = site["name"]
    if model_frame is None:
        raise BatchPlateError(
            f"guide site '{name}' lies in {BatchInfo.of(frame)}, but the model's site '{name}' "
            "is outside it (a global site, one value for all data). Sample it outside the "
            "batch plate in the guide too, or move the model's site into the batch plate."
        )
    if not same_plate(model_frame, frame):
        raise plates_disagree_error((model_frame, "model", name), (frame, "guide", name))
    plates = {f.name for f in site["cond_indep_stack"]}
    model_plates = {f.name for f in model_site["cond_indep_stack"]}
    if plates != model_plates:
        raise BatchPlateError(
            f"site '{name}' lies in plates {sorted(model_plates)} in the model but "
            f"{sorted(plates)} in the guide. A site must lie in the same plates in model and "
            f"guide: wrap the guide's '{name}' in the model's plates (same names and dims)."
        )
    loop = site["infer"].get("padded_loop") or model_site["infer"].get("padded_loop")
    if loop is not None:  # a user's own masks may differ on purpose (Pyro allows it)
        _check_lane_masks(name, model_site, site, frame, loop)
    if not frame.vectorized and model_frame.counter != frame.counter:
        raise BatchPlateError(
            f"guide site '{name}' is drawn at datum {frame.datum} of "
            f"{BatchInfo.of(frame)}, but the model's site '{name}' is at datum "
            f"{model_frame.datum}. A datum's latents must be drawn in that datum's "
            "iteration of the batch plate, from that datum's input only."
        )


def _check_lane_masks(
    name: str, model_site: dict, site: dict, frame: BatchFrame, loop: str
) -> None:
    """A padded loop's step counts in the model exactly for the lanes it counts in the
    guide: a lane still running in one only adds `log q` without `log p` (or the reverse).
    Site names alone do not show it when both loops run as many steps overall."""
    masks = [
        torch.as_tensor(True if s["mask"] is None else s["mask"], dtype=torch.bool)
        for s in (model_site, site)
    ]
    try:
        model_mask, guide_mask = torch.broadcast_tensors(*masks)
    except RuntimeError:
        model_mask, guide_mask = (m.all() for m in masks)  # shapes Pyro's own checks judge
    differ = model_mask != guide_mask
    if not bool(differ.any()):
        return
    data = ""
    if frame.vectorized and differ.dim() >= -frame.dim:
        rows = differ.movedim(frame.dim, -1).reshape(-1, differ.shape[frame.dim]).any(0)
        data = f" at data {_shown(rows.nonzero().flatten().tolist())}"
    raise BatchPlateError(
        f"latent site '{name}' is masked differently in model and guide: {int(differ.sum())} "
        f"of {differ.numel()} entries{data} count in one and not in the other, so their log q "
        "has no log p (or the reverse)." + _padded_hint([loop], "finishes lanes differently from")
    )


def _spans_batch(site: dict, frame: BatchFrame) -> bool:
    """The site's density does not have one entry per datum: its event dims run over
    the minibatch (`.to_event()` over the data, a multivariate density across it),
    so every datum would carry the joint density of all of them."""
    log_prob = site["log_prob"]
    size = log_prob.shape[frame.dim] if log_prob.dim() >= -frame.dim else 1
    if size != frame.size:
        return True
    event_dim = getattr(site["fn"], "event_dim", 0)
    value = site["value"]
    # pyro.factor's Unit value is empty: its log factor alone carries the shape.
    return event_dim > 0 and value.numel() > 0 and value.dim() - event_dim < -frame.dim


def missing_batch_plate_error(site: dict, role: str, model_trace: Trace) -> BatchPlateError:
    """Rules 1 and 2: a sample site outside the batch plate."""
    name = site["name"]
    model_site = model_trace.nodes.get(name) if role == "guide" else None
    model_frame = None
    if model_site is not None and model_site["type"] == "sample":
        model_frame = batch_frame(model_site)
    if model_frame is not None:
        return BatchPlateError(
            f"guide site '{name}' is outside the batch plate, but the model's site '{name}' "
            f"is inside {BatchInfo.of(model_frame)}. A guide site outside the batch plate "
            "draws one value for the whole minibatch and so couples the data points. "
            f"Sample '{name}' inside batch_plate('{model_frame.name}', ...) in the guide too, "
            "one value per datum."
        )
    frame = next(filter(None, map(_sample_frame, model_trace.nodes.values())), None)
    if frame is None:
        return BatchPlateError(
            f"{role} site '{name}' is not inside a batch plate, and the model has none. "
            "Mark the plate over your minibatch with batchplate.batch_plate(name, size, ...) "
            "in both model and guide, in place of its pyro.plate. " + GLOBAL_LATENT_HINT
        )
    return BatchPlateError(
        f"{role} site '{name}' is outside {BatchInfo.of(frame)}. " + GLOBAL_LATENT_HINT
    )


def _sample_frame(site: dict) -> BatchFrame | None:
    return batch_frame(site) if site["type"] == "sample" else None


def plates_disagree_error(first: Located, other: Located) -> BatchPlateError:
    """Rules 3 and 4: two different batch plates in one (model, guide) pair."""
    (a, role_a, site_a), (b, role_b, site_b) = first, other
    where = (
        f"{role_a} site '{site_a}' lies in {BatchInfo.of(a)}, "
        f"{role_b} site '{site_b}' in {BatchInfo.of(b)}"
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


def check_sequential_coverage(batch: BatchInfo, data: set[int], role: str) -> None:
    """Every datum of a sequential batch plate needs at least one model site."""
    missing = [b for b in range(batch.size) if b not in data]
    if missing:
        shown = missing if len(missing) <= 10 else missing[:10] + ["..."]
        raise BatchPlateError(
            f"The {role} has no sample site at data {shown} of the sequential batch plate "
            f"'{batch.name}' (size {batch.size}): those data would get log weight 0. "
            "Did the loop over the plate end early (a `return` or `break` inside "
            "`for i in batch_plate(...)`)?"
        )


def dynamic_program_error(error: Exception) -> BatchPlateError:
    """Rule 6: control flow on sampled values under `vectorize_particles=True`."""
    return BatchPlateError(
        "The program's control flow depends on sampled values (it failed with "
        f"'{error}' while all particles were traced at once), which "
        "vectorize_particles=True cannot trace. Use vectorize_particles=False (one trace "
        "per particle; with a sequential batch plate when the structure differs between "
        "data), or write the program in padded form."
    )


def non_finite_error(
    log_w: torch.Tensor,
    culprits: list[str],
    batch: BatchInfo,
    subsample: torch.Tensor | None,
    first_particle: int = 0,
) -> BatchPlateError:
    """Rule 5: name the datum, the particle and the sites with non-finite densities.

    `log_w` holds the particles from `first_particle` on; `culprits` describes the
    sites with a non-finite log density at the first non-finite entry.
    """
    bad = (~torch.isfinite(log_w)).nonzero()
    k, b = (int(i) for i in bad[0])
    data = sorted({int(i) for i in bad[:, 1]})
    if culprits:
        cause = "sites with a non-finite log density there: " + ", ".join(culprits)
    else:
        cause = "each site is finite but log p - log q is not (both infinite)"
    shown = data if len(data) <= 10 else data[:10] + ["..."]
    where = "" if subsample is None else f" (dataset index {int(subsample[b])})"
    return BatchPlateError(
        f"Non-finite log weight l[k={first_particle + k}, b={b}] = {float(log_w[k, b])} at "
        f"datum {b}{where} of batch plate '{batch.name}'; {cause}. "
        f"Data with non-finite weights: {shown}. Check the data at those indices, the support "
        "of the guide against the model's, and the guide's parameters."
    )


def event_over_batch_error(role: str, name: str, site: dict, batch: BatchInfo) -> BatchPlateError:
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


# -- inputs, losses and gradients -------------------------------------------------
# (check_positive_int and check_subsample live in plate.py: batch_plate needs them.)


def check_alpha(alpha: object) -> float:
    """A Rényi order: a finite real number other than 1."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise BatchPlateError(f"alpha must be a finite real number, got {alpha!r}")
    if alpha == 1:
        raise BatchPlateError(
            "The order alpha should not be equal to 1. Use batchplate.Trace_ELBO for alpha = 1."
        )
    return float(alpha)


def non_finite_loss_error(
    name: str, value: torch.Tensor, per_datum: torch.Tensor | None
) -> BatchPlateError:
    """A non-finite loss: the step is refused before any gradient is written."""
    where = ""
    if per_datum is not None:
        bad = (~torch.isfinite(per_datum.detach())).nonzero().flatten().tolist()
        if bad:
            where = f" at data {_shown(bad)} (per-datum values {per_datum[bad[0]].item()} first)"
    return BatchPlateError(
        f"Non-finite {name} {value.item()}{where}; the step was not taken (parameters, "
        "optimizer state and gradients are unchanged). Check the data, the guide's scales "
        "and the learning rate; to skip such steps, catch BatchPlateError around svi.step."
    )


def non_finite_gradient_error(names: list[str]) -> BatchPlateError:
    """A finite loss whose gradient is not finite in some parameters."""
    return BatchPlateError(
        f"Non-finite gradient in parameters {_shown(names)} (the loss is finite); the step "
        "was not taken (parameters, optimizer state and gradients are unchanged). Typical "
        "causes: a scale parameter at 0, log of 0 in a guide, exploding weights; lower the "
        "learning rate or constrain the parameter. To skip such steps, catch BatchPlateError "
        "around svi.step."
    )


def non_finite_data_error(model_trace: Trace, error: Exception) -> BatchPlateError | None:
    """An observed value with NaN/inf, named by datum, or `None` if none is found."""
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or not site["is_observed"]:
            continue
        value = site["value"]
        if not isinstance(value, torch.Tensor) or bool(torch.isfinite(value).all()):
            continue
        frame = batch_frame(site)
        if frame is None:
            return None
        if frame.vectorized and value.dim() >= -frame.dim and value.shape[frame.dim] == frame.size:
            bad = (~torch.isfinite(value)).movedim(frame.dim, 0).reshape(frame.size, -1)
            data = bad.any(1).nonzero().flatten().tolist()
        elif frame.vectorized:  # broadcast over the batch: every datum sees it
            data = list(range(frame.size))
        else:
            data = [frame.datum]
        return BatchPlateError(
            f"Observed site '{name}' holds a non-finite value at data {_shown(data)} of "
            f"{BatchInfo.of(frame)} ({str(error).splitlines()[0]}). Remove or impute those "
            "data before training."
        )
    return None


def non_finite_input_error(args: tuple, kwargs: dict, error: Exception) -> BatchPlateError | None:
    """A NaN/inf in a tensor argument, named by its rows (row `b` is datum `b` of a
    `[B, ...]` input), or `None` when every tensor argument is finite."""
    labelled = [(f"args[{i}]", a) for i, a in enumerate(args)] + list(kwargs.items())
    for label, value in labelled:
        items = value.items() if isinstance(value, dict) else None
        if isinstance(value, (list, tuple)):
            items = enumerate(value)
        for key, tensor in items if items is not None else [(None, value)]:
            if not (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()):
                continue
            bad = ~torch.isfinite(tensor.detach())
            if not bool(bad.any()):
                continue
            where = label if key is None else f"{label}[{key!r}]"
            rows = bad.reshape(len(tensor), -1).any(1).nonzero().flatten().tolist()
            if tensor.dim() == 0:
                rows = []
            return BatchPlateError(
                f"The input {where} holds NaN or infinite values at rows {_shown(rows)} (row "
                f"b is datum b of a [B, ...] minibatch), and the program failed on it: "
                f"{str(error).splitlines()[0]} Remove or impute those data before training."
            )
    return None


def global_latent_error(names: list[str], objective: str) -> BatchPlateError:
    """A random global latent under an objective that takes a logsumexp per datum."""
    return BatchPlateError(
        f"guide sites {names} lie outside the batch plate and are not point masses: global "
        f"latents, shared by all data. {objective} weighs each datum by a logsumexp over its "
        "own particles, which needs the data independent given the sites outside the batch "
        "plate; a random global latent couples them, so the per-datum bound is undefined "
        "(only the whole dataset's bound, one joint weight, is). Give those sites a "
        "point-mass guide (MAP: AutoDelta, dist.Delta) or make them pyro.param, or use "
        "batchplate.Trace_ELBO / TraceEnum_ELBO, which weigh global latents once."
    )


def global_after_local_error(name: str, local: str) -> BatchPlateError:
    """A model site outside the batch plate, after datum-level sites it may depend on."""
    return BatchPlateError(
        f"model site '{name}' is outside the batch plate but comes after its site '{local}': "
        "a site shared by all data that may depend on the data's latents couples the data of "
        "the minibatch, so no objective can weigh each datum on its own. Sample global sites "
        "before the batch plate (they may not depend on datum-level sites, as in Pyro's "
        "TraceEnum_ELBO), or move the site into the batch plate."
    )
