"""autobatch=True: the sequential program's numbers, lanes run batched.

"Same draws": the autobatched run reports its draws per particle; the
sequential program is then weighed at them with `replay_latents`, one
particle at a time, and both `[K, B]` tensors (and their gradients) agree.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

import batchplate
from batchplate import BatchPlateError, autobatch, batch_plate
from batchplate.autobatch import AutobatchWarning, autobatch_log_weights
from batchplate.examples import _scale_programs as scale
from batchplate.examples import geometric, pcfg
from batchplate.examples._pcfg_programs import PCFG
from oracles import geometric_log_evidence


def _sequential_rows(model, guide, args, draws, kwargs):
    """`[K, B]` log p, log q of the sequential program at the autobatched draws."""
    rows = []
    for values in draws:
        particles = batchplate.draw.draw_particles(
            model,
            batchplate.replay_latents(guide, values),
            args,
            kwargs,
            num_particles=1,
            vectorize_particles=False,
            max_plate_nesting=math.inf,
        )
        rows.append(batchplate.weights.compute_log_weights(particles))
    return torch.cat([r.log_p for r in rows]), torch.cat([r.log_q for r in rows])


def _check_same(model, guide, args, K=3, params=(), kwargs=None):
    kwargs = {} if kwargs is None else kwargs
    draws: list[dict] = []
    log_p, log_q, score, _ = autobatch_log_weights(
        model, guide, args, kwargs, num_particles=K, draws=draws
    )
    seq_p, seq_q = _sequential_rows(model, guide, args, draws, kwargs)
    assert torch.allclose(log_p, seq_p, atol=1e-5) and torch.allclose(log_q, seq_q, atol=1e-5)
    if params:
        weights = torch.linspace(0.5, 1.5, log_p.numel()).reshape(log_p.shape)
        grads = torch.autograd.grad(((log_p - log_q) * weights).sum(), params, allow_unused=True)
        expected = torch.autograd.grad(((seq_p - seq_q) * weights).sum(), params, allow_unused=True)
        for g, e in zip(grads, expected, strict=True):
            assert (g is None and e is None) or torch.allclose(g, e, atol=1e-4)
    return log_p, log_q, score


def test_geometric_same_weights_and_gradients():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    obs = geometric.sample_data(6, 0.3)
    model, guide = geometric.model_sequential, geometric.guide_sequential_amortized
    pyro.param("model_logits", torch.tensor(0.3))
    pyro.param("guide_weights", torch.tensor([0.1, 1.0, -0.5]))
    params = (
        pyro.param("model_logits").unconstrained(),
        pyro.param("guide_weights").unconstrained(),
    )
    _, _, score = _check_same(model, guide, (obs,), K=4, params=params)
    assert score is not None  # Bernoulli flips: score-function terms


def test_geometric_objectives_and_sleep_run():
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    obs = geometric.sample_data(8, 0.3)
    m, g = geometric.model_sequential, geometric.guide_sequential
    for objective in (
        batchplate.RenyiELBO(alpha=0, num_particles=4, autobatch=True),
        batchplate.VIMCO(num_particles=4, autobatch=True),
        batchplate.ReweightedWakeSleep(num_particles=4, insomnia=0.5, autobatch=True),
        batchplate.Trace_ELBO(num_particles=2, autobatch=True, vectorize_particles=False),
    ):
        loss = objective.loss_and_grads(m, g, obs)
        assert all(math.isfinite(v) for v in (loss if isinstance(loss, tuple) else (loss,)))


def test_sleep_scores_the_guide_at_the_fantasies():
    """RWS's sleep phase on the scale program: `log q` at each lane's fantasy, the
    guide receiving its particle's fantasy observations."""
    pyro.clear_param_store()
    pyro.set_rng_seed(2)
    x = scale.make_dataset(5)
    obs = scale.observations_of(x, "sequential")
    a, c, s = (
        pyro.param(n, torch.tensor(v)) for n, v in (("a", 0.5), ("c", 1.0), ("log_scale", 0.2))
    )
    draws: list[dict] = []
    _, log_q, _, _ = autobatch_log_weights(
        scale.sequential_model,
        scale.sequential_guide,
        (),
        {"observations": obs},
        num_particles=3,
        sleep=True,
        draws=draws,
    )
    for k, values in enumerate(draws):
        for b in range(5):
            fantasy = values[f"measurement_{b}"]
            expected = dist.Normal(a * fantasy + c, s.exp()).log_prob(values[f"weight_{b}"])
            assert torch.allclose(log_q[k, b], expected, atol=1e-5)


def test_scale_program_with_rws_same_weights():
    pyro.clear_param_store()
    pyro.set_rng_seed(3)
    obs = scale.observations_of(scale.make_dataset(6), "sequential")
    _check_same(
        scale.sequential_model, scale.sequential_guide, (), K=3, kwargs={"observations": obs}
    )
    rws = batchplate.ReweightedWakeSleep(num_particles=3, insomnia=0.5, autobatch=True)
    assert all(
        math.isfinite(v)
        for v in rws.loss_and_grads(
            scale.sequential_model, scale.sequential_guide, observations=obs
        )
    )


def _inner_model(x):
    for b in batch_plate("data", len(x)):
        z = pyro.sample(f"z_{b}", dist.Normal(0.0, 1.0))
        k = pyro.sample(f"k_{b}", dist.Bernoulli(0.4))
        mask = torch.tensor([True, True, b % 2 == 0])
        with pyro.plate(f"inner_{b}", 3, dim=-1), poutine.mask(mask=mask):
            pyro.sample(f"x_{b}", dist.Normal(z + k, 1.0), obs=x[b])
        with poutine.scale(scale=0.5):
            pyro.sample(f"y_{b}", dist.Normal(z, 2.0), obs=x[b, 0])


def _inner_guide(x):
    loc = pyro.param("loc", torch.zeros(len(x)))
    p = pyro.param("p", torch.tensor(0.3), constraint=dist.constraints.unit_interval)
    for b in batch_plate("data", len(x)):
        pyro.sample(f"z_{b}", dist.Normal(loc[b], 1.0))
        pyro.sample(f"k_{b}", dist.Bernoulli(p))


def test_inner_plate_mask_scale_and_mixed_sites():
    pyro.clear_param_store()
    pyro.set_rng_seed(4)
    x = torch.randn(6, 3)
    _inner_guide(x)  # creates the parameters
    params = (pyro.param("loc").unconstrained(), pyro.param("p").unconstrained())
    _check_same(_inner_model, _inner_guide, (x,), K=3, params=params)


def test_handlers_around_the_program_apply_to_every_lane():
    """A handler the caller wraps the program in sits below every lane's own (the
    lanes' hand-over keeps it): `poutine.scale` and `poutine.mask` around the
    whole model give the sequential program's numbers."""
    pyro.clear_param_store()
    pyro.set_rng_seed(5)
    x = torch.randn(6, 3)
    _inner_guide(x)
    params = (pyro.param("loc").unconstrained(), pyro.param("p").unconstrained())
    model = poutine.scale(poutine.mask(_inner_model, mask=torch.tensor(True)), scale=0.5)
    pyro.set_rng_seed(6)
    log_p, _, _ = _check_same(model, _inner_guide, (x,), K=2, params=params)
    pyro.set_rng_seed(6)
    unscaled, _, _ = _check_same(_inner_model, _inner_guide, (x,), K=2)
    assert torch.allclose(log_p, 0.5 * unscaled, atol=1e-5)


def test_the_callers_handlers_see_every_lanes_sites():
    """Handlers active around the objective (here `poutine.scale` around the draw)
    act on every lane's sites, as on the sequential program's."""
    x = torch.linspace(-1, 1, 5)
    pyro.clear_param_store()
    pyro.set_rng_seed(7)
    plain = autobatch_log_weights(_normal_model, _normal_guide, (x,), {}, num_particles=3)
    pyro.set_rng_seed(7)
    with poutine.scale(scale=0.25):
        draws: list[dict] = []
        scaled = autobatch_log_weights(
            _normal_model, _normal_guide, (x,), {}, num_particles=3, draws=draws
        )
        seq_p, seq_q = _sequential_rows(_normal_model, _normal_guide, (x,), draws, {})
    assert torch.allclose(scaled[0], 0.25 * plain[0]) and torch.allclose(scaled[0], seq_p)
    assert torch.allclose(scaled[1], 0.25 * plain[1]) and torch.allclose(scaled[1], seq_q)


def test_pcfg_with_gru_guide_same_weights():
    pyro.clear_param_store()
    pyro.set_rng_seed(5)
    torch.manual_seed(5)
    grammar = PCFG(max_words=6)
    sentences, lengths = pcfg.pad(pcfg.sample_sentences(4, 6, seed=0), 6)
    params = tuple(grammar.net.parameters())[:3]
    with warnings.catch_warnings():
        warnings.simplefilter("error", AutobatchWarning)  # the GRU guide batches
        _check_same(
            grammar.model_sequential,
            grammar.guide_sequential,
            (sentences, lengths),
            K=2,
            params=params,
        )


def test_unbiased_against_the_exact_evidence():
    """`mean_k exp l[k, b]` estimates `p(o_b)`; within 4 standard errors of the exact value."""
    pyro.clear_param_store()
    pyro.set_rng_seed(6)
    obs = torch.tensor([0, 1, 3])
    pyro.param("model_logits", torch.tensor(0.0))  # the oracle's model
    pyro.param("guide_logits", torch.tensor(0.2))
    log_p, log_q, _, _ = autobatch_log_weights(
        geometric.model_sequential, geometric.guide_sequential, (obs,), {}, num_particles=600
    )
    w = (log_p - log_q).detach().double().exp()
    exact = geometric_log_evidence(obs).double().exp()
    se = w.std(0) / math.sqrt(w.shape[0])
    assert ((w.mean(0) - exact).abs() < 4 * se).all(), (w.mean(0), exact, se)


def test_per_particle_lanes_match_vectorized_shape():
    pyro.set_rng_seed(7)
    obs = geometric.sample_data(5, 0.3)
    w = batchplate.log_weights(
        geometric.model_sequential,
        geometric.guide_sequential,
        obs,
        num_particles=3,
        vectorize_particles=False,
        autobatch=True,
    )
    assert w.shape == (3, 5) and torch.isfinite(w).all()


def test_sampling_outside_the_batch_plate_raises():
    def model(x):
        pyro.sample("g", dist.Normal(0.0, 1.0))
        for b in batch_plate("data", len(x)):
            pyro.sample(f"x_{b}", dist.Normal(0.0, 1.0), obs=x[b])

    def guide(x):
        pyro.sample("g", dist.Normal(0.0, 1.0))

    with pytest.raises(BatchPlateError, match="outside the batch plate"):
        autobatch_log_weights(model, guide, (torch.zeros(3),), {}, num_particles=2)


def test_counting_iterations_raises():
    """enumerate() sees one iteration per lane: the duplicated site name says so."""

    def model(x):
        for b, _ in enumerate(batch_plate("data", len(x))):
            pyro.sample(f"x_{b}", dist.Normal(0.0, 1.0), obs=x[b])

    def guide(x):
        for b, _ in enumerate(batch_plate("data", len(x))):
            pyro.sample(f"z_{b}", dist.Normal(0.0, 1.0))

    with pytest.raises(BatchPlateError, match="enumerate"):
        autobatch_log_weights(model, guide, (torch.zeros(3),), {}, num_particles=2)


def test_unstackable_distribution_falls_back_with_one_warning():
    def model(x):
        for b in batch_plate("data", len(x)):
            pyro.sample(f"z_{b}", dist.Beta(2.0, 3.0))
            pyro.sample(f"x_{b}", dist.Normal(0.0, 1.0), obs=x[b])

    def guide(x):
        for b in batch_plate("data", len(x)):
            pyro.sample(f"z_{b}", dist.Beta(1.5, 1.5))

    pyro.set_rng_seed(8)
    with pytest.warns(AutobatchWarning, match="z_"):
        _check_same(model, guide, (torch.zeros(4),), K=2)


def _breaking_model(x, stop=1, how="break"):
    for b in batch_plate("data", len(x)):
        z = pyro.sample(f"z_{b}", dist.Normal(0.0, 1.0))
        pyro.sample(f"x_{b}", dist.Normal(z, 1.0), obs=x[b])
        if b == stop:
            if how == "break":
                break
            return


def _breaking_guide(x, stop=1, how="break"):
    for b in batch_plate("data", len(x)):
        pyro.sample(f"z_{b}", dist.Normal(0.0, 1.0))
        if b == stop:
            if how == "break":
                break
            return


@pytest.mark.parametrize("how", ["break", "return"])
def test_loop_ending_early_raises_like_the_sequential_path(how):
    """The sequential program never reaches data 2 and 3; each lane runs one datum, so
    autobatch sees the loop left at datum 1 and raises as the coverage check does."""
    x = torch.zeros(4)
    with pytest.raises(BatchPlateError, match="end early"):
        batchplate.log_weights(_breaking_model, _breaking_guide, x, 1, how, num_particles=2)
    with pytest.raises(BatchPlateError, match=r"ended at datum 1 of 4.*end early"):
        autobatch_log_weights(_breaking_model, _breaking_guide, (x, 1, how), {}, num_particles=2)
    # Leaving the loop at the last datum changes nothing.
    w = batchplate.log_weights(
        _breaking_model, _breaking_guide, x, 3, how, num_particles=2, autobatch=True
    )
    assert w.shape == (2, 4) and torch.isfinite(w).all()


def test_once_computes_a_prefix_once_for_all_lanes():
    calls = []

    def table(scale):
        calls.append(scale)
        return torch.tensor(2.0) * scale

    def model(x):
        c = autobatch.once(table, 3.0)
        for b in batch_plate("data", len(x)):
            pyro.sample(f"x_{b}", dist.Normal(c, 1.0), obs=x[b])

    def guide(x):
        for _ in batch_plate("data", len(x)):
            pass

    w = batchplate.log_weights(model, guide, torch.zeros(5), num_particles=4, autobatch=True)
    assert calls == [3.0]
    assert torch.allclose(w, dist.Normal(6.0, 1.0).log_prob(torch.zeros(4, 5)))
    assert autobatch.once(table, 1.0) == 2.0 and len(calls) == 2  # outside lanes: a call


_EXAMPLES = {
    geometric: {"objective": "iwae", "lr": 0.1, "dataset_size": 50, "steps": 5},
    pcfg: {"dataset_size": 20, "max_words": 6, "hidden": 8, "steps": 2},
}


@pytest.mark.parametrize("example", [geometric, pcfg], ids=["geometric", "pcfg"])
def test_example_autobatch_form_trains(example, tmp_path):
    """`batchplate run geometric|pcfg -o form=autobatch`, a few steps: the sequential
    programs train through autobatch (the learned parameters move)."""
    options = dict(_EXAMPLES[example], num_particles=2, batch_size=4, out_dir=tmp_path)
    metrics = example.run(form="autobatch", eval_every=options["steps"], progress=False, **options)
    assert metrics["form"] == "autobatch" and math.isfinite(metrics["final_loss"])
    assert Path(metrics["plot"]).exists()
    if example is geometric:
        assert metrics["p"] != 0.5
    else:
        assert metrics["tv"] != metrics["initial_tv"]
    assert example.make_objective("rws", 2, "autobatch").autobatch


def _normal_model(x):
    for b in batch_plate("data", len(x)):
        z = pyro.sample(f"z_{b}", dist.Normal(0.0, 1.0))
        pyro.sample(f"x_{b}", dist.Normal(z, 1.0), obs=x[b])


def _normal_guide(x, fail_at=None):
    loc = pyro.param("loc", torch.tensor(0.3))
    for b in batch_plate("data", len(x)):
        if b == fail_at:
            raise RuntimeError(f"lane of datum {b} fails")
        pyro.sample(f"z_{b}", dist.Normal(loc, 1.0))


def test_workers_are_reused_and_survive_a_failing_lane():
    """Lanes run on pooled greenlets: a second draw reuses them with the same
    numbers, and a lane that raises ends its phase cleanly (its exception, the
    caller's handler stack restored), the next draw unaffected."""
    from batchplate.autobatch import _lanes

    pyro.clear_param_store()
    x = torch.linspace(-1, 1, 6)
    pyro.set_rng_seed(3)
    first = autobatch_log_weights(_normal_model, _normal_guide, (x,), {}, num_particles=4)
    parked = len(_lanes.pool())
    assert parked >= 24  # every lane was suspended at its first site at once
    with pytest.raises(RuntimeError, match="datum 2 fails"):
        autobatch_log_weights(_normal_model, _normal_guide, (x, 2), {}, num_particles=4)
    assert _lanes.HANDLERS == [] and pyro.sample is _lanes._PYRO_SAMPLE
    pyro.set_rng_seed(3)
    again = autobatch_log_weights(_normal_model, _normal_guide, (x,), {}, num_particles=4)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_lanes_in_another_thread_have_their_own_workers():
    import threading

    pyro.clear_param_store()
    x = torch.linspace(-1, 1, 5)
    found = {}

    def run():
        pyro.set_rng_seed(4)
        found["thread"] = autobatch_log_weights(
            _normal_model, _normal_guide, (x,), {}, num_particles=3
        )

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    pyro.set_rng_seed(4)
    here = autobatch_log_weights(_normal_model, _normal_guide, (x,), {}, num_particles=3)
    assert torch.equal(found["thread"][0], here[0])


def test_stacker_returns_the_unbound_tensor_only_for_its_views_in_order():
    from batchplate.autobatch._stack import Stacker

    stacker, base = Stacker(), torch.arange(12.0).reshape(4, 3)
    views = stacker.unbind(base)
    assert stacker.stack(list(views)) is base
    for other in (views[::-1], views[:3], views[:2] + (views[0].clone(), views[3])):
        stacked = stacker.stack(list(other))
        assert stacked is not base and torch.equal(stacked, torch.stack(other))


# Valid sequential programs from Pyro's tests/infer/test_valid_models.py
# (test_iplate_ok, test_iplate_iplate_ok, test_iplate_plate_ok), the outer plate
# marked as the batch plate: autobatch gives the sequential program's numbers.


def _iplate(model_p=None):
    def program():
        p = torch.tensor(0.5) if model_p is None else pyro.param("p", torch.tensor(0.5))
        for i in batch_plate("plate", 4):
            pyro.sample(f"x_{i}", dist.Bernoulli(p))

    return program


def _iplate_iplate(model_p=None):
    def program():
        p = torch.tensor(0.5) if model_p is None else pyro.param("p", torch.tensor(0.5))
        outer_iplate = batch_plate("plate_0", 3)
        inner_iplate = pyro.plate("plate_1", 3)
        for i in outer_iplate:
            for j in inner_iplate:
                pyro.sample(f"x_{i}_{j}", dist.Bernoulli(p))

    return program


def _iplate_plate(model_p=None):
    def program():
        p = torch.tensor(0.5) if model_p is None else pyro.param("p", torch.tensor(0.5))
        inner_plate = pyro.plate("plate", 3)
        for i in batch_plate("iplate", 3):
            with inner_plate as ind:
                pyro.sample(f"x_{i}", dist.Bernoulli(p).expand_by([len(ind)]))

    return program


@pytest.mark.parametrize("make", [_iplate, _iplate_iplate, _iplate_plate])
def test_pyro_valid_sequential_programs_same_weights(make):
    pyro.clear_param_store()
    guide = make(model_p=True)
    guide()  # creates the guide's parameter
    pyro.set_rng_seed(9)
    _check_same(make(), guide, (), K=3, params=(pyro.param("p").unconstrained(),))


def _carrying_guide(x):
    """Datum b's distribution depends on datum b-1's draw: state carried across
    the iterations of the batch plate's loop, which a lane does not see."""
    loc = pyro.param("loc", torch.tensor(0.3))
    carried = torch.tensor(0.0)
    for b in batch_plate("data", len(x)):
        carried = pyro.sample(f"z_{b}", dist.Normal(loc + carried, 1.0))


def _noisy_guide(x):
    """Randomness outside sample sites (as dropout): valid, not comparable on replay."""
    loc = pyro.param("loc", torch.tensor(0.3))
    for b in batch_plate("data", len(x)):
        pyro.sample(f"z_{b}", dist.Normal(loc + 0.1 * torch.rand(()), 1.0))


def test_an_objective_checks_autobatch_once_against_the_sequential_program():
    x = torch.linspace(-1, 1, 5)
    pyro.clear_param_store()
    loss = batchplate.RenyiELBO(alpha=0, num_particles=3, vectorize_particles=True, autobatch=True)
    with pytest.raises(BatchPlateError, match=r"disagree .* data \[1, 2, 3, 4\].*carried"):
        loss.loss_and_grads(_normal_model, _carrying_guide, x)
    for guide in (_normal_guide, _noisy_guide):  # checked once, then not again
        loss.loss_and_grads(_normal_model, guide, x)
        assert (_normal_model, guide) in loss._autobatch_checked


def test_the_once_check_replays_a_subsampled_minibatch():
    data = torch.linspace(-2, 2, 20)

    def model():
        for b in batch_plate("data", 20, subsample_size=5):
            z = pyro.sample(f"z_{b}", dist.Normal(0.0, 1.0))
            pyro.sample(f"x_{b}", dist.Normal(z, 1.0), obs=data[b])

    def guide():
        loc = pyro.param("loc", torch.zeros(20))
        for b in batch_plate("data", 20, subsample_size=5):
            pyro.sample(f"z_{b}", dist.Normal(loc[b], 1.0))

    def carrying_guide():
        carried = pyro.param("loc", torch.zeros(20))[0]
        for b in batch_plate("data", 20, subsample_size=5):
            carried = pyro.sample(f"z_{b}", dist.Normal(carried, 1.0))

    pyro.clear_param_store()
    loss = batchplate.RenyiELBO(alpha=0, num_particles=2, vectorize_particles=True, autobatch=True)
    loss.loss_and_grads(model, guide)  # the minibatch drawn once, replayed by the check
    assert (model, guide) in loss._autobatch_checked
    with pytest.raises(BatchPlateError, match="disagree"):  # compared on that minibatch
        loss.loss_and_grads(model, carrying_guide)
