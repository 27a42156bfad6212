r"""Data-parallel training with `torch.distributed`, equal to one process.

Each rank holds a shard of the minibatch (`B_r` data; shards may differ in
size). Every batchplate objective reduces per-datum values `L_b` as
`L = (c/B) sum_b L_b` with `c = 1` (`reduction="mean"`) or `c = N`
(`reduction="sum"`, `N` the dataset size); see the Contract page
(`docs/contract.md`). Over the concatenated batch of `B = sum_r B_r` data this is a weighted
sum of the ranks' local values `L_r = (c_r/B_r) sum_{b in r} L_b`:

$$
L = \sum_r f_r L_r, \qquad f_r = \frac{c\,B_r}{c_r\,B},
$$

so `f_r = B_r / B` for the mean (the shard-weighted mean) and for a
subsampled sum (all ranks share `N`), and `f_r = 1` for the sum over
unsubsampled shards (`c = B`, `c_r = B_r`). Gradients are linear in the
same way, so each rank back-propagates `f_r L_r` and the gradients are
summed over ranks (one all-reduce of one flat bucket). The result equals the
single-process loss and gradient on the concatenated batch with the same
random draws, up to floating-point summation order.

`DistributedObjective` wraps any batchplate objective and works under
`pyro.infer.SVI` and in plain PyTorch loops (`differentiable_loss`,
`backward`, then `sync_gradients`). `gather_per_datum` collects per-datum
results such as `batchplate.log_evidence` from all ranks. `init_distributed`
starts a process group from `torchrun`'s environment with a bounded timeout,
so a failed or hung rank ends the run with an error instead of a hang.
`python -m batchplate.distributed_selftest --nproc 2` checks the equivalence
on local processes.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
from pyro import poutine
from pyro.infer.elbo import ELBO

from .errors import BatchPlateError
from .objectives.base import BatchObjective, Losses, atomic_backward

__all__ = [
    "DistributedObjective",
    "distributed_log_evidence",
    "gather_per_datum",
    "init_distributed",
    "objective_config",
    "shard_indices",
    "sync_gradients",
]

#: Default process-group timeout: collectives that wait longer raise.
DEFAULT_TIMEOUT = datetime.timedelta(seconds=300)


# ---------------------------------------------------------------------------
# Process group
# ---------------------------------------------------------------------------


def init_distributed(
    backend: str | None = None,
    timeout: float | datetime.timedelta = DEFAULT_TIMEOUT,
) -> tuple[int, int, torch.device]:
    """Start the default process group from `torchrun`'s environment.

    Reads `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and
    `MASTER_PORT` (`torchrun` sets them). The backend is NCCL when CUDA is
    available (each process then uses GPU `LOCAL_RANK`), gloo otherwise.
    `timeout` bounds every collective, the initial rendezvous included: a
    rank that dies or hangs makes the others raise after `timeout` instead of
    waiting forever. Started without `torchrun` (no `RANK`/`WORLD_SIZE`
    in the environment), it forms a group of one process, so the same script
    runs with plain `python`.

    :returns: `(rank, world_size, device)`.
    """
    if not isinstance(timeout, datetime.timedelta):
        timeout = datetime.timedelta(seconds=float(timeout))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:  # started without torchrun: a group of one process, on a free loopback port
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            dist.init_process_group(
                backend=backend,
                init_method=f"tcp://127.0.0.1:{port}",
                rank=0,
                world_size=1,
                timeout=timeout,
            )
    return dist.get_rank(), dist.get_world_size(), device


def _check_initialized() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "batchplate.distributed needs an initialized torch.distributed process group: call "
            "batchplate.distributed.init_distributed() (or torch.distributed.init_process_group) "
            "first, e.g. in a script started by `torchrun --nproc_per_node=2 script.py`."
        )


def shard_indices(
    size: int, rank: int | None = None, world_size: int | None = None
) -> torch.Tensor:
    """The contiguous block of `range(size)` that rank `rank` holds.

    Blocks differ in size by at most one and, concatenated in rank order, give
    `range(size)`, so the ranks' shards together are exactly the
    single-process batch (unlike a padded `DistributedSampler`).
    """
    if rank is None:
        rank = dist.get_rank()
    if world_size is None:
        world_size = dist.get_world_size()
    base, extra = divmod(size, world_size)
    start = rank * base + min(rank, extra)
    return torch.arange(start, start + base + (rank < extra))


# ---------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------


def _buckets(tensors: Sequence[torch.Tensor]) -> dict[tuple, list[int]]:
    """Group positions by (device, dtype): one flat all-reduce per group."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


def _all_reduce_flat(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    """SUM-all-reduce a list of tensors through one flat buffer per (device, dtype)."""
    out: list[torch.Tensor] = list(tensors)
    for idx in _buckets(tensors).values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for i in idx:
            n = tensors[i].numel()
            out[i] = flat[offset : offset + n].view_as(tensors[i])
            offset += n
    return out


def _sum_gradients(
    params: Sequence[torch.Tensor], before: Sequence[torch.Tensor | None], group
) -> None:
    """Replace each `.grad` by `before + sum over ranks of (.grad - before)`.

    A `None` gradient counts as zero and stays `None` only if it is `None`
    on every rank (a presence flag travels in the same bucket).
    """
    if not params:
        return
    deltas = []
    for p, b in zip(params, before, strict=True):
        if p.grad is None:
            deltas.append(torch.zeros_like(p))
        else:
            deltas.append(p.grad.detach() if b is None else p.grad.detach() - b)
    present = [p.grad is not None for p in params]
    flags = torch.tensor(present, dtype=deltas[0].dtype, device=deltas[0].device)
    reduced = _all_reduce_flat([*deltas, flags], group)
    for p, b, g, has in zip(params, before, reduced[:-1], reduced[-1].tolist(), strict=True):
        if b is not None:
            p.grad = b + g
        elif has > 0:
            p.grad = g.clone()


def sync_gradients(params: Iterable[torch.Tensor], group=None) -> None:
    """Sum the `.grad` of `params` over ranks, in place.

    For plain PyTorch loops with `DistributedObjective.differentiable_loss`:
    each rank's loss is already weighted by its share of the global batch, so
    the sum of the ranks' gradients is the single-process gradient. Call it
    after `zero_grad()` and `backward()`, before `step()`, with the same
    parameters in the same order on every rank (e.g. `module.parameters()`).
    A parameter whose gradient is `None` counts as zero; it keeps `None`
    only if it is `None` on every rank.
    """
    _check_initialized()
    params = list(params)
    _sum_gradients(params, [None] * len(params), group)


# ---------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------


def _param_tensors(trace) -> dict[str, torch.Tensor]:
    """The unconstrained leaf tensors of the trace's param sites, by name (sorted, so that
    every rank lists them in the same order)."""
    params = {}
    for name in sorted(trace.nodes):
        site = trace.nodes[name]
        if site["type"] == "param":
            value = site["value"]
            params[name] = value.unconstrained() if hasattr(value, "unconstrained") else value
    return params


def _signature(params: dict[str, torch.Tensor]) -> int:
    """A checksum of the parameter names and shapes, to check that ranks agree."""
    text = ";".join(f"{n}:{tuple(params[n].shape)}" for n in sorted(params))
    return zlib.crc32(text.encode())


def _result(losses: Losses, total: Sequence[torch.Tensor]) -> float | tuple[float, ...]:
    """The global losses in the objective's own return shape (`Losses.result`)."""
    return dataclasses.replace(losses, values=tuple(total)).result()


#: Attributes that are state, not settings: `max_plate_nesting` is guessed on the first step,
#: `strict_enumeration_warning` is a warn-once flag that the first step switches off.
_NOT_SETTINGS = frozenset({"max_plate_nesting", "strict_enumeration_warning"})
_PLAIN = (bool, int, float, str, type(None), tuple, dict)


def objective_config(objective: BatchObjective, dataset_size: int | None = None) -> dict:
    """The settings that must be equal on every rank, by name, as `repr` strings.

    The objective's class and every public attribute of a plain type (`reduction`,
    `num_particles`, `alpha`, `insomnia`, `estimator`, `vectorize_particles`, ...), so
    a setting added to an objective later is compared without being listed here.
    """
    config = {"type": f"{type(objective).__module__}.{type(objective).__qualname__}"}
    for name, value in sorted(vars(objective).items()):
        if not name.startswith("_") and name not in _NOT_SETTINGS and isinstance(value, _PLAIN):
            config[name] = repr(value)
    config["dataset_size"] = repr(dataset_size)
    return config


def _config_checksum(config: dict) -> int:
    return zlib.crc32("\n".join(f"{k}={v}" for k, v in config.items()).encode())


def _differences(configs: list[dict]) -> str:
    """The settings that differ between ranks, one line each: `name: rank 0 x, rank 1 y`."""
    names = sorted({k for c in configs for k in c}, key=lambda k: (k != "type", k))
    lines = []
    for name in names:
        values = [c.get(name, "(none)") for c in configs]
        if len(set(values)) > 1:
            lines.append(f"  {name}: " + ", ".join(f"rank {r} {v}" for r, v in enumerate(values)))
    return "\n".join(lines)


def _holds_no_data(error: BaseException | None) -> bool:
    """Whether a rank's step failed because its batch plate is empty (batchplate's own
    messages for a size of 0 and an empty subsample)."""
    text = str(error)
    return isinstance(error, BatchPlateError) and (
        "size must be a positive int, got 0" in text or "subsample is empty" in text
    )


# Columns of the row each rank contributes to the exchange; the losses follow.
_OK, _SIZE, _FULL, _NPARAMS, _SIG, _CONFIG, _NLOSSES = range(7)
_MAX_LOSSES = 4  # slots for the losses (reweighted wake-sleep has 2), so that rows align


@dataclass
class _Step:
    """One rank's forward pass: its losses and parameters, or why it failed."""

    losses: Losses | None
    params: dict[str, torch.Tensor]
    failure: Exception | None


class DistributedObjective(ELBO):
    r"""Run a batchplate objective data-parallel, with single-process results.

    Each rank calls the wrapper with its own shard of the minibatch; the
    program's batch plate is the shard's (`batch_plate("data", B_r)`, or
    `batch_plate("data", N, subsample=idx_r)` with the rank's dataset
    indices). The returned loss is the global loss on the concatenated batch
    and, after `loss_and_grads`, every parameter the program touched holds
    the global gradient on every rank, so identical optimizers keep identical
    parameters.

    How: the objective's `local_losses` gives the rank's loss tensors and its
    batch plate; one `all_gather` of each rank's batch size `B_r`, dataset size
    `N_r`, local losses, parameter checksum, objective settings checksum and
    success gives every rank the shares `f_r` (`rank_shares`: `B_r / B` for the
    mean and for a subsampled sum, `1` for the sum over unsubsampled shards) and
    the global losses; the rank back-propagates `f_r` times its local losses;
    one all-reduce of a flat gradient bucket, which carries a failure flag too,
    sums the gradients.

    Every step is agreed by all ranks, so no rank goes on alone and none waits
    for a peer that gave up:

    - ranks that run different objective settings (`objective_config`: class,
      `reduction`, `num_particles`, `alpha`, `insomnia`, `estimator`,
      `vectorize_particles`, ...) fail, each with the same `BatchPlateError`
      listing the differences;
    - a rank whose forward pass fails (no data, a non-finite loss, any error)
      makes every rank raise the same `BatchPlateError`, naming the rank and
      its error, before any gradient is computed;
    - the backward pass is atomic on all ranks (`atomic_backward`): if any
      rank's gradient is non-finite or its backward pass raises, every rank's
      `.grad` is left as it was and every rank raises.

    Randomness: the equality with one process holds for the same draws. Ranks
    draw their own particles, which is as good statistically (independent
    draws per datum); for bit-level comparisons draw each datum's noise from a
    stream seeded by its global index (the self-test does).

    An objective with several losses returns them all, each global:
    `batchplate.ReweightedWakeSleep` returns its pair
    `(wake_theta_loss, phi_loss)`. Its sleep phase fantasizes `(z, x) ~ p` for
    every datum slot of the rank's batch plate, so the ranks together draw `B`
    fantasies per sleep particle, as one process on the concatenated batch;
    the sleep loss is their shard-weighted mean.

    Usage under SVI:

    ```python
    init_distributed()
    loss = DistributedObjective(RenyiELBO(alpha=0, num_particles=5))
    svi = SVI(model, guide, Adam({"lr": 1e-3}), loss)
    svi.step(x_shard)  # global loss; synchronized gradients
    ```

    Plain PyTorch:

    ```python
    loss = dobj.differentiable_loss(model, guide, x_shard)
    opt.zero_grad()
    loss.backward()
    sync_gradients(module.parameters())
    opt.step()
    ```

    :param objective: a `batchplate.BatchObjective`.
    :param group: the process group (default: the world).
    :param dataset_size: `N` for `reduction="sum"` when it cannot be read
        from the batch plates (see `rank_shares`); ignored for the mean.
    """

    def __init__(
        self, objective: BatchObjective, group=None, dataset_size: int | None = None
    ) -> None:
        if not isinstance(objective, BatchObjective):
            raise TypeError(
                "DistributedObjective wraps a batchplate objective (Trace_ELBO, RenyiELBO, "
                f"VIMCO, ReweightedWakeSleep), got {type(objective).__name__}"
            )
        super().__init__(num_particles=objective.num_particles)
        self.objective = objective
        self.group = group
        self.dataset_size = dataset_size

    # -- each rank's share ---------------------------------------------------

    def rank_shares(self, table: torch.Tensor) -> torch.Tensor:
        """Each rank's share `f_r` of the global loss: `L = sum_r f_r L_r`.

        :param table: the gathered `[R, >= 2]` table whose first two columns are
            each rank's batch size `B_r` and dataset size `N_r`.
        :returns: `[R]`: `B_r / B` for the mean and for a subsampled sum (all
            ranks share `N`), `1` for the sum over unsubsampled shards, and
            `(N / B) (B_r / N_r)` with `dataset_size=N`.
        """
        B_r, N_r = table[:, 0], table[:, 1]
        B = B_r.sum()
        if self.objective.reduction == "mean":
            return B_r / B
        if self.dataset_size is not None:
            N = float(self.dataset_size)
        elif bool((B_r == N_r).all()):
            N = B  # every shard is its own (unsubsampled) batch plate: a plain sum
        elif bool((N_r == N_r[0]).all()):
            N = N_r[0]  # subsample indices from one dataset of size N
        else:
            raise ValueError(
                "reduction='sum' needs the dataset size N, and the ranks' batch plates disagree: "
                f"sizes {N_r.long().tolist()} for shards of {B_r.long().tolist()} data. Use "
                "batch_plate('data', N, subsample=indices) with the same N on every rank, or "
                "pass DistributedObjective(..., dataset_size=N)."
            )
        return (N / B) * (B_r / N_r)

    def config(self) -> dict:
        """This rank's settings that every rank must share (see `objective_config`)."""
        return objective_config(self.objective, self.dataset_size)

    # -- the exchange ----------------------------------------------------------

    def _device(self) -> torch.device:
        # NCCL exchanges on this process's GPU, gloo on the CPU.
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _row(self, step: _Step, values: Sequence[torch.Tensor]) -> torch.Tensor:
        """This rank's row of the exchange (zeros where a failed step knows nothing)."""
        ok = step.failure is None
        floats = [float(v.detach()) for v in values] if ok else []
        batch = step.losses.batch if ok else None
        row = [
            float(ok),
            batch.size if ok else 0,
            batch.full_size if ok else 0,
            len(step.params),
            _signature(step.params),
            _config_checksum(self.config()),
            len(floats),
            *floats,
            *[0.0] * (_MAX_LOSSES - len(floats)),
        ]
        return torch.tensor(row, dtype=torch.float64, device=self._device())

    def _exchange(
        self, step: _Step, values: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """All-gather every rank's row; check that the ranks can take this step together
        (raising the same error on every rank if not); return `(f_r, global losses)`."""
        row = self._row(step, values)
        rows = [torch.empty_like(row) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(rows, row, group=self.group)
        table = torch.stack(rows).cpu()
        self._check_table(table, step)
        f = self.rank_shares(table[:, [_SIZE, _FULL]])
        count = int(table[0, _NLOSSES])
        columns = table[:, _NLOSSES + 1 : _NLOSSES + 1 + count]
        return f, [(f * columns[:, i]).sum() for i in range(count)]

    def _check_table(self, table: torch.Tensor, step: _Step) -> None:
        """Raise on every rank alike if the ranks' settings differ or any rank failed."""
        if not bool((table[:, _CONFIG] == table[0, _CONFIG]).all()):
            configs = self._gather_objects(self.config())
            raise BatchPlateError(
                "DistributedObjective: the ranks run different objective settings, so their "
                "losses and gradients cannot be combined (no rank took this step):\n"
                f"{_differences(configs)}\n"
                "Build the same objective (class and keyword arguments) on every rank."
            )
        if not bool(table[:, _OK].all()):
            self._fail(step.failure, "forward pass")
        if not bool((table[:, _NPARAMS : _SIG + 1] == table[0, _NPARAMS : _SIG + 1]).all()):
            raise RuntimeError(
                "ranks touched different parameters in this step (counts "
                f"{table[:, _NPARAMS].long().tolist()}); every rank must run the same model and "
                "guide and create the same pyro.param sites, so that gradients can be summed."
            )

    def _gather_objects(self, obj: object) -> list:
        """Every rank's `obj` (pickled): only on a failure path, to put details in messages."""
        out: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def _fail(self, failure: BaseException | None, where: str) -> NoReturn:
        """Raise, on every rank, one `BatchPlateError` naming the ranks that failed and why
        (called by all ranks together: it exchanges the messages)."""
        mine = None
        if failure is not None:
            mine = (f"{type(failure).__name__}: {failure}", _holds_no_data(failure))
        reports = self._gather_objects(mine)
        failed = {r: report for r, report in enumerate(reports) if report is not None}
        world = len(reports)
        empty = [r for r, (_, no_data) in failed.items() if no_data]
        if empty:
            head = (
                f"DistributedObjective: rank(s) {empty} of {world} hold no data (an empty batch "
                "plate), and every rank needs at least one datum of the minibatch. Give every "
                f"rank a shard of a minibatch of at least {world} data (shard_indices(B) does "
                "when B >= world size), or start fewer ranks. No rank took this step."
            )
        else:
            head = (
                f"DistributedObjective: rank(s) {sorted(failed)} of {world} failed in the "
                f"{where}, so no rank took this step (every rank's .grad is as it was)."
            )
        details = "\n".join(f"  rank {r}: {message}" for r, (message, _) in failed.items())
        raise BatchPlateError(f"{head}\n{details}") from failure

    def _sum_step_gradients(
        self, params: dict[str, torch.Tensor], failure: BaseException | None
    ) -> None:
        """`atomic_backward`'s combine: sum this step's gradients over ranks, or, if any
        rank failed (its flag rides in the same all-reduce), raise on every rank."""
        tensors = list(params.values())
        ok = failure is None
        deltas = [
            p.grad.detach() if ok and p.grad is not None else torch.zeros_like(p) for p in tensors
        ]
        flags = [float(ok and p.grad is not None) for p in tensors] + [float(not ok)]
        dtype = deltas[0].dtype if deltas else torch.float64
        device = deltas[0].device if deltas else self._device()
        flag_tensor = torch.tensor(flags, dtype=dtype, device=device)
        *sums, counts = _all_reduce_flat([*deltas, flag_tensor], self.group)
        counts = counts.tolist()
        if counts[-1] > 0:
            self._fail(failure, "backward pass")
        for p, g, present in zip(tensors, sums, counts[:-1], strict=True):
            p.grad = g.clone() if present > 0 else None

    # -- Pyro's interface ---------------------------------------------------

    def _local(self, model, guide, args, kwargs) -> _Step:
        """Run the objective on this rank's shard; keep a failure to tell the peers."""
        _check_initialized()
        try:
            with poutine.trace(param_only=True) as capture:
                losses = self.objective.local_losses(model, guide, *args, **kwargs)
            if losses.batch is None:
                raise RuntimeError("the objective reported no batch plate; nothing to synchronize")
            if len(losses.values) > _MAX_LOSSES:
                raise RuntimeError(f"at most {_MAX_LOSSES} losses can be synchronized")
            losses.check_finite()
        except Exception as e:  # the peers wait in the exchange: tell them, then raise
            return _Step(None, {}, e)
        return _Step(losses, _param_tensors(capture.trace), None)

    def _share(self, f: torch.Tensor) -> float:
        return float(f[dist.get_rank(self.group)])

    def loss(self, model: Callable, guide: Callable, *args, **kwargs):
        """The global loss, without gradients.

        :returns: a float, or a tuple of floats for an objective with several
            losses (reweighted wake-sleep's `(wake_theta_loss, phi_loss)`).
        """
        with torch.no_grad():
            step = self._local(model, guide, args, kwargs)
            _, total = self._exchange(step, step.losses.values if step.losses else ())
        return _result(step.losses, total)

    def loss_and_grads(self, model: Callable, guide: Callable, *args, **kwargs):
        """The global loss; leaves the global gradient in every touched parameter's `.grad`.

        Gradients already present are kept and the step's gradient is added
        (as Pyro's objectives do), so gradient accumulation works too. The step
        is atomic on all ranks: if any rank fails, every rank raises the same
        `BatchPlateError` and keeps its `.grad` as it was.

        :returns: as `loss`.
        """
        step = self._local(model, guide, args, kwargs)
        f, total = self._exchange(step, step.losses.values if step.losses else ())
        surrogate = self._share(f) * step.losses.total()
        if not surrogate.requires_grad:
            # Every rank must take part in the gradient all-reduce, even without a gradient.
            surrogate = surrogate + torch.zeros((), requires_grad=True)
        retain = self.objective.retain_graph
        atomic_backward(surrogate, step.params, retain, combine=self._sum_step_gradients)
        return _result(step.losses, total)

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs):
        """A scalar whose value is the global loss and whose gradient is this rank's share.

        After `backward()`, sum gradients over ranks with `sync_gradients`.
        The scalar is the wrapped objective's `differentiable_loss`: for
        reweighted wake-sleep `wake_theta + phi` (each reaches its own
        parameters), or `phi` when the wake-theta phase is skipped.
        """
        step = self._local(model, guide, args, kwargs)
        local = step.losses.total() if step.losses else None
        f, total = self._exchange(step, [local] if step.losses else ())
        local = self._share(f) * local
        # The value of the global loss, the gradient of this rank's share of it.
        return local + (total[0].to(local) - local.detach())

    def _get_trace(self, model, guide, args, kwargs):  # pragma: no cover - ELBO's abstract hook
        raise NotImplementedError


# ---------------------------------------------------------------------------
# Per-datum results
# ---------------------------------------------------------------------------


def gather_per_datum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's per-datum tensor `[B_r, ...]` in rank order.

    Shards may differ in size: each rank pads to the largest `B_r` for
    `all_gather` and the padding is dropped. Every rank gets the `[B, ...]`
    result, which is the single-process result when the shards are the
    single-process batch split in rank order (as `shard_indices` gives).
    """
    _check_initialized()
    world = dist.get_world_size(group)
    size = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])


def distributed_log_evidence(
    model: Callable, guide: Callable, *args, group=None, **kwargs
) -> torch.Tensor:
    """`batchplate.log_evidence` on each rank's shard, gathered: `[B]` on every rank.

    `log_evidence` is per datum, so ranks need no communication while
    estimating; only the results are gathered (`gather_per_datum`).
    """
    from .evaluate import log_evidence

    return gather_per_datum(log_evidence(model, guide, *args, **kwargs), group=group)
