"""Enumeration: exact sums over discrete sites, kept per datum.

Pyro's `TraceEnum_ELBO` contracts the enumerated dims of packed log
probabilities (`pyro.ops.contract`) and takes the Dice expectation of the
costs, summing everything into one scalar. Here the same contractions keep
the batch plate's dim (and the particle plate's), so each datum gets its own
term:

- `marginal_log_p`: for importance-weighted objectives, the model sites that
  depend on model-enumerated sites, summed exactly inside each datum:
  `log sum_e p(x_b, z_b^k, e)`, a `[K, B]` tensor;
- `dice_terms`: `TraceEnum_ELBO`'s per-datum surrogate (model and guide
  enumeration, Monte Carlo guide sites), `[K, B]`, plus the term of the sites
  outside the batch plate.

Every datum lies in the batch plate, and that plate is in the ordinal of
every datum's site, so it is never product-contracted: summing the per-datum
terms gives Pyro's scalar on the same draws.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from opt_einsum import shared_intermediates
from pyro.distributions.score_parts import ScoreParts
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer.util import Dice
from pyro.ops import packed
from pyro.ops.contract import contract_tensor_tree, contract_to_tensor
from pyro.ops.einsum.adjoint import require_backward
from pyro.ops.rings import MarginalRing, SampleRing
from pyro.poutine import Trace

from .draw import PARTICLE_PLATE, Pair
from .errors import BatchPlateError
from .plate import BatchInfo, batch_frame
from .validation import contributes


def model_enumerated(pair: Pair) -> list[dict]:
    """Model sites enumerated in parallel by the model (absent from the guide)."""
    model_trace, guide_trace = pair
    return [
        site
        for name, site in model_trace.nodes.items()
        if site["type"] == "sample"
        and site["infer"].get("_enumerate_dim") is not None
        and name not in guide_trace.nodes
    ]


def guide_enumerated(pair: Pair) -> list[str]:
    """Guide sites enumerated in parallel by the guide."""
    return [
        name
        for name, site in pair[1].nodes.items()
        if site["type"] == "sample" and site["infer"].get("_enumerate_dim") is not None
    ]


def pack_pair(pair: Pair) -> None:
    """Pack both traces' log probs with shared plate symbols (once per pair)."""
    model_trace, guide_trace = pair
    if getattr(model_trace, "_batchplate_packed", False):
        return
    guide_trace.pack_tensors()
    model_trace.pack_tensors(guide_trace.plate_to_symbol)
    model_trace._batchplate_packed = True


def _symbols(trace: Trace, batch: BatchInfo) -> tuple[str | None, str | None]:
    """Packed symbols of the particle plate and the (vectorized) batch plate."""
    particle = trace.plate_to_symbol.get(PARTICLE_PLATE)
    return particle, trace.plate_to_symbol.get(batch.name) if batch.vectorized else None


def packed_to_kb(value: torch.Tensor, particle: str | None, batch: str | None) -> torch.Tensor:
    """A packed tensor summed down to `[K or 1, B or 1]`, keeping the two symbols' dims."""
    dims = getattr(value, "_pyro_dims", "")
    if not isinstance(value, torch.Tensor):
        return torch.tensor(float(value)).reshape(1, 1)
    drop = [i for i, d in enumerate(dims) if d not in (particle, batch)]
    if drop:
        value = value.sum(drop)
    kept = [d for d in dims if d in (particle, batch)]
    if kept == [batch, particle]:
        value = value.T
    shape = (
        value.shape[kept.index(particle)] if particle in kept else 1,
        value.shape[kept.index(batch)] if batch in kept else 1,
    )
    return value.reshape(shape)


def _place(columns: dict, batch: BatchInfo, K: int, like: torch.Tensor) -> torch.Tensor:
    """`[K, B]` from per-datum columns (`None`: one vectorized `[K or 1, B or 1]` block)."""
    if batch.vectorized:
        return columns[None].expand(K, batch.size) if None in columns else like.new_zeros(K, 1)
    zero = like.new_zeros(1, 1)
    return torch.cat([columns.get(b, zero).expand(K, 1) for b in range(batch.size)], dim=1)


def _datum(site: dict) -> int | None | str:
    """The site's datum: `None` in a vectorized batch plate, `"global"` outside it."""
    frame = batch_frame(site)
    if frame is None:
        return "global"
    return None if frame.vectorized else frame.datum


# -- importance-weighted objectives: log sum_e p ----------------------------------


def marginal_log_p(pair: Pair, batch: BatchInfo, K: int) -> tuple[set[str], torch.Tensor | None]:
    """`(names, [K, B])`: the model sites that depend on a model-enumerated site,
    and their log density with the enumerated dims summed out, per datum.

    The mask applies inside the sum and the user's scale outside it (as in
    Pyro); the batch plate's `N/B` is not applied.
    """
    enumerated = model_enumerated(pair)
    if not enumerated:
        return set(), None
    model_trace = pair[0]
    pack_pair(pair)
    sum_dims = {site["infer"]["_enumerate_symbol"] for site in enumerated}
    trees: dict = {}
    names, scales = set(), []
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or not contributes(site):
            continue
        factor = site["packed"]["unscaled_log_prob"]
        if sum_dims.isdisjoint(factor._pyro_dims):
            continue
        datum = _datum(site)
        if datum == "global":
            raise enumerated_global_error(name)
        names.add(name)
        scales.append(_user_scale(site, batch))
        factor = packed.scale_and_mask(factor, mask=site["packed"]["mask"])
        tree = trees.setdefault(datum, OrderedDict())
        tree.setdefault(find_ordinal(model_trace, site), []).append(factor)
    particle, batch_symbol = _symbols(model_trace, batch)
    target = frozenset(s for s in (particle, batch_symbol) if s is not None)
    columns = {}
    with shared_intermediates() as cache:
        for datum, tree in trees.items():
            value = contract_to_tensor(tree, sum_dims, target_ordinal=target, cache=cache)
            columns[datum] = packed_to_kb(value, particle, batch_symbol)
    scale = common_scale(scales)
    return names, scale * _place(columns, batch, K, next(iter(columns.values())))


def _user_scale(site: dict, batch: BatchInfo) -> float:
    scale = site["scale"]
    return scale / batch.subsample_scale if batch.full_size != batch.size else scale


def enumerated_global_error(name: str) -> BatchPlateError:
    return BatchPlateError(
        f"model site '{name}' depends on an enumerated site but lies outside the batch plate: "
        "summing an enumerated variable shared by all data couples the data of the minibatch, "
        "so there is no per-datum value. Enumerate only sites inside the batch plate (local "
        "assignments); sample or fix the global site instead."
    )


# -- TraceEnum_ELBO: the Dice expectation per datum ----------------------------------


def dice_terms(pair: Pair, batch: BatchInfo, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`([K, B], [K or 1])`: `TraceEnum_ELBO`'s surrogate, per datum and for the sites
    outside the batch plate.

    The values are the ELBO's terms (Dice factors evaluate to one), the
    gradients Pyro's. Per-datum terms are without the batch plate's `N/B`.
    A sequential batch plate is contracted datum by datum, so datum `b`'s score
    terms use only datum `b`'s costs.
    """
    model_trace, guide_trace = _density_view(pair[0]), _density_view(pair[1])
    _add_score_parts(guide_trace)
    pack_pair((model_trace, guide_trace))
    particle, batch_symbol = _symbols(model_trace, batch)
    if batch.vectorized:
        views = {None: (model_trace, guide_trace, set())}
    else:
        views = _split_by_datum(model_trace, guide_trace)
    columns, global_term = {}, None
    for datum, (model_view, guide_view, context) in views.items():
        local, glob = _dice_elbo(model_view, guide_view, particle, batch_symbol, context)
        if datum not in (None, "global"):  # a sequential datum: all its terms are its own
            local, glob = (glob if local is None else local + glob), None
        if local is not None:
            columns[datum] = local
        if glob is not None:
            global_term = glob if global_term is None else global_term + glob
    like = next(iter(columns.values()), global_term)
    per_datum = _place(columns, batch, K, like) / batch.subsample_scale
    if global_term is None:
        global_term = per_datum.new_zeros(1, 1)
    return per_datum, global_term.reshape(-1)


def _density_view(trace: Trace) -> Trace:
    """A shallow copy without subsample and deterministic sites (no density)."""
    view = trace.copy()
    for name, site in list(view.nodes.items()):
        if site["type"] != "sample" or not contributes(site):
            view.remove_node(name)
    return view


def _add_score_parts(guide_trace: Trace) -> None:
    """Pyro's `compute_score_parts` from the log probs already computed (not again)."""
    for site in guide_trace.nodes.values():
        if "score_parts" in site:
            continue
        # Score functions are masked, never scaled (the draw came from the unscaled q).
        reparameterized = getattr(site["fn"], "has_rsample", False)
        score = (
            0.0 if reparameterized else scale_and_mask(site["unscaled_log_prob"], mask=site["mask"])
        )
        site["score_parts"] = ScoreParts(site["log_prob"], score, 0.0)


def _split_by_datum(model_trace: Trace, guide_trace: Trace) -> dict:
    """Per-datum views `(model, guide, context)` of a sequential batch plate's traces
    (`"global"`: the rest). A datum's guide view also holds the guide sites outside
    the batch plate, its `context`: their Dice factors weigh the datum's costs (a
    global draw changes every datum's term), their own costs count once, globally."""
    groups: dict = {}
    for role, trace in enumerate((model_trace, guide_trace)):
        for name, site in trace.nodes.items():
            groups.setdefault(_datum(site), ([], []))[role].append(name)
    context = groups.get("global", ([], []))[1]
    views = {}
    for datum, (model_names, guide_names) in groups.items():
        extra = [] if datum == "global" else context
        views[datum] = (
            _subtrace(model_trace, model_names),
            _subtrace(guide_trace, extra + guide_names),
            set(extra),
        )
    return views


def _subtrace(trace: Trace, names: list[str]) -> Trace:
    view = Trace()
    for name in names:
        view.nodes[name] = trace.nodes[name]
    view.plate_to_symbol = trace.plate_to_symbol
    view.symbol_to_dim = trace.symbol_to_dim
    return view


def _dice_elbo(
    model_trace: Trace, guide_trace: Trace, particle: str | None, batch: str | None, context: set
):
    """Pyro's Dice ELBO, returning `(local [K|1, B|1] or None, global or None)`; the
    guide sites in `context` only weigh (Dice factors), their costs are counted elsewhere."""
    costs, log_factors, ordering, sum_dims, scale = model_factors(model_trace, guide_trace)
    if log_factors:
        dim_to_size = {}
        for terms in log_factors.values():
            for term in terms:
                dim_to_size.update(zip(term._pyro_dims, term.shape, strict=True))
        with shared_intermediates() as cache:
            ring = SampleRing(cache=cache, dim_to_size=dim_to_size)
            log_factors = contract_tensor_tree(log_factors, sum_dims, ring=ring)
        for t, terms in log_factors.items():
            costs.setdefault(t, []).extend(packed.scale_and_mask(x, scale=scale) for x in terms)
    for name, site in guide_trace.nodes.items():
        if name not in context:
            costs.setdefault(ordering[name], []).append(packed.neg(site["packed"]["log_prob"]))
    return _expectation(Dice(guide_trace, ordering), costs, particle, batch)


def _expectation(dice: Dice, costs: dict, particle: str | None, batch: str | None):
    """`Dice.compute_expectation`, summing every dim but the particle and batch plates'.

    Returns `(local, global)`: the terms whose ordinal holds the batch plate as
    `[K or 1, B or 1]`, the others as `[K or 1, 1]` (each `None` when absent).
    """
    local = glob = None
    with shared_intermediates() as cache:
        ring = MarginalRing(cache=cache)
        for ordinal, cost_terms in costs.items():
            log_factors = dice_log_factors(dice, ordinal)
            scale = math.exp(sum(x for x in log_factors if not isinstance(x, torch.Tensor)))
            log_factors = [x for x in log_factors if isinstance(x, torch.Tensor)]
            probs = _marginals(ring, log_factors, cost_terms, ordinal)
            for cost in cost_terms:
                prob = probs[frozenset(cost._pyro_dims)]
                cost, prob = packed.broadcast_all(cost, prob)
                # prob == 0 marks impossible enumerated values, whose cost may be -inf
                # (a NaN gradient through 0 * -inf, which Pyro avoids the same way).
                mask = prob > 0
                term = prob * (cost if bool(mask.all()) else cost.masked_fill(~mask, 0.0))
                term = scale * packed_to_kb(term_dims(term, prob), particle, batch)
                if batch is not None and batch in ordinal:
                    local = term if local is None else local + term
                else:
                    glob = term if glob is None else glob + term
    return local, glob


def term_dims(term: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    term._pyro_dims = like._pyro_dims
    return term


def _marginals(ring: MarginalRing, log_factors: list, cost_terms: list, ordinal) -> dict:
    """Marginal probabilities of each cost's dims under the Dice factors (Pyro's queries)."""
    queries = {frozenset(cost._pyro_dims): None for cost in cost_terms}
    for log_factor in log_factors:
        key = frozenset(log_factor._pyro_dims)
        if queries.get(key, False) is None:
            queries[key] = log_factor
    for cost in cost_terms:
        key = frozenset(cost._pyro_dims)
        if queries[key] is None:
            query = torch.zeros_like(cost)
            query._pyro_dims = cost._pyro_dims
            log_factors.append(query)
            queries[key] = query
    # Plates are never product-contracted: the dependency ordering is by plate.
    sum_dims = set().union(*(x._pyro_dims for x in log_factors)) - ordinal
    for query in queries.values():
        require_backward(query)
    root = ring.sumproduct(log_factors, sum_dims)
    root._pyro_backward()
    probs = {}
    for key, query in queries.items():
        prob = query._pyro_backward_result.exp()
        prob._pyro_dims = query._pyro_dims
        probs[key] = prob
    return probs


# -- what Pyro's TraceEnum_ELBO computes before contracting (our own code) ----------


def find_ordinal(trace: Trace, site: dict) -> frozenset:
    """The packed symbols of the vectorized plates a site lies in (its ordinal)."""
    return frozenset(
        trace.plate_to_symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized
    )


def common_scale(scales: list) -> float | torch.Tensor:
    """The one scalar scale that every enumerated factor shares.

    A log sum over an enumerated value cannot take a different scale per term,
    so differing (or non-scalar) scales raise, as they do in Pyro. Compared by
    value, without touching the autograd graph.
    """
    values = set()
    for scale in scales:
        if isinstance(scale, torch.Tensor) and scale.dim():
            raise ValueError("enumeration only supports scalar poutine.scale")
        values.add(float(scale))
    if len(values) != 1:
        raise ValueError(
            "Expected all enumerated sample sites to share a common poutine.scale, "
            f"but found {len(values)} different scales."
        )
    return scales[0]


def dice_log_factors(dice: Dice, target: frozenset) -> list:
    """The Dice factors at one ordinal: the upstream guide factors and, as a constant,
    minus the log of how many times the ordinal is counted (sequential enumeration)."""
    log_denom = sum(term for ordinal, term in dice.log_denom.items() if not ordinal <= target)
    factors = [] if is_identically_zero(log_denom) else [-log_denom]
    for ordinal, terms in dice.log_probs.items():
        if ordinal <= target:
            factors.extend(terms)
    return factors


def model_factors(model_trace: Trace, guide_trace: Trace) -> tuple:
    """`(costs, log_factors, ordering, enum_dims, scale)`: the model's plain cost terms
    by ordinal, the factors to contract over the model-enumerated dims (the mask
    inside the sum, the scale outside it), each site's ordinal, those dims and
    the enumerated factors' common scale. The ordering is by plate: `y` may
    depend on `x` iff `ordering[x] <= ordering[y]`."""
    ordering = {
        name: find_ordinal(trace, site)
        for trace in (model_trace, guide_trace)
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
    }
    cost_sites, enum_sites = OrderedDict(), OrderedDict()
    enum_dims, non_enum_dims = set(), set().union(*ordering.values())
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        if name in guide_trace.nodes:
            cost_sites.setdefault(ordering[name], []).append(site)
            non_enum_dims.update(guide_trace.nodes[name]["packed"]["log_prob"]._pyro_dims)
        elif site["infer"].get("_enumerate_dim") is None:
            cost_sites.setdefault(ordering[name], []).append(site)
        else:
            enum_sites.setdefault(ordering[name], []).append(site)
            enum_dims.update(site["packed"]["log_prob"]._pyro_dims)
    enum_dims -= non_enum_dims
    costs, log_factors, scales = OrderedDict(), OrderedDict(), []
    for ordinal, sites in cost_sites.items():
        for site in sites:
            log_prob = site["packed"]["log_prob"]
            if not enum_sites or enum_dims.isdisjoint(log_prob._pyro_dims):
                costs.setdefault(ordinal, []).append(log_prob)
            else:
                factor = packed.scale_and_mask(
                    site["packed"]["unscaled_log_prob"], mask=site["packed"]["mask"]
                )
                log_factors.setdefault(ordinal, []).append(factor)
                scales.append(site["scale"])
    if enum_sites:
        check_enumeration_nesting(enum_sites, guide_trace)
    for ordinal, sites in enum_sites.items():
        for site in sites:
            log_factors.setdefault(ordinal, []).append(site["packed"]["unscaled_log_prob"])
            scales.append(site["scale"])
    return costs, log_factors, ordering, enum_dims, common_scale(scales) if scales else 1


def check_enumeration_nesting(enum_sites: dict, guide_trace: Trace) -> None:
    """Guide enumeration must be at least as global as model enumeration: a guide
    site enumerated in a plate that some model-enumerated site is not in would be
    summed with the wrong dependency structure (Pyro's rule)."""
    min_ordinal = frozenset.intersection(*enum_sites.keys())
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or site["infer"].get("_enumerate_dim") is None:
            continue
        for frame in site["cond_indep_stack"]:
            if frame.vectorized and guide_trace.plate_to_symbol[frame.name] not in min_ordinal:
                raise ValueError(
                    "Expected model enumeration to be no more global than guide enumeration, "
                    f"but found model enumeration sites upstream of guide site '{name}' in "
                    f"plate('{frame.name}'). Try converting some model enumeration sites to "
                    "guide enumeration sites."
                )
