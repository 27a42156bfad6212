"""The benchmarks' timing helpers and the stochastic-control-flow rows of `batchplate bench`."""

from __future__ import annotations

import pytest

from batchplate.bench import padded, timing


def test_interleaved_runs_every_method_every_round_in_rotating_order():
    calls = []
    steps = {name: (lambda i, name=name: calls.append((name, i))) for name in "abc"}
    times = timing.interleaved(steps, rounds=3, per_round=2)
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3, "c": 3}
    firsts = [calls[6 * r][0] for r in range(3)]
    assert firsts == ["a", "b", "c"]  # each round starts one method later
    assert [i for name, i in calls if name == "a"] == [0, 1, 2, 3, 4, 5]


def test_paired_ratio_is_the_median_of_per_round_ratios():
    assert timing.paired_ratio([2.0, 9.0, 3.0], [1.0, 3.0, 1.0]) == pytest.approx(3.0)


def test_geometric_rows_time_per_particle_stock_and_padded():
    rows = padded._geometric_rows(rounds=1)
    assert [r["form"] for r in rows] == ["per-particle", "stock Pyro", "padded"]
    assert all(r["ms_per_step"] > 0 for r in rows)
    assert rows[0]["paired_ratio_to_stock"] > 0
    assert rows[2]["speedup_of_padded"] == pytest.approx(1.0)


def test_autobatch_cost_rows_and_floors_run():
    from batchplate.bench import autobatch

    rows = autobatch._sites_rows(rounds=1)
    assert [r["program"] for r in rows] == [
        f"2BK lanes, {n} sites per lane" for n in (1, 2, 5)
    ] and all(r["ms_per_step"] > 0 for r in rows)
    for as_lanes in (True, False):
        autobatch._floor_step(4, 2, as_lanes=as_lanes)(0)  # restores what it replaced
    import pyro
    from pyro.distributions.distribution import COERCIONS
    from torch.distributions import Distribution

    assert pyro.sample.__module__ == "pyro.primitives" and not COERCIONS
    assert Distribution._validate_args  # the test suite's default, restored
