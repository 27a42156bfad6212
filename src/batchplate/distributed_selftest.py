"""The self-test of `batchplate.distributed`: split ranks equal one process.

```bash
python -m batchplate.distributed_selftest --nproc 2
```

starts `nproc` worker processes on loopback (gloo, `127.0.0.1`, a free port
chosen by a TCP store that this process hosts), gives them unequal shards of
one global minibatch, and runs a list of cases on them; meanwhile it runs the
same cases in this process on the concatenated batch. Losses, gradients,
parameters after SVI steps and gathered per-datum evidence are compared, rank
by rank. It exits 0 when all agree, 1 otherwise.

Same random draws. Batchplate's objectives are per datum, so the only thing
that can differ between one process and `R` ranks is which random numbers
each datum gets. The test programs draw every latent (guide particles, and
the model's sleep-phase fantasies) from a *per-datum stream*: a
`torch.Generator` seeded by the datum's global dataset index. A datum's
draws then do not depend on which rank holds it, how large the shard is, or
its position in the batch: `StreamNormal` (reparameterized,
`loc + scale * eps` with `eps` from the datum's stream) and
`StreamBernoulli` (`u < p` with `u` from the stream, scored as a usual
Bernoulli). Everything runs in float64 so that differences show the
summation order only (about 1e-15), not float32 rounding.

Failures: every collective has a timeout of half the overall `--timeout`;
the launcher kills the remaining ranks as soon as one fails, and all of them
when the overall deadline passes, and then exits non-zero with the failing
rank's error.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyro
import pyro.distributions as pdist
import torch
import torch.distributed as tdist

from . import distributed as bd
from .evaluate import log_evidence
from .objectives import VIMCO, RenyiELBO, ReweightedWakeSleep, Trace_ELBO
from .plate import batch_plate

N = 20  # dataset size
SEED = 12345


# ---------------------------------------------------------------------------
# Per-datum random streams
# ---------------------------------------------------------------------------


class Streams:
    """One `torch.Generator` per datum, seeded by the datum's global index."""

    def __init__(self, seed: int = SEED) -> None:
        self.seed = seed
        self.generators: dict[int, torch.Generator] = {}

    def __call__(self, index: int) -> torch.Generator:
        if index not in self.generators:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            self.generators[index] = g
        return self.generators[index]

    def noise(self, idx: list[int], kind: str) -> Callable[[torch.Size], torch.Tensor]:
        """A noise function for a site whose last batch dim holds the data `idx`
        (or, with one index, a site of that single datum)."""
        draw = torch.randn if kind == "normal" else torch.rand

        def fn(shape: torch.Size) -> torch.Tensor:
            if len(idx) == 1 and (len(shape) == 0 or shape[-1] != 1):
                return draw(shape, generator=self(idx[0]), dtype=torch.float64)
            if shape[-1] != len(idx):
                raise RuntimeError(f"site shape {tuple(shape)} has no datum dim of {len(idx)}")
            cols = [draw(shape[:-1], generator=self(i), dtype=torch.float64) for i in idx]
            return torch.stack(cols, dim=-1)

        return fn


class StreamNormal(pdist.Normal):
    """`Normal(loc, scale)` whose reparameterized draws take `eps` from per-datum streams."""

    def __init__(self, loc, scale, noise: Callable, validate_args=None) -> None:
        super().__init__(loc, scale, validate_args=validate_args)
        self.noise = noise

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape)
        return StreamNormal(self.loc.expand(shape), self.scale.expand(shape), self.noise)

    def rsample(self, sample_shape=()):
        shape = self._extended_shape(torch.Size(sample_shape))
        return self.loc + self.scale * self.noise(shape)


class StreamBernoulli(pdist.Bernoulli):
    """`Bernoulli(logits)` drawing `u < p` with `u` from the datum's stream."""

    def __init__(self, logits, noise: Callable, validate_args=None) -> None:
        super().__init__(logits=logits, validate_args=validate_args)
        self.noise = noise

    def expand(self, batch_shape, _instance=None):
        return StreamBernoulli(self.logits.expand(torch.Size(batch_shape)), self.noise)

    def sample(self, sample_shape=()):
        shape = self._extended_shape(torch.Size(sample_shape))
        with torch.no_grad():
            return (self.noise(shape) < self.probs.expand(shape)).to(self.probs.dtype)


# ---------------------------------------------------------------------------
# Programs: a conjugate Gaussian (vectorized, sequential); Pyro issue #2220's geometric
# ---------------------------------------------------------------------------


@dataclass
class Data:
    x: torch.Tensor  # [N] conjugate observations
    obs: torch.Tensor  # [N] geometric observations
    batch: torch.Tensor  # the global minibatch: dataset indices, [B]
    sizes: list[int]  # shard sizes, sum B


def make_data(nproc: int) -> Data:
    g = torch.Generator().manual_seed(0)
    w = 8.5 + torch.randn(N, generator=g, dtype=torch.float64)
    x = w + 0.75 * torch.randn(N, generator=g, dtype=torch.float64)
    obs = torch.randint(0, 4, (N,), generator=g)
    B = 4 * nproc
    batch = torch.randperm(N, generator=g)[:B]
    sizes = [4] * nproc
    if nproc > 1:  # unequal shards (5 and 3): equal ones would hide a wrong share f_r
        sizes[0], sizes[-1] = 5, 3
    return Data(x, obs, batch, sizes)


def shard(data: Data, rank: int | None) -> list[int]:
    """Global indices of rank `rank`'s shard, or the whole batch (`rank=None`)."""
    if rank is None:
        return data.batch.tolist()
    start = sum(data.sizes[:rank])
    return data.batch[start : start + data.sizes[rank]].tolist()


def _plate(idx: list[int], subsample: bool, name: str = "data", dim: int | None = -1):
    if subsample:
        return batch_plate(name, N, subsample=torch.tensor(idx), dim=dim)
    return batch_plate(name, len(idx), dim=dim)


def conjugate(streams: Streams, layout: str):
    """`w ~ N(m, 1)`, `x | w ~ N(w, 0.75)`; guide `N(a x + c, exp(log_r))`."""

    def params():
        f64 = torch.float64
        m = pyro.param("m", torch.tensor(8.0, dtype=f64))
        a = pyro.param("a", torch.tensor(0.5, dtype=f64))
        c = pyro.param("c", torch.tensor(3.0, dtype=f64))
        log_r = pyro.param("log_r", torch.tensor(math.log(0.8), dtype=f64))
        return m, a, c, log_r

    def model(x, idx, subsample, observations=None):
        m, *_ = params()
        if layout == "vectorized":
            with _plate(idx, subsample):
                w = pyro.sample(
                    "w", StreamNormal(m, torch.ones_like(m), streams.noise(idx, "normal"))
                )
                noise = streams.noise(idx, "normal")
                pyro.sample("x", StreamNormal(w, 0.75 * torch.ones_like(w), noise), obs=x)
            return
        for pos, _ in enumerate(_plate(idx, subsample, dim=None)):
            g = [idx[pos]]
            w = pyro.sample(
                f"w_{g[0]}", StreamNormal(m, torch.ones_like(m), streams.noise(g, "normal"))
            )
            noise = streams.noise(g, "normal")
            pyro.sample(f"x_{g[0]}", StreamNormal(w, 0.75 * torch.ones_like(w), noise), obs=x[pos])

    def guide(x, idx, subsample, observations=None):
        _, a, c, log_r = params()
        inputs = x if observations is None else observations["x"]
        if layout == "vectorized":
            with _plate(idx, subsample):
                loc = a * inputs + c
                pyro.sample(
                    "w", StreamNormal(loc, log_r.exp().expand_as(loc), streams.noise(idx, "normal"))
                )
            return
        for pos, _ in enumerate(_plate(idx, subsample, dim=None)):
            g = [idx[pos]]
            loc = a * x[pos] + c
            pyro.sample(f"w_{g[0]}", StreamNormal(loc, log_r.exp(), streams.noise(g, "normal")))

    return model, guide


def geometric(streams: Streams):
    """Pyro issue #2220's program: a geometric number of Bernoulli sites per datum (dynamic)."""

    def draws(prefix: str, idx: int, logits: torch.Tensor) -> int:
        g, i = 0, 0
        noise = streams.noise([idx], "uniform")
        while pyro.sample(f"{prefix}_{i}", StreamBernoulli(logits, noise)).item() != 1:
            g, i = g + 1, i + 1
        return g

    def model(obs, idx, subsample):
        logits = pyro.param("model_logits", torch.tensor(0.0, dtype=torch.float64))
        for pos, _ in enumerate(_plate(idx, subsample, name="batch", dim=None)):
            g = draws(f"{idx[pos]}", idx[pos], logits)
            match = torch.tensor(float(g == int(obs[pos])), dtype=torch.float64)
            p = torch.tensor(0.99, dtype=torch.float64)
            pyro.sample(f"obs_{idx[pos]}", pdist.Bernoulli(probs=p), obs=match)

    def guide(obs, idx, subsample):
        logits = pyro.param("guide_logits", torch.tensor(0.3, dtype=torch.float64))
        for pos, _ in enumerate(_plate(idx, subsample, name="batch", dim=None)):
            draws(f"{idx[pos]}", idx[pos], logits)

    return model, guide


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    program: str  # "vectorized", "sequential", "geometric"
    make_objective: Callable[[], object]
    subsample: bool = False
    mode: str = "grads"  # "grads", "accumulate", "svi", "torch", "evidence"


CASES = (
    Case("vec ELBO mean", "vectorized", lambda: Trace_ELBO(3, vectorize_particles=True)),
    Case(
        "vec IWAE sum subsampled",
        "vectorized",
        lambda: RenyiELBO(alpha=0, num_particles=4, vectorize_particles=True, reduction="sum"),
        subsample=True,
    ),
    Case(
        "seq ELBO sum subsampled",
        "sequential",
        lambda: Trace_ELBO(2, vectorize_particles=True, reduction="sum"),
        subsample=True,
    ),
    Case("vec VIMCO sum shards", "vectorized", lambda: VIMCO(3, reduction="sum")),
    Case("seq IWAE mean K traces", "sequential", lambda: RenyiELBO(alpha=0, num_particles=3)),
    Case("geometric VIMCO mean", "geometric", lambda: VIMCO(3, vectorize_particles=False)),
    Case(
        "geometric RWS wake-wake",
        "geometric",
        lambda: ReweightedWakeSleep(3, insomnia=1.0, vectorize_particles=False),
    ),
    Case(
        "vec RWS insomnia=.5 sum sub",
        "vectorized",
        lambda: ReweightedWakeSleep(3, insomnia=0.5, reduction="sum"),
        subsample=True,
    ),
    Case(
        "vec SVI Renyi(.5) 3 SGD steps",
        "vectorized",
        lambda: RenyiELBO(alpha=0.5, num_particles=3, vectorize_particles=True),
        mode="svi",
    ),
    Case(
        "vec torch loop RWS sleep",
        "vectorized",
        lambda: ReweightedWakeSleep(3, insomnia=0.0),
        mode="torch",
    ),
    Case(
        "vec ELBO accumulate 2 calls",
        "vectorized",
        lambda: Trace_ELBO(2, vectorize_particles=True),
        mode="accumulate",
    ),
    Case("vec log_evidence gather", "vectorized", lambda: None, mode="evidence"),
)


class _SGD(pyro.optim.PyroOptim):
    """Plain SGD for SVI. (A torch.optim step would do as well, but its first call
    imports torch._dynamo, 2 s per process; the update rule is not under test.)"""

    def __init__(self, lr: float) -> None:
        self.lr = lr

    def __call__(self, params, *args, **kwargs) -> None:
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p -= self.lr * p.grad


def _grads() -> dict[str, torch.Tensor]:
    store = pyro.get_param_store()
    out = {}
    for name in sorted(store.keys()):
        p = store.get_param(name).unconstrained()
        out[name] = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
    return out


def _params() -> dict[str, torch.Tensor]:
    store = pyro.get_param_store()
    return {n: store.get_param(n).detach().clone() for n in sorted(store.keys())}


def run_case(case: Case, data: Data, rank: int | None) -> dict[str, torch.Tensor]:
    """Run `case` on rank `rank`'s shard (distributed) or on the whole batch (None)."""
    pyro.clear_param_store()
    streams = Streams()
    idx = shard(data, rank)
    if case.program == "geometric":
        model, guide = geometric(streams)
        args = (data.obs[idx], idx, case.subsample)
    else:
        model, guide = conjugate(streams, case.program)
        args = (data.x[idx], idx, case.subsample)
    distributed = rank is not None
    if case.mode == "evidence":
        kw = dict(num_particles=40, chunk_size=15, max_plate_nesting=1)
        if distributed:
            values = bd.distributed_log_evidence(model, guide, *args, **kw)
        else:
            values = log_evidence(model, guide, *args, **kw)
        return {"log_evidence": values}
    objective = case.make_objective()
    if distributed:
        objective = bd.DistributedObjective(objective)
    if case.mode == "svi":
        svi = pyro.infer.SVI(model, guide, _SGD(lr=0.005), objective)
        losses = torch.tensor([svi.step(*args) for _ in range(3)], dtype=torch.float64)
        return {"loss": losses, **{f"param {n}": v for n, v in _params().items()}}
    if case.mode == "torch":
        loss = objective.differentiable_loss(model, guide, *args)
        store = pyro.get_param_store()
        params = [store.get_param(n).unconstrained() for n in sorted(store.keys())]
        for p in params:
            p.grad = None
        loss.backward()
        if distributed:
            bd.sync_gradients(params)
        return {"loss": loss.detach().reshape(1), **{f"grad {n}": g for n, g in _grads().items()}}
    if case.mode == "accumulate":  # gradients already present are kept and added to
        objective.loss_and_grads(model, guide, *args)
    loss = objective.loss_and_grads(model, guide, *args)
    loss = torch.tensor(loss if isinstance(loss, tuple) else (loss,), dtype=torch.float64)
    return {"loss": loss, **{f"grad {n}": g for n, g in _grads().items()}}


def run_all(data: Data, rank: int | None) -> dict[str, dict[str, torch.Tensor]]:
    torch.set_default_dtype(torch.float64)
    return {case.name: run_case(case, data, rank) for case in CASES}


# ---------------------------------------------------------------------------
# Worker and launcher
# ---------------------------------------------------------------------------


def worker(args) -> int:
    torch.set_num_threads(1)
    rank, world = args.worker, args.nproc
    timeout = datetime.timedelta(seconds=args.timeout / 2)
    store = tdist.TCPStore("127.0.0.1", args.port, world_size=world, timeout=timeout)
    tdist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    try:
        if args.inject is not None and rank == args.inject_rank:
            if args.inject == "raise":
                raise RuntimeError(f"injected failure on rank {rank}")
            time.sleep(10 * args.timeout)  # a hung rank: the others' collectives time out
        results = run_all(make_data(world), rank)
        torch.save(results, Path(args.out) / f"rank{rank}.pt")
        tdist.barrier()
    finally:
        tdist.destroy_process_group()
    return 0


def _tail(path: Path, lines: int = 4) -> str:
    """The last lines of a rank's stderr, and its last error line."""
    text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    errors = [line for line in text if "Error" in line or "error" in line]
    shown = text[-lines:] + (["  => " + errors[-1].strip()] if errors else [])
    return "\n".join("    " + line for line in shown)


def _start_ranks(args, port: int, out: Path) -> list:
    """Start one worker process per rank; return `(process, stdout, stderr)` triples."""
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
        OMP_NUM_THREADS="1",
    )
    procs = []
    for rank in range(args.nproc):
        cmd = [sys.executable, "-m", "batchplate.distributed_selftest", "--worker", str(rank)]
        cmd += ["--nproc", str(args.nproc), "--port", str(port), "--out", str(out)]
        cmd += ["--timeout", str(args.timeout)]
        if args.inject:
            cmd += ["--inject", args.inject, "--inject-rank", str(args.inject_rank)]
        stdout = open(out / f"rank{rank}.out", "w")  # noqa: SIM115 - closed by _stop_ranks
        stderr = open(out / f"rank{rank}.err", "w")  # noqa: SIM115
        proc = subprocess.Popen(
            cmd, env=env, stdout=stdout, stderr=stderr, preexec_fn=die_with_parent
        )
        procs.append((proc, stdout, stderr))
    return procs


def die_with_parent() -> None:
    """In a rank, between fork and exec: SIGKILL when the launcher dies, however it dies
    (Linux's parent-death signal; it survives exec). Elsewhere the launcher's
    SIGTERM handler and its `finally` stop the ranks."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


#: `prctl` option number of the parent-death signal (linux/prctl.h).
PR_SET_PDEATHSIG = 1
TEMP_PREFIX = "batchplate-selftest-"


def remove_stale_folders() -> None:
    """Remove the temp folders of launchers that were killed (SIGKILL leaves no chance
    to clean up): each folder's name carries its launcher's pid."""
    for folder in Path(tempfile.gettempdir()).glob(TEMP_PREFIX + "*"):
        pid = folder.name[len(TEMP_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _terminate(signum: int, frame) -> None:
    # SIGTERM becomes SystemExit, so the `finally` blocks stop the ranks and remove the folder.
    raise SystemExit(128 + signum)


def _stop_ranks(procs) -> None:
    for proc, stdout, stderr in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        stdout.close()
        stderr.close()


def _reference(data: Data, procs, deadline: float) -> tuple[dict, str | None]:
    """Run every case in this process on the whole batch; return `(results, failure)`.

    The ranks are checked between cases so that a failed rank stops the run at
    once rather than after the reference is complete.
    """
    torch.set_default_dtype(torch.float64)
    reference = {}
    for case in CASES:
        failure = _check(procs, deadline)
        if failure is not None:
            return reference, failure
        reference[case.name] = run_case(case, data, None)
    return reference, _wait(procs, deadline)


def _print_failure(failure: str, procs, out: Path, seconds: float) -> None:
    print(f"selftest FAILED after {seconds:.1f} s: {failure}")
    for rank, (proc, _, _) in enumerate(procs):
        code = proc.returncode
        how = "killed by the launcher" if code < 0 else f"exit code {code}"
        print(f"  rank {rank}: {how}")
        tail = _tail(out / f"rank{rank}.err")
        if tail:
            print(tail)


def launch(args) -> int:
    """Run the ranks and the single-process reference; compare; return the exit code."""
    torch.set_num_threads(1)
    start = time.monotonic()
    deadline = start + args.timeout
    data = make_data(args.nproc)
    # This process hosts the rendezvous store, so the ranks need no free port agreed in advance
    # (port 0: the OS picks one).
    store = tdist.TCPStore(
        "127.0.0.1",
        0,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=args.timeout),
    )
    remove_stale_folders()
    signal.signal(signal.SIGTERM, _terminate)
    with tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{os.getpid()}-") as tmp:
        out = Path(tmp)
        procs = _start_ranks(args, store.port, out)
        print(
            f"selftest: {args.nproc} ranks on 127.0.0.1:{store.port} (gloo), shards of "
            f"{data.sizes} data, timeout {args.timeout:g} s",
            flush=True,
        )
        try:
            reference, failure = _reference(data, procs, deadline)
        finally:
            _stop_ranks(procs)
        if failure is not None:
            _print_failure(failure, procs, out, time.monotonic() - start)
            return 1
        results = [torch.load(out / f"rank{r}.pt") for r in range(args.nproc)]
    return _report(reference, results, args.atol, time.monotonic() - start)


def _check(procs, deadline: float) -> str | None:
    """Why the run has failed (a rank exited non-zero, or the deadline passed), or None."""
    codes = [proc.poll() for proc, _, _ in procs]
    if any(c not in (None, 0) for c in codes):
        time.sleep(0.5)  # let the other ranks fail on their own and say why, then kill them
        codes = [proc.poll() for proc, _, _ in procs]
        failed = {r: c for r, c in enumerate(codes) if c not in (None, 0)}
        return "failed ranks (exit codes): " + ", ".join(
            f"rank {r} ({c})" for r, c in failed.items()
        )
    if time.monotonic() > deadline:
        hung = [r for r, c in enumerate(codes) if c is None]
        return f"timeout: ranks {hung} still running at the deadline; killed"
    return None


def _wait(procs, deadline: float) -> str | None:
    """Wait for all ranks; on the first failure or at the deadline, return why."""
    while True:
        failure = _check(procs, deadline)
        if failure is not None or all(proc.poll() == 0 for proc, _, _ in procs):
            return failure
        time.sleep(0.05)


def _report(reference: dict, results: list[dict], atol: float, seconds: float) -> int:
    header = f"{'case':30s} {'quantity':18s} {'max |diff|':>11s} {'ref scale':>10s}  ok"
    print(header)
    print("-" * len(header))
    worst, ok_all = 0.0, True
    for case, ref in reference.items():
        for key, value in ref.items():
            diff = max(float((r[case][key] - value).abs().max()) for r in results)
            scale = float(value.abs().max())
            ok = diff <= atol * (1.0 + scale) and all(
                r[case][key].shape == value.shape for r in results
            )
            ok_all &= ok
            worst = max(worst, diff)
            print(f"{case:30s} {key:18s} {diff:11.2e} {scale:10.3g}  {'yes' if ok else 'NO'}")
    verdict = "PASSED" if ok_all else "FAILED"
    print(
        f"selftest {verdict}: {len(results)} ranks, largest difference {worst:.2e} "
        f"(tolerance {atol:g} x (1 + |value|)), {seconds:.1f} s"
    )
    return 0 if ok_all else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m batchplate.distributed_selftest",
        description="Check that data-parallel training equals one process (local gloo ranks).",
    )
    parser.add_argument("--nproc", type=int, default=2, help="number of local ranks")
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="overall wall-clock bound in seconds; ranks' collectives time out at half of it",
    )
    parser.add_argument("--atol", type=float, default=1e-9, help="allowed absolute difference")
    parser.add_argument(
        "--inject",
        choices=("raise", "hang"),
        default=None,
        help="testing: make one rank raise or hang, to check that the run fails cleanly",
    )
    parser.add_argument("--inject-rank", type=int, default=1, help="the rank for --inject")
    # The launcher starts the ranks as this same command with these hidden options.
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the self-test (or, with the hidden `--worker R`, rank `R` of it)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.nproc < 1:
        parser.error(f"--nproc must be at least 1, got {args.nproc}")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        parser.error(f"--timeout must be a positive number of seconds, got {args.timeout:g}")
    if not math.isfinite(args.atol) or args.atol < 0:
        parser.error(f"--atol must be a finite number >= 0, got {args.atol:g}")
    if args.inject is not None and not 0 <= args.inject_rank < args.nproc:
        parser.error(
            f"--inject-rank must be in [0, {args.nproc}) for --nproc {args.nproc}, "
            f"got {args.inject_rank}"
        )
    return worker(args) if args.worker is not None else launch(args)


if __name__ == "__main__":
    sys.exit(main())
