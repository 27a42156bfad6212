"""An opt-in autograd check that data points do not influence each other."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.nn.utils.rnn import PackedSequence

from .draw import draw_particles, subsample_indices
from .errors import BatchPlateError
from .plate import BatchInfo
from .weights import compute_log_weights


@dataclass
class IndependenceReport:
    """Which data's log weights depend on which other data's inputs."""

    batch_size: int
    inputs_checked: list[str]
    coupled: dict[int, list[int]] = field(default_factory=dict)
    """datum -> the other data (minibatch positions) whose inputs it depends on."""

    @property
    def independent(self) -> bool:
        return not self.coupled

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
        return "\n".join(lines)


def _floating_inputs(args: tuple, kwargs: dict):
    """Replace floating tensors among the arguments (at any depth) by leaves that need grad."""
    found: list[tuple[str, torch.Tensor]] = []

    def lift(x, label):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() >= 1:
            leaf = x.detach().clone().requires_grad_(True)
            found.append((label, leaf))
            return leaf
        return x

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
        return lift(x, label)

    new_args = tuple(walk(a, f"args[{i}]") for i, a in enumerate(args))
    new_kwargs = {k: walk(v, k) for k, v in kwargs.items()}
    return new_args, new_kwargs, found


def check_batch_independence(
    model: Callable, guide: Callable, *args, raise_error: bool = True, **kwargs
) -> IndependenceReport:
    """Check with autograd that datum `b`'s log weight depends only on datum `b`'s inputs.

    Coupling invisible in the program's structure — batch normalization in
    training mode in an encoder, attention across the batch, a statistic of
    the whole minibatch — makes the per-datum objectives wrong. This draws one
    particle, differentiates each datum's log weight `l[0, b]` with respect
    to every floating-point tensor argument whose leading dimension is the
    minibatch size `B` (row `b` is datum `b`) or the dataset size `N`
    (row `subsample[b]` is datum `b`), and reports every datum whose
    weight has a non-zero derivative with respect to another datum's row.

    It costs `B` backward passes: run it once, not in the training loop.
    Modules are used in whatever mode they are in (`train()` or `eval()`).

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
    particles = draw_particles(
        model,
        guide,
        new_args,
        new_kwargs,
        num_particles=1,
        vectorize_particles=False,
        max_plate_nesting=float("inf"),
    )
    weights = compute_log_weights(particles)
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
    if raise_error and not report.independent:
        raise BatchPlateError(
            f"Data of batch plate '{batch.name}' are coupled: a datum's log weight depends on "
            f"other data's inputs ({', '.join(report.inputs_checked)}):\n{report}\n"
            "Typical causes: batch normalization in training mode, attention or pooling "
            "across the batch, or statistics of the whole minibatch in model or guide. "
            "Per-datum objectives assume each datum's weight depends on that datum only."
        )
    return report


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
