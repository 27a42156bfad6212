"""Data-parallel objectives equal one process: the self-test on 2 local gloo ranks.

`python -m batchplate.distributed_selftest --nproc 2` compares losses, gradients,
SVI parameters and gathered log-evidence of 2 ranks holding unequal shards
(5 and 3 data) with one process on the concatenated batch, for vectorized,
sequential and dynamic programs and every objective (see
`batchplate.distributed_selftest`). These tests run it in subprocesses,
check that it passes, that it fails when the shard weights are wrong, and
that a rank which raises or hangs ends the run with a clear error, quickly.
Traffic stays on loopback.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.distributed as tdist

import batchplate
from batchplate import RenyiELBO, ReweightedWakeSleep, Trace_ELBO, batch_plate
from batchplate.distributed import DistributedObjective, objective_config, shard_indices

ENV = dict(os.environ, MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")


def selftest(*extra: str, backstop: float = 150) -> tuple[int, str, float]:
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "batchplate.distributed_selftest", "--nproc", "2", *extra],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=backstop,  # never hang the suite, whatever the self-test does
    )
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def test_two_ranks_equal_one_process():
    code, out, _ = selftest()
    assert code == 0, out
    assert "selftest PASSED: 2 ranks" in out
    rows = [line for line in out.splitlines() if line.rstrip().endswith(("yes", "NO"))]
    # every case and quantity was compared, and all agree to 1e-9 (float64)
    assert len(rows) >= 40 and all(r.rstrip().endswith("yes") for r in rows), out
    for case in ("vec ELBO mean", "geometric RWS wake-wake", "vec SVI", "log_evidence gather"):
        assert case in out


def test_rank_that_raises_fails_the_run_quickly():
    code, out, seconds = selftest("--inject", "raise", "--inject-rank", "1", "--timeout", "60")
    assert code != 0
    assert "selftest FAILED" in out and "rank 1 (1)" in out
    assert "RuntimeError: injected failure on rank 1" in out
    assert seconds < 40  # the launcher kills the waiting rank; no collective timeout needed


def test_hung_rank_is_caught_by_the_timeout():
    code, out, seconds = selftest("--inject", "hang", "--timeout", "10", backstop=60)
    assert code != 0
    assert "selftest FAILED" in out
    # rank 0's collective times out (after 10/2 s) or the 10 s deadline kills the ranks
    assert "Timed out" in out or "timeout: ranks" in out, out
    assert "rank 1: killed by the launcher" in out
    assert seconds < 10 + 15


def test_shards_cover_the_batch_in_order():
    for size in (8, 9, 10, 11):
        parts = [shard_indices(size, r, 3) for r in range(3)]
        assert torch.equal(torch.cat(parts), torch.arange(size))
        assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def test_rank_shares():
    """f_r = B_r/B (mean, subsampled sum), 1 (sum over unsubsampled shards)."""
    table = torch.tensor([[5.0, 20.0], [3.0, 20.0]], dtype=torch.float64)
    mean = DistributedObjective(Trace_ELBO())
    assert torch.allclose(
        mean.rank_shares(table), torch.tensor([5 / 8, 3 / 8], dtype=torch.float64)
    )
    total = DistributedObjective(Trace_ELBO(reduction="sum"))
    assert torch.allclose(
        total.rank_shares(table), torch.tensor([5 / 8, 3 / 8], dtype=torch.float64)
    )
    shards = torch.tensor([[5.0, 5.0], [3.0, 3.0]], dtype=torch.float64)
    assert torch.allclose(total.rank_shares(shards), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="dataset size N"):
        total.rank_shares(torch.tensor([[5.0, 20.0], [3.0, 30.0]], dtype=torch.float64))
    sized = DistributedObjective(Trace_ELBO(reduction="sum"), dataset_size=40)
    assert torch.allclose(sized.rank_shares(shards), torch.tensor([5.0, 5.0], dtype=torch.float64))


def test_needs_a_process_group():
    import pyro

    with pytest.raises(RuntimeError, match="init_distributed"):
        DistributedObjective(Trace_ELBO()).loss(lambda: None, lambda: None)
    pyro.clear_param_store()


def test_library_module_does_not_import_the_self_test():
    """`batchplate.distributed` is library only: no self-test, no objective type switch."""
    code = (
        "import sys, batchplate.distributed; "
        "print(sorted(m for m in sys.modules if 'selftest' in m))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# -- every step agreed by all ranks (issue 12): 2 real gloo ranks, one launch for all cases --

X = torch.tensor([9.5, 9.1, 9.2, 8.7, 9.9])
SHARDS = (slice(0, 3), slice(3, 5))  # rank 0 holds 3 data, rank 1 holds 2


def model(x, observations=None):
    """`w_b ~ N(m, 1)`, `x_b ~ N(w_b, 0.75)`; guide `N(a x_b + c, 1)` (both with parameters)."""
    m = pyro.param("m", torch.tensor(8.0))
    with batch_plate("data", len(x)):
        w = pyro.sample("w", dist.Normal(m, 1.0))
        pyro.sample("x", dist.Normal(w, 0.75), obs=x)


def guide(x, observations=None):
    a = pyro.param("a", torch.tensor(0.5))
    c = pyro.param("c", torch.tensor(3.0))
    inputs = x if observations is None else observations["x"]
    with batch_plate("data", len(x)):
        pyro.sample("w", dist.Normal(a * inputs + c, 1.0))


def _grads() -> dict:
    store = pyro.get_param_store()
    out = {}
    for name in sorted(store.keys()):
        grad = store.get_param(name).unconstrained().grad
        out[name] = None if grad is None else grad.tolist()
    return out


def _params() -> dict:
    store = pyro.get_param_store()
    return {n: store.get_param(n).unconstrained().tolist() for n in sorted(store.keys())}


def _inject(rank: int, hook) -> None:
    """Run once to create the parameters, then hook rank 1's `a` (gradient-time failure)."""
    if rank == 1:
        pyro.get_param_store().get_param("a").unconstrained().register_hook(hook)


def _nan(grad):
    return grad * float("nan")


def _raise(grad):
    raise RuntimeError("injected failure in backward")


def scenario(name: str, rank: int) -> tuple[DistributedObjective, torch.Tensor, object]:
    """The objective, this rank's data and its gradient hook (or None) for a case."""
    x, hook = X[SHARDS[rank]], None
    objective = Trace_ELBO(num_particles=2, vectorize_particles=True)
    if name == "reduction":  # the case: 2.306 vs 5.239, both called "global"
        objective = Trace_ELBO(
            num_particles=2, vectorize_particles=True, reduction="sum" if rank else "mean"
        )
    elif name == "settings":
        kw = {"num_particles": 4, "insomnia": 0.5} if rank else {"num_particles": 3}
        objective = ReweightedWakeSleep(**kw) if rank else RenyiELBO(alpha=0.0, **kw)
    elif name == "no data":
        x = x[:0] if rank else x
    elif name == "nan datum":
        x = torch.tensor([9.0, float("nan")]) if rank else x
    elif name == "nan gradient":
        hook = _nan
    elif name == "raise in backward":
        hook = _raise
    return DistributedObjective(objective), x, hook


CASES = ("reduction", "settings", "no data", "nan datum", "nan gradient", "raise in backward")


def run_worker(rank: int, port: int, out: Path) -> None:
    """Rank `rank` of the agreement cases: each starts from a good SVI step (so `.grad`
    and Adam's state are non-trivial), then takes the failing step."""
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=20)
    store = tdist.TCPStore("127.0.0.1", port, world_size=2, timeout=timeout)
    tdist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timeout)
    results = {}
    for name in CASES:
        pyro.clear_param_store()
        pyro.set_rng_seed(rank)
        good = DistributedObjective(Trace_ELBO(num_particles=2, vectorize_particles=True))
        svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), good)
        svi.step(X[SHARDS[rank]])
        good.loss_and_grads(model, guide, X[SHARDS[rank]])  # leaves a .grad to keep
        objective, x, hook = scenario(name, rank)
        if hook is not None:
            _inject(rank, hook)
        before = (_grads(), _params())
        try:
            pyro.infer.SVI(model, guide, svi.optim, objective).step(x)
            error = None
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        results[name] = {"error": error, "unchanged": (_grads(), _params()) == before}
    results["after"] = good.loss(model, guide, X[SHARDS[rank]])  # the ranks are still in step
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    tdist.destroy_process_group()


@pytest.fixture(scope="module")
def agreement():
    """Both ranks' results of every case, from one launch (about 5 s on 2 busy cores)."""
    store = tdist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, "--worker", str(store.port), tmp]
        procs = [
            subprocess.Popen([*cmd, str(rank)], env=ENV, stderr=subprocess.PIPE, text=True)
            for rank in (0, 1)
        ]
        try:
            errors = [proc.communicate(timeout=90)[1] for proc in procs]
        finally:
            for proc in procs:
                proc.kill()
        ranks = []
        for rank, err in enumerate(errors):
            path = Path(tmp) / f"rank{rank}.json"
            assert path.exists(), f"rank {rank} did not finish:\n{err[-3000:]}"
            ranks.append(json.loads(path.read_text()))
    return ranks


def _both(ranks, case: str) -> str:
    """The case's error, which must be the same BatchPlateError on both ranks, with every
    rank's gradients, parameters and Adam state as they were."""
    first, second = ranks[0][case], ranks[1][case]
    assert first["error"] is not None and first["error"] == second["error"], (first, second)
    assert first["error"].startswith("BatchPlateError: DistributedObjective")
    assert first["unchanged"] and second["unchanged"]
    return first["error"]


def test_ranks_with_different_reductions_fail_together(agreement):
    error = _both(agreement, "reduction")
    assert "different objective settings" in error
    assert "reduction: rank 0 'mean', rank 1 'sum'" in error
    assert "num_particles" not in error  # only what differs


def test_ranks_with_different_objectives_fail_together(agreement):
    error = _both(agreement, "settings")
    assert "type: rank 0 batchplate.objectives.renyi.RenyiELBO, rank 1 " in error
    assert "num_particles: rank 0 3, rank 1 4" in error
    assert "alpha: rank 0 0.0, rank 1 (none)" in error
    assert "insomnia: rank 0 (none), rank 1 0.5" in error


def test_rank_without_data_fails_every_rank(agreement):
    error = _both(agreement, "no data")
    assert "rank(s) [1] of 2 hold no data" in error
    assert "size must be a positive int, got 0" in error


def test_rank_with_a_nan_datum_fails_every_rank(agreement):
    error = _both(agreement, "nan datum")
    assert "rank(s) [1] of 2 failed in the forward pass" in error
    assert "rows [1]" in error


def test_nan_gradient_on_one_rank_leaves_every_grad_clean(agreement):
    error = _both(agreement, "nan gradient")
    assert "rank(s) [1] of 2 failed in the backward pass" in error
    assert "'a'" in error


def test_peer_failing_in_backward_leaves_every_grad_clean(agreement):
    error = _both(agreement, "raise in backward")
    assert "rank(s) [1] of 2 failed in the backward pass" in error
    assert "RuntimeError: injected failure in backward" in error
    assert agreement[0]["after"] == agreement[1]["after"]  # still in step afterwards


def test_objective_config_names_the_settings():
    config = objective_config(ReweightedWakeSleep(num_particles=3, insomnia=0.5))
    assert config["type"] == "batchplate.objectives.rws.ReweightedWakeSleep"
    assert config["insomnia"] == "0.5" and config["reduction"] == "'mean'"
    assert config["vectorize_particles"] == "True" and config["estimator"] == "'standard'"
    assert "max_plate_nesting" not in config  # a cache (guessed on the first step)
    enum = batchplate.TraceEnum_ELBO(max_plate_nesting=1)
    before = objective_config(enum)
    enum.loss(model, guide, X)  # warns once, then switches its warning off: state, not a setting
    assert objective_config(enum) == before


if __name__ == "__main__" and sys.argv[1] == "--worker":
    run_worker(int(sys.argv[4]), int(sys.argv[2]), Path(sys.argv[3]))
