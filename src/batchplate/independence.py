"""An opt-in check that data points do not influence each other: autograd and permutation.

Two complementary tests of the same property, "datum `b`'s log weight depends on
datum `b` only". The autograd check finds every dependence that has a gradient
(batch normalization, attention across the batch); the permutation check re-runs
the program on the minibatch reordered, halved and datum by datum, replaying each datum's
latents with it, and finds dependence without a gradient too (a comparison with
the batch median, a detached batch mean, the datum's position).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from pyro.infer.autoguide import AutoGuide
from pyro.infer.util import site_is_subsample
from pyro.poutine import Trace
from pyro.poutine.messenger import Messenger
from torch.nn.utils.rnn import PackedSequence

from .draw import adopt_batch_frames, draw_particles, subsample_indices
from .errors import BatchPlateError
from .plate import BatchInfo, batch_frame
from .weights import compute_log_weights


@dataclass
class IndependenceReport:
    """Which data's log weights depend on which other data's inputs."""

    batch_size: int
    inputs_checked: list[str]
    coupled: dict[int, list[int]] = field(default_factory=dict)
    """datum -> the other data (minibatch positions) whose inputs it depends on."""
    moved: dict[int, float] = field(default_factory=dict)
    """datum -> how far (nats) its log weight moved when the minibatch was reordered
    or split with its latents replayed (the permutation check)."""
    permutation_checked: bool = True
    """Whether the permutation check ran (it is skipped, with a warning, for a
    program whose log weights are not reproducible from its latents)."""

    @property
    def independent(self) -> bool:
        return not self.coupled and not self.moved

    def __str__(self) -> str:
        if self.independent:
            return (
                f"all {self.batch_size} data independent "
                f"(inputs checked: {', '.join(self.inputs_checked)})"
            )
        lines = [
            f"datum {b} depends on the inputs of data {others}"
            for b, others in sorted(self.coupled.items())[:10]
        ]
        more = len(self.coupled) - 10
        if more > 0:
            lines.append(f"... and {more} more data")
        if self.moved:
            worst = max(self.moved.values())
            lines.append(
                f"data {_listed(sorted(self.moved))} change their log weight (by up to "
                f"{worst:.3g} nats) when the minibatch is reordered or split, down to single "
                "data, with the same latents: they depend on other data or on their position "
                "in the minibatch"
            )
        return "\n".join(lines)


def _listed(items: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}]"


def _map_tensors(args: tuple, kwargs: dict, fn: Callable[[str, Any], Any]) -> tuple:
    """`(args, kwargs)` with `fn(label, x)` applied to every leaf, at any depth."""

    def walk(x, label):
        # Any nesting of lists, tuples, namedtuples and dicts. A PackedSequence's
        # rows are time steps, not data, so it is passed through as it is.
        if isinstance(x, PackedSequence):
            return x
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            return type(x)._make(walk(v, f"{label}.{f}") for f, v in zip(x._fields, x, strict=True))
        if isinstance(x, (list, tuple)):
            return type(x)(walk(v, f"{label}[{i}]") for i, v in enumerate(x))
        if isinstance(x, dict):
            return type(x)((k, walk(v, f"{label}[{k!r}]")) for k, v in x.items())
        return fn(label, x)

    new_args = tuple(walk(a, f"args[{i}]") for i, a in enumerate(args))
    return new_args, {k: walk(v, k) for k, v in kwargs.items()}


def _floating_inputs(args: tuple, kwargs: dict):
    """Replace floating tensors among the arguments (at any depth) by leaves that need grad."""
    found: list[tuple[str, torch.Tensor]] = []

    def lift(label, x):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() >= 1:
            leaf = x.detach().clone().requires_grad_(True)
            found.append((label, leaf))
            return leaf
        return x

    new_args, new_kwargs = _map_tensors(args, kwargs, lift)
    return new_args, new_kwargs, found


def check_batch_independence(
    model: Callable, guide: Callable, *args, raise_error: bool = True, **kwargs
) -> IndependenceReport:
    """Check that datum `b`'s log weight depends only on datum `b`'s inputs.

    Coupling invisible in the program's structure — batch normalization in
    training mode in an encoder, attention across the batch, a statistic of
    the whole minibatch — makes the per-datum objectives wrong. This draws one
    particle and runs two checks on it:

    - autograd: it differentiates each datum's log weight `l[0, b]` with
      respect to every floating-point tensor argument whose leading dimension
      is the minibatch size `B` (row `b` is datum `b`) or the dataset size `N`
      (row `subsample[b]` is datum `b`), and reports every datum whose weight
      has a non-zero derivative with respect to another datum's row;
    - permutation: it runs the program again on the minibatch reordered, on
      each half and on up to 16 single data, replaying every datum's latents
      with the datum (rows of `[B, ...]` tensor arguments, or the subsample
      indices, are reordered), and reports every datum whose log weight moved:
      coupling without a gradient too (`x > x.median()`, `x.mean().detach()`,
      the position). It warns and skips what it cannot do: weights not
      reproducible from the latents (dropout in training mode), parts of the
      minibatch the program cannot run on (a fixed size).

    It costs `B` backward and up to 20 forward passes: run it once, not in the
    training loop. Modules are used in whatever mode they are in.

    :param raise_error: raise `BatchPlateError` when data are coupled
        (default); otherwise return the report.
    :returns: an `IndependenceReport`.
    """
    new_args, new_kwargs, inputs = _floating_inputs(args, kwargs)
    if not inputs:
        raise ValueError(
            "check_batch_independence differentiates with respect to the data, so it needs "
            "the data as floating-point tensor arguments of model and guide."
        )
    weights = _one_particle(model, guide, new_args, new_kwargs)
    batch = weights.batch

    rows = _Rows(batch, subsample_indices(weights.pair[0], batch.name))
    checked = [(label, x) for label, x in inputs if rows.of(0, x) is not None]
    if not checked:
        raise ValueError(
            f"No floating-point tensor argument has the minibatch size {batch.size} "
            f"(or the dataset size {batch.full_size}) as its leading dimension; "
            "check_batch_independence cannot tell which input belongs to which datum."
        )
    report = IndependenceReport(batch.size, [label for label, _ in checked])
    report.coupled = _coupled_data(weights.log_w[0], checked, rows)
    with torch.no_grad():
        runs = _Reruns(model, guide, args, kwargs, weights)
        report.moved, report.permutation_checked = runs.moved()
    if raise_error and not report.independent:
        raise coupled_error(batch, report)
    return report


def _one_particle(model: Callable, guide: Callable, args: tuple, kwargs: dict, **draw):
    """The log weights of one particle, one trace pair (with `draw_particles` keywords)."""
    particles = draw_particles(
        model,
        guide,
        args,
        kwargs,
        num_particles=1,
        vectorize_particles=False,
        max_plate_nesting=float("inf"),
        **draw,
    )
    return compute_log_weights(particles)


def coupled_error(batch: BatchInfo, report: IndependenceReport) -> BatchPlateError:
    return BatchPlateError(
        f"Data of batch plate '{batch.name}' are coupled: a datum's log weight depends on "
        f"other data ({', '.join(report.inputs_checked)}):\n{report}\n"
        "Typical causes: batch normalization in training mode, attention or pooling "
        "across the batch, or statistics of the whole minibatch in model or guide (with "
        "or without a gradient: a detached mean, a comparison with the median). "
        "Per-datum objectives assume each datum's weight depends on that datum only."
    )


class _Rows:
    """Which input row holds datum `b`: row `b` of a `[B, ...]` input, row
    `subsample[b]` of a `[N, ...]` one (and back, for the report)."""

    def __init__(self, batch: BatchInfo, subsample: torch.Tensor | None) -> None:
        self.batch = batch
        self.subsample = subsample

    def of(self, b: int, x: torch.Tensor) -> int | None:
        if x.shape[0] == self.batch.size:
            return b
        if self.subsample is not None and x.shape[0] == self.batch.full_size:
            return int(self.subsample[b])
        return None

    def datum(self, row: int, x: torch.Tensor) -> int:
        """The minibatch position of input row `row` (the row itself if no datum has it)."""
        if x.shape[0] == self.batch.size or self.subsample is None:
            return row
        matches = (self.subsample == row).nonzero()
        return int(matches[0]) if len(matches) else row


def _coupled_data(log_w: torch.Tensor, checked: list, rows: _Rows) -> dict:
    """datum -> the other data whose input rows have a non-zero derivative of its weight."""
    coupled = {}
    leaves = [x for _, x in checked]
    for b in range(log_w.shape[0]):
        if not log_w[b].requires_grad:
            continue
        grads = torch.autograd.grad(log_w[b], leaves, retain_graph=True, allow_unused=True)
        others = set()
        for x, g in zip(leaves, grads, strict=True):
            if g is None:
                continue
            nonzero = (g.reshape(g.shape[0], -1) != 0).any(1).nonzero().flatten().tolist()
            others.update(rows.datum(r, x) for r in nonzero if r != rows.of(b, x))
        if others:
            coupled[b] = sorted(others)
    return coupled


# -- the permutation check -----------------------------------------------------------


class _ReplayByDatum(Messenger):
    """Give each guide site of the datum now at position `p` the value that datum's
    site had in the first run (`order[p]` is its first-run position).

    Vectorized batch plate: a site's value, reordered along the plate's dim.
    Sequential: the `k`-th latent site of position `p` gets the `k`-th latent of
    datum `order[p]`, whatever the sites are called (names often carry the
    position). Sites outside the batch plate get their first-run value.
    """

    def __init__(self, guide_trace: Trace, order: torch.Tensor) -> None:
        super().__init__()
        self.order = order.tolist()
        self.by_name: dict[str, torch.Tensor] = {}
        self.by_datum: dict[int, list[torch.Tensor]] = {}
        self.seen: Counter = Counter()
        for name, site in guide_trace.nodes.items():
            if not _replayable(site):
                continue
            frame = batch_frame(site)
            if frame is None:
                self.by_name[name] = site["value"]
            elif frame.vectorized:
                dim = frame.dim - site["fn"].event_dim
                self.by_name[name] = site["value"].index_select(dim, order)
            else:
                self.by_datum.setdefault(frame.datum, []).append(site["value"])

    def _pyro_sample(self, msg: dict) -> None:
        if not _replayable(msg):
            return
        frame = batch_frame(msg)
        if frame is None or frame.vectorized:
            value = self.by_name.get(msg["name"])
        else:
            k, first_run = self.seen[frame.datum], self.by_datum.get(self.order[frame.datum], [])
            self.seen[frame.datum] += 1
            value = first_run[k] if k < len(first_run) else None
        if value is not None:  # a site the first run did not have is drawn afresh
            msg["value"] = value
            msg["done"] = True


def _replayable(site: dict) -> bool:
    return (
        site["type"] == "sample"
        and not site["is_observed"]
        and not site_is_subsample(site)
        and site["infer"].get("enumerate") is None
    )


#: How many data the permutation check also weighs alone (one forward pass each).
SINGLES = 16


class _Reruns:
    """The program re-run on reorderings of the first run's minibatch, latents replayed."""

    def __init__(self, model: Callable, guide: Callable, args: tuple, kwargs: dict, weights):
        if isinstance(guide, AutoGuide):  # draw_particles marks its batch plate; wrapped, we do
            guide = adopt_batch_frames(guide)(guide)
        self.model, self.guide, self.args, self.kwargs = model, guide, args, kwargs
        self.batch: BatchInfo = weights.batch
        self.log_w = weights.log_w[0].detach()
        self.guide_trace = weights.pair[1]
        self.subsample = subsample_indices(weights.pair[0], self.batch.name)

    def moved(self) -> tuple[dict[int, float], bool]:
        """datum -> how far its log weight moved in any rerun, and whether the check ran."""
        B = self.batch.size
        if B < 2:
            return {}, True
        if _far(self.rerun(torch.arange(B)), self.log_w).any():
            return self._skipped(
                "log weights are not reproducible from its latents (randomness outside sample "
                "sites, such as dropout in training mode?)"
            )
        order = torch.arange(B).roll(1)  # every datum moves
        half = B // 2
        # Reordered (position), halves and single data (other companions: a batch statistic
        # such as the median can survive one split by chance, not a datum left alone).
        parts = [order, order[:half], order[half:]]
        parts += [order[i : i + 1] for i in range(min(B, SINGLES))]
        moved: dict[int, float] = {}
        failures = []
        for part in parts:
            try:
                distance = self.distance(part)
            except Exception as e:  # e.g. a size fixed in the program: sub-batches cannot run
                failures.append(f"{type(e).__name__}: {e}")
                if len(part) == B:  # positions are the data's identity (a point-mass autoguide)
                    return self._skipped(f"cannot be reordered ({failures[0]})")
                continue
            for p in distance.nonzero().flatten().tolist():
                b = int(part[p])
                moved[b] = max(moved.get(b, 0.0), float(distance[p]))
        if failures:
            warnings.warn(
                f"check_batch_independence: the program did not run on {len(failures)} of "
                f"{len(parts) - 1} parts of the minibatch ({failures[0].splitlines()[0]}); the "
                "permutation check used the reordered minibatch and the parts that ran.",
                stacklevel=3,
            )
        return moved, True

    def _skipped(self, why: str) -> tuple[dict, bool]:
        warnings.warn(
            f"check_batch_independence: the program's {why}, so the permutation check was "
            "skipped; only the autograd check ran.",
            stacklevel=4,
        )
        return {}, False

    def distance(self, part: torch.Tensor) -> torch.Tensor:
        """How far each datum of `part` moved (0 within rounding).

        Without subsampling, "datum `b`" is row `b` of the `[B, ...]` inputs for a
        program that reads them whole, and index `b` of the plate for one that
        indexes data or per-datum parameters with the plate's indices (an
        `AutoNormal`): a datum moved only if it moved under both readings.
        """
        want = self.log_w[part]
        by_rows = self.batch.full_size != self.batch.size  # subsampled: one reading only
        try:
            got = self.rerun(part)
            moved = torch.where(_far(got, want), (got - want).abs(), torch.zeros_like(want))
        except BatchPlateError:  # e.g. a point-mass guide reading its values by index
            if by_rows:
                raise
            moved = torch.full_like(want, math.inf)
        if moved.any() and not by_rows:
            try:
                got = self.rerun(part, by_index=True)
            except Exception:  # a program that reads its inputs whole: the rows reading holds
                if bool(moved.isinf().any()):
                    raise
                return moved
            moved = torch.where(_far(got, want), moved.minimum((got - want).abs()), 0.0)
        return moved

    def rerun(self, order: torch.Tensor, by_index: bool = False) -> torch.Tensor:
        """`l[0, :]` of the minibatch `order` (first-run positions), latents replayed:
        the rows of `[B, ...]` tensor arguments reordered, and the plate's indices (if
        subsampled, or with `by_index` instead of the rows)."""
        B = self.batch.size
        subsampled = self.batch.full_size != B

        def reorder(label, x):
            if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == B:
                return x.detach()[order.to(x.device)]
            return x

        args, kwargs = (self.args, self.kwargs)
        if not by_index:
            args, kwargs = _map_tensors(self.args, self.kwargs, reorder)
        fixed = None
        if self.subsample is not None and (subsampled or by_index):
            fixed = Trace()
            value = self.subsample[order.to(self.subsample.device)]
            fixed.add_node(self.batch.name, type="sample", is_observed=False, value=value, infer={})
        guide = _ReplayByDatum(self.guide_trace, order)(self.guide)
        return _one_particle(self.model, guide, args, kwargs, subsample=fixed).log_w[0]


def _far(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Which entries differ by more than float rounding (batched kernels may sum in another
    order on another minibatch size): `sqrt(eps)` relative to `1 + |value|`."""
    if got.shape != want.shape:
        return torch.ones(want.shape, dtype=torch.bool)
    tol = torch.finfo(want.dtype).eps ** 0.5
    return (got - want).abs() > tol * (1 + want.abs())
