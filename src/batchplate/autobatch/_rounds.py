"""Answering a round: the suspended lanes' requests, grouped and run as tensor operations.

A round's requests are grouped by what can be computed together (not by site
name, which differs per datum): sample sites by distribution type, parameter
shapes, where the value comes from (drawn, replayed, observed), mask and
scale; module calls by module, method and argument shapes. A group keeps its
members in parallel tuples, so that each step over the group (stacking,
scales, lane indices) is one pass in C rather than one Python step per lane
and per step. Each lane's answer is left on the lane (`Lane.answer`).
"""

from __future__ import annotations

from typing import Any

import torch

from ._lanes import Call, Lane
from ._stack import (
    as_lane_tensor,
    build,
    call_signature,
    dist_spec,
    same_objects,
    same_output,
    stacked_call,
    warn_once,
)

_NOTHING: dict = {}
NAME, FN, VALUE, OBSERVED, SCALE, MASK = range(6)  # a site request (`_lanes.SITE_FIELDS`)


class Group:
    """Requests computed together, as parallel tuples: lanes, requests, stacked
    parameters (`None` for calls), given values (`None` to draw)."""

    __slots__ = ("lanes", "requests", "params", "given")

    def __init__(self, items: list[tuple]) -> None:
        self.lanes, self.requests, self.params, self.given = zip(*items, strict=True)


def answer_round(phase: Any, pending: list[tuple[Lane, Any]]) -> list[Lane]:
    """Answer every `(lane, request)` of a round; return the lanes, to resume in order."""
    groups: dict[Any, list] = {}
    key_of = _SampleKeys(phase.spec)
    for lane, request in pending:
        if type(request) is Call:
            key = ("call", id(request.module), request.attr)
            item = (lane, request, None, None)
            key += call_signature(request.args, request.kwargs)
        else:
            key, item = key_of(lane, request)
        items = groups.get(key)
        if items is None:
            groups[key] = [item]
        else:
            items.append(item)
    answered: list[Lane] = []
    for key, items in groups.items():
        group = Group(items)
        if key[0] == "site":
            _sites(phase, key, group)  # answers its lanes
        else:
            call = key[0] == "call"
            outputs = _calls(phase.shared, key, group) if call else _lane_sites(phase, group)
            for lane, output in zip(group.lanes, outputs, strict=True):
                lane.answer = output
        answered += group.lanes
    return answered


class _SampleKeys:
    """`(group key, item)` of a sample site: its distribution's stacking key, where
    its value comes from (an observation, the lane's replayed value, or a draw)
    and how it is masked and scaled. One call per site and lane: kept flat."""

    __slots__ = ("observe", "replay")

    def __init__(self, spec: Any) -> None:
        self.observe, self.replay = not spec.uncondition, spec.replay

    def __call__(self, lane: Lane, site: tuple) -> tuple[tuple, tuple]:
        name, fn, value, observed, scale, mask = site  # `_lanes.SITE_FIELDS`
        if observed and self.observe:
            source = "obs"
            if not isinstance(value, torch.Tensor):
                value = torch.as_tensor(value)
        else:
            replay = self.replay
            value = None if replay is None else replay.get(lane.index, _NOTHING).get(name)
            source = "draw" if value is None else "replay"
        found = dist_spec(fn)
        if found is None:
            warn_once(f"site '{name}' ({type(fn).__name__})", "not stackable")
            return ("lane", id(site)), (lane, site, None, value)
        scaled = type(scale) is not float or scale != 1.0
        shape = None if value is None else value.shape
        key = ("site", found[0], source, shape, mask is not None, scaled, observed)
        return key, (lane, site, found[1], value)


def _sites(phase: Any, key: tuple, group: Group) -> None:
    """Draw, replay or observe a group's sites as one distribution, score it and
    answer its lanes."""
    source, observed = key[2], key[6]
    sites = group.requests
    first = sites[0][FN]
    try:
        stacker = phase.shared.stacker
        params = [stacker.stack(column) for column in zip(*group.params, strict=True)]
        fn = build(key[1], params, phase.shared.validate)
        if fn.batch_shape[1:] != first.batch_shape or fn.event_shape != first.event_shape:
            raise ValueError(f"stacked shape {fn.batch_shape} + {fn.event_shape}")
    except (ValueError, RuntimeError, TypeError) as e:
        warn_once(f"site '{sites[0][NAME]}' ({type(first).__name__})", str(e))
        for lane, output in zip(group.lanes, _lane_sites(phase, group), strict=True):
            lane.answer = output
        return
    if source == "draw":
        value = fn.rsample() if fn.has_rsample else fn.sample()
        if phase.spec.detach:
            value = value.detach()
        views = phase.shared.stacker.unbind(value)
    else:
        views = group.given
        value = phase.shared.stacker.stack(views)
        dims = len(first.batch_shape) + len(first.event_shape)
        if views[0].dim() < dims:  # an observation that broadcasts: align it on the right
            pad = (1,) * (dims - views[0].dim())
            value = value.reshape((len(views),) + pad + views[0].shape)
    _record(phase, group, fn.log_prob(value), not fn.has_rsample)
    _keep(phase, group, views, observed)


def _lane_sites(phase: Any, group: Group) -> list:
    """Sites that cannot be stacked, each drawn and scored in its own lane."""
    outputs = []
    for i, site in enumerate(group.requests):
        one = Group([(group.lanes[i], site, None, group.given[i])])
        fn, value = site[FN], group.given[i]
        if value is None:
            value = fn.rsample() if fn.has_rsample else fn.sample()
            if phase.spec.detach:
                value = value.detach()
        _record(phase, one, fn.log_prob(value).unsqueeze(0), not fn.has_rsample)
        _keep(phase, one, [value], site[OBSERVED])
        outputs.append(value)
    return outputs


def _keep(phase: Any, group: Group, views: Any, observed: bool) -> None:
    """Answer the lanes with their values and remember them, for the next
    phase's replay and the sleep's observations."""
    for lane, site, view in zip(group.lanes, group.requests, views, strict=True):
        lane.answer = view
        lane.values[site[NAME]] = view
    if observed:
        for lane, site, view in zip(group.lanes, group.requests, views, strict=True):
            phase.observed.setdefault(lane.index, {})[site[NAME]] = view


def _record(phase: Any, group: Group, log_prob: torch.Tensor, score: bool) -> None:
    """Add each lane's masked and scaled log density (summed over its inner
    plates and event dims) to the lane's terms."""
    sites = group.requests
    n, shape = log_prob.shape[0], log_prob.shape[1:]
    unscaled = log_prob
    if sites[0][MASK] is not None:
        mask = torch.stack([as_lane_tensor(site[MASK]).expand(shape) for site in sites])
        unscaled = torch.where(mask, log_prob, log_prob.new_zeros(()))
    scaled = unscaled * _scales([site[SCALE] for site in sites], shape, log_prob)
    ids = [lane.index for lane in group.lanes]
    if log_prob.dim() > 1:
        scaled, unscaled = scaled.reshape(n, -1).sum(1), unscaled.reshape(n, -1).sum(1)
    phase.terms.append((ids, scaled))
    phase.names.append((ids, sites, scaled))
    if score and phase.spec.role == "guide":
        phase.score_terms.append((ids, unscaled))


def _scales(scales: list, shape: torch.Size, like: torch.Tensor) -> torch.Tensor | float:
    """The sites' scales, `[n, 1, ...]` (or one number when they agree)."""
    first = scales[0]
    if type(first) is float and scales.count(first) == len(scales):
        return first
    if not any(isinstance(s, torch.Tensor) for s in scales):
        return like.new_tensor(scales).reshape((len(scales),) + (1,) * len(shape))
    return torch.stack([as_lane_tensor(s).expand(shape) for s in scales]).to(like.dtype)


def _calls(shared: Any, key: tuple, group: Group) -> list:
    """One call of the module for the group; lane by lane where that is not exact."""
    call = group.requests[0]
    method = getattr(call.module, call.attr)
    calls = [(request.args, request.kwargs) for request in group.requests]
    if len(calls) == 1 or same_objects(calls):  # e.g. an encoder of the whole minibatch
        return [method(*call.args, **call.kwargs)] * len(calls)
    if key not in shared.unbatchable:
        try:
            outputs = stacked_call(method, calls, shared.stacker)
            if key not in shared.verified:
                with torch.no_grad():
                    reference = method(*call.args, **call.kwargs)
                if not same_output(reference, outputs[0]):
                    raise ValueError("its stacked output differs from its lane's own")
                shared.verified.add(key)
            return outputs
        except (ValueError, RuntimeError, TypeError, IndexError) as e:
            shared.unbatchable.add(key)
            warn_once(f"module call '{call.name}.{call.attr}'", str(e))
    return [method(*args, **kwargs) for args, kwargs in calls]
