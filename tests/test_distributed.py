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

import os
import subprocess
import sys
import time

import pytest
import torch

from batchplate import Trace_ELBO
from batchplate.distributed import DistributedObjective, shard_indices

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
