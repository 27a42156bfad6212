"""``batch_plate`` behaves like ``pyro.plate`` and marks its frame as the batch plate."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.poutine.indep_messenger import CondIndepStackFrame

from batchplate import BatchFrame, BatchPlateError, batch_plate
from programs import Conjugate


def sample_sites(trace):
    return {n: s for n, s in trace.nodes.items() if s["type"] == "sample"}


def test_context_manager_yields_indices():
    with batch_plate("data", 5) as idx:
        assert torch.equal(idx, torch.arange(5))
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
    assert z.shape == (5,)


def test_iterator_yields_ints():
    seen = list(batch_plate("data", 4))
    assert seen == [0, 1, 2, 3]
    assert all(type(i) is int for i in seen)


def test_subsample_size():
    with batch_plate("data", 10, subsample_size=3) as idx:
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
    assert idx.shape == (3,) and z.shape == (3,)
    assert len(set(idx.tolist())) == 3 and all(0 <= i < 10 for i in idx.tolist())
    seen = list(batch_plate("data", 10, subsample_size=4))
    assert len(seen) == 4 and all(type(i) is int and 0 <= i < 10 for i in seen)


def test_explicit_subsample():
    subsample = torch.tensor([7, 2, 5])
    with batch_plate("data", 10, subsample=subsample) as idx:
        pass
    assert torch.equal(idx, subsample)
    assert list(batch_plate("data", 10, subsample=subsample)) == [7, 2, 5]


def test_dim_and_broadcasting():
    with batch_plate("data", 3, dim=-2):
        with pyro.plate("inner", 4):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
    assert z.shape == (3, 4)


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_device(device):
    with batch_plate("data", 10, subsample_size=3, device=device) as idx:
        pass
    assert idx.device == torch.device("cpu")


def test_size_is_required():
    with pytest.raises(BatchPlateError, match="needs a size"):
        batch_plate("data", None)


@pytest.mark.parametrize("subsample_size", [None, 2])
def test_frame_marks_the_batch_plate(subsample_size):
    def program():
        with batch_plate("data", 6, subsample_size=subsample_size):
            with pyro.plate("inner", 2, dim=-2):
                pyro.sample("z", dist.Normal(0.0, 1.0))

    site = sample_sites(poutine.trace(program).get_trace())["z"]
    batch, inner = site["cond_indep_stack"]  # outermost first
    assert isinstance(batch, BatchFrame) and not isinstance(inner, BatchFrame)
    assert (batch.name, batch.dim, batch.full_size) == ("data", -1, 6)
    assert batch.size == (subsample_size or 6)
    # Pyro's subsampling scale applies as for pyro.plate.
    assert site["scale"] == 6 / (subsample_size or 6)


def test_sequential_frame_knows_its_datum():
    def program():
        for i in batch_plate("data", 10, subsample=torch.tensor([7, 2, 5])):
            pyro.sample(f"z_{i}", dist.Normal(0.0, 1.0))

    trace = poutine.trace(program).get_trace()
    frames = [sample_sites(trace)[f"z_{i}"]["cond_indep_stack"][0] for i in (7, 2, 5)]
    assert all(isinstance(f, BatchFrame) and f.dim is None for f in frames)
    assert [f.datum for f in frames] == [0, 1, 2]  # minibatch positions, not dataset indices


def test_frame_compares_like_pyros():
    """Pyro's machinery (model/guide matching, Rao-Blackwellization) sees a plain frame."""
    frame = BatchFrame("data", -1, 3, 0, 3)
    plain = CondIndepStackFrame("data", -1, 3, 0, 3)
    assert frame == plain and hash(frame) == hash(plain)
    assert frame.vectorized


@pytest.mark.parametrize("layout", ["vectorized", "sequential"])
def test_same_numbers_as_pyro_plate_under_stock_objectives(layout):
    """The same program with batch_plate or pyro.plate: identical traces and identical
    stock Trace_ELBO losses on the same random stream (subsampled too)."""
    conj = Conjugate()
    x = conj.data(8, seed=1)
    losses, shapes = [], []
    for plate in (batch_plate, pyro.plate):
        kw = {"subsample_size": 3}
        model, guide = conj.model(layout, plate=plate, **kw), conj.guide(layout, plate=plate, **kw)
        pyro.set_rng_seed(2)
        losses.append(pyro.infer.Trace_ELBO(num_particles=3).loss(model, guide, x))
        pyro.set_rng_seed(2)
        trace = poutine.trace(guide).get_trace(x)
        shapes.append({n: s["value"].shape for n, s in sample_sites(trace).items()})
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert shapes[0] == shapes[1]


def test_nested_batch_plate_raises_on_entry():
    with pytest.raises(BatchPlateError, match=r"batch_plate\('b'\) is nested inside"):
        with batch_plate("a", 2):
            with batch_plate("b", 3, dim=-2):
                pass
