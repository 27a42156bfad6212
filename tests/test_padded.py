"""Padded traces (the Contract page, docs/contract.md): stochastic-length programs, all lanes.

- On the same latent values, a padded program's per-datum log weights equal the
  sequential program's (geometric and PCFG), because finished lanes are masked.
- Padded geometric importance weights are unbiased for the exact evidence.
- Every objective accepts a padded program with vectorized particles.
- ``max_steps`` is an error (or, on request, a warning), never a silent truncation.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

import batchplate
from batchplate import Lanes, LaneStack, PaddedLoopError, batch_plate
from batchplate.draw import draw_particles
from batchplate.examples import geometric, pcfg
from batchplate.padded import lane_shape
from batchplate.weights import compute_log_weights
from programs import geometric_log_evidence

torch.set_num_threads(1)


def padded_pair(model, guide, args, K):
    """One vectorized (model, guide) trace pair of K particles and its [K, B] log weights."""
    particles = draw_particles(
        model, guide, args, {}, num_particles=K, vectorize_particles=True, max_plate_nesting=1
    )
    weights = compute_log_weights(particles)
    return weights.pair, weights.log_w


def step_values(trace, prefix: str):
    """Values [T, K, B] of the loop sites ``{prefix}_{t}`` and each lane's length [K, B]."""
    names = [n for n in trace.nodes if n.rsplit("_", 1)[0] == prefix and n.split("_")[-1].isdigit()]
    names.sort(key=lambda n: int(n.rsplit("_", 1)[1]))
    values = torch.stack([trace.nodes[n]["value"] for n in names])
    masks = torch.stack([trace.nodes[n]["mask"].expand(values.shape[1:]) for n in names])
    # A lane's steps are a prefix: masked from its end on.
    assert bool((masks[1:] <= masks[:-1]).all())
    return values, masks.sum(0)


def sequential_log_w(model, guide, args, data):
    """[B] log weights of the sequential program with its latent sites fixed to ``data``."""
    return batchplate.log_weights(model, batchplate.replay_latents(guide, data), *args)[0]


# -- equivalence -------------------------------------------------------------------


@pytest.mark.parametrize("guide", geometric.GUIDES)
def test_geometric_padded_equals_sequential_on_same_flips(guide):
    pyro.param("model_logits", torch.tensor(0.4))
    pyro.param("guide_logits", torch.tensor(-0.3))
    pyro.param("guide_weights", torch.tensor([-0.3, 1.0, 0.5]))
    obs = torch.tensor([0, 1, 2, 3, 5, 1])
    K = 5
    model_padded, guide_padded = geometric.program("padded", guide)
    model_sequential, guide_sequential = geometric.program("sequential", guide)
    (_, guide_trace), padded = padded_pair(model_padded, guide_padded, (obs,), K)
    flips, steps = step_values(guide_trace, "g")
    assert int(steps.max()) == flips.shape[0] >= 2  # the trace is as long as its longest lane
    for k in range(K):
        data = {
            f"{b}_{i}": flips[i, k, b] for b in range(len(obs)) for i in range(int(steps[k, b]))
        }
        sequential = sequential_log_w(model_sequential, guide_sequential, (obs,), data)
        assert torch.allclose(padded[k], sequential, atol=1e-5), (k, padded[k], sequential)
    # The lengths are those of the sampled geometric variables.
    assert bool(((flips == 1).float().argmax(0) + 1 == steps).all())


def test_pcfg_padded_equals_sequential_on_same_derivations():
    sentences, lengths = pcfg.pad(pcfg.sample_sentences(5, 7, seed=3), 7)
    grammar = pcfg.PCFG(max_words=7, hidden=8)
    pyro.param("pcfg_theta", 0.5 * torch.randn(len(pcfg.NONTERMINALS), pcfg.R))
    K = 3
    (_, guide_trace), padded = padded_pair(
        grammar.model_padded, grammar.guide_padded, (sentences, lengths), K
    )
    rules, steps = step_values(guide_trace, "r")
    # Guide derivations have the sentences' lengths (2n - 1 steps) thanks to its biases.
    assert bool((steps == 2 * lengths - 1).all())
    for k in range(K):
        data = {
            f"{b}_r_{t}": rules[t, k, b]
            for b in range(len(sentences))
            for t in range(int(steps[k, b]))
        }
        sequential = sequential_log_w(
            grammar.model_sequential, grammar.guide_sequential, (sentences, lengths), data
        )
        assert torch.allclose(padded[k], sequential, atol=1e-4), (k, padded[k], sequential)


def test_pcfg_equivalence_includes_wrong_yields():
    """Derivations whose yields do not match the sentence (emission mismatches, wrong
    lengths) weigh the same in both forms too: a guide with no feasibility help."""
    sentences, lengths = pcfg.pad(pcfg.sample_sentences(4, 5, seed=1), 5)
    grammar = pcfg.PCFG(max_words=5, hidden=8, max_steps=400)
    with torch.no_grad():
        grammar.net.match.fill_(-2.0)  # prefer terminals that do NOT match the next word
    K = 4
    (_, guide_trace), padded = padded_pair(
        grammar.model_padded, grammar.guide_padded, (sentences, lengths), K
    )
    rules, steps = step_values(guide_trace, "r")
    assert bool((padded < -5).any())  # some mismatching yields
    for k in range(K):
        data = {
            f"{b}_r_{t}": rules[t, k, b]
            for b in range(len(sentences))
            for t in range(int(steps[k, b]))
        }
        sequential = sequential_log_w(
            grammar.model_sequential, grammar.guide_sequential, (sentences, lengths), data
        )
        assert torch.allclose(padded[k], sequential, atol=1e-4), (k, padded[k], sequential)


# -- exact values -----------------------------------------------------------------------


def test_padded_geometric_weights_are_unbiased_for_exact_evidence():
    """With the model's flips Bernoulli(logits=0), ``mean_k exp l[k, b]`` estimates
    ``p(o_b) = 0.01 + 0.98 * 0.5^(o_b + 1)`` without bias, whatever the guide's logit
    (here 0.5, so masked flips would not cancel); checked within 5 SE per datum. The
    per-datum IWAE value ``log mean_k exp l`` then matches ``log p(o_b)``."""
    pyro.param("guide_logits", torch.tensor(0.5))
    obs = torch.tensor([0, 1, 2, 3, 6])
    K = 40000
    _, log_w = padded_pair(geometric.model_padded, geometric.guide_padded, (obs,), K)
    w = log_w.double().exp()
    exact = geometric_log_evidence(obs).double().exp()
    mean, se = w.mean(0), w.std(0) / math.sqrt(K)
    assert bool(((mean - exact).abs() < 5 * se).all()), (mean, exact, se)
    iwae = torch.logsumexp(log_w.double(), 0) - math.log(K)
    assert bool(((iwae - exact.log()).abs() < 5 * se / exact).all())


def test_pcfg_length_normalizer_by_hand():
    log_probs = pcfg.production_log_probs(torch.log(pcfg.TABLES["probs"].clamp(min=1e-30)))
    # Shortest sentences: NP -> word (0.6), VP -> V NP (0.7), NP -> word (0.6).
    assert pcfg.log_length_normalizer(log_probs, 3).exp().item() == pytest.approx(0.252, rel=1e-5)
    assert pcfg.log_length_normalizer(log_probs, 4).exp().item() == pytest.approx(0.252, rel=1e-5)
    # Length 5: one PP attached to either NP (NP -> NP PP) or to VP (VP -> VP PP).
    w, v = 0.6, 0.7
    five = 0.252 + (0.4 * w * w) * (v * w) + w * (v * 0.4 * w * w) + w * (0.3 * (v * w) * w)
    assert pcfg.log_length_normalizer(log_probs, 5).exp().item() == pytest.approx(five, rel=1e-5)


def test_pcfg_inside_likelihood_by_hand():
    log_probs = pcfg.production_log_probs(torch.log(pcfg.TABLES["probs"].clamp(min=1e-30)))
    words = pcfg.WORDS.index
    x, lengths = pcfg.pad(
        [
            [words("astronomers"), words("saw"), words("stars")],
            # Two parses: the PP attaches to "stars" (NP -> NP PP) or to the VP.
            [words("ears"), words("saw"), words("stars"), words("with"), words("ears")],
        ],
        7,
    )
    log_z = pcfg.log_length_normalizer(log_probs, 7).double()
    expected = torch.tensor(
        [
            0.1 * 0.7 * 0.18,
            0.18 * 0.7 * (0.4 * 0.18 * 0.18) + 0.18 * 0.3 * 0.7 * 0.18 * 0.18,
        ],
        dtype=torch.float64,
    )
    got = pcfg.inside_log_likelihood(log_probs, x, lengths, 7)
    assert torch.allclose(got, expected.log() - log_z, atol=1e-6)


# -- objectives ---------------------------------------------------------------------


OBJECTIVES = {
    "elbo": lambda: batchplate.Trace_ELBO(num_particles=8, vectorize_particles=True),
    "iwae": lambda: batchplate.RenyiELBO(alpha=0.0, num_particles=8, vectorize_particles=True),
    "renyi": lambda: batchplate.RenyiELBO(alpha=0.5, num_particles=8, vectorize_particles=True),
    "vimco": lambda: batchplate.VIMCO(num_particles=8, vectorize_particles=True),
    "rws": lambda: batchplate.ReweightedWakeSleep(num_particles=8, insomnia=1.0),
    "rws-sleep": lambda: batchplate.ReweightedWakeSleep(num_particles=8, insomnia=0.5),
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_every_objective_accepts_padded_geometric(name):
    obs = torch.tensor([0, 1, 2, 4])
    pyro.param("model_logits", torch.tensor(0.2))
    pyro.param("guide_logits", torch.tensor(-0.1))
    objective = OBJECTIVES[name]()
    loss = objective.loss_and_grads(geometric.model_padded, geometric.guide_padded, obs)
    losses = loss if isinstance(loss, tuple) else (loss,)
    assert all(math.isfinite(v) for v in losses)
    for param in ("model_logits", "guide_logits"):
        grad = pyro.param(param).unconstrained().grad
        assert grad is not None and bool(torch.isfinite(grad)) and grad.abs() > 0, (param, grad)


@pytest.mark.parametrize("name", ["rws", "vimco"])
def test_pcfg_objectives_give_finite_gradients(name):
    sentences, lengths = pcfg.pad(pcfg.sample_sentences(4, 7, seed=0), 7)
    grammar = pcfg.PCFG(max_words=7, hidden=8)
    model, guide = grammar.program("padded")
    loss = pcfg.make_objective(name, 4, "padded").loss_and_grads(model, guide, sentences, lengths)
    assert all(math.isfinite(v) for v in (loss if isinstance(loss, tuple) else (loss,)))
    grads = [p.grad for p in grammar.net.parameters()] + [pyro.param("pcfg_theta").grad]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    theta_grad = pyro.param("pcfg_theta").grad
    assert bool((theta_grad[list(pcfg.LEARNED)] != 0).any())


# -- the loop itself -----------------------------------------------------------------


def long_loop_program(obs, max_steps, on_max="error"):
    with batch_plate("batch", len(obs)):
        lanes = Lanes("g", max_steps, on_max=on_max)
        for _ in lanes:
            flip = lanes.sample(dist.Bernoulli(logits=torch.tensor(-6.0)))
            lanes.finish(flip == 1)
    return lanes


def test_max_steps_is_an_error_by_default():
    with pytest.raises(PaddedLoopError, match="max_steps=3 with .* lanes still running"):
        long_loop_program(torch.zeros(5), 3)
    # Through an objective too (not swallowed as a dynamic-program error).
    objective = batchplate.RenyiELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    with pytest.raises(PaddedLoopError, match="max_steps=3"):
        objective.loss(
            lambda o: long_loop_program(o, 3), lambda o: long_loop_program(o, 3), torch.zeros(5)
        )


def test_max_steps_warns_when_asked():
    with pytest.warns(RuntimeWarning, match="max_steps=3"):
        lanes = long_loop_program(torch.zeros(5), 3, on_max="warn")
    assert lanes.truncated and bool((lanes.steps == 3).any())


def test_lanes_shape_steps_and_masks():
    def program():
        with pyro.plate("particles", 3, dim=-2), batch_plate("batch", 4):
            assert lane_shape() == torch.Size([3, 4])
            lanes = Lanes("x", 10)
            for t in lanes:
                lanes.sample(dist.Normal(0.0, 1.0))
                lanes.finish(torch.arange(4) <= t)  # datum b runs b + 1 steps
        return lanes

    trace = poutine.trace(program).get_trace()
    lanes = trace.nodes["_RETURN"]["value"]
    assert lanes.steps.tolist() == [[1, 2, 3, 4]] * 3
    assert [n for n in trace.nodes if n.startswith("x_")] == ["x_0", "x_1", "x_2", "x_3"]
    trace.compute_log_prob()
    assert bool((trace.nodes["x_2"]["log_prob"][:, :2] == 0).all())
    assert bool((trace.nodes["x_2"]["log_prob"][:, 2:] != 0).all())


@pytest.mark.parametrize("use_safe", [False, True])
def test_safe_values_keep_gradients_finite(use_safe):
    """A finished lane whose distribution gives its (ignored) value probability 0: the
    masked log prob is 0, but its gradient is NaN (0 * inf) unless made safe."""
    theta = torch.zeros((), requires_grad=True)

    def program():
        with batch_plate("batch", 3):
            lanes = Lanes("x", 5)
            for t in lanes:
                rate = theta.exp() * lanes.active  # rate 0 on finished lanes: P(x=1) = 0
                if use_safe:
                    rate = lanes.safe(rate, 1.0)
                lanes.sample(dist.Poisson(rate), obs=torch.ones(3))
                lanes.finish(torch.arange(3) <= t)

    trace = poutine.trace(program).get_trace()
    log_p = trace.log_prob_sum()
    assert math.isclose(log_p.item(), -6.0, rel_tol=1e-6)  # 1 + 2 + 3 sites of log Poi(1; 1)
    (grad,) = torch.autograd.grad(log_p, theta)
    assert bool(torch.isfinite(grad)) == use_safe


def test_lane_stack():
    with batch_plate("batch", 3):
        lanes = Lanes("s", 5)
        stack = LaneStack(lanes, depth=2, fill=7)
        stack.push(torch.tensor([1, 2, 3]))
        stack.push(torch.tensor([4, 5, 6]), where=torch.tensor([True, False, True]))
        assert stack.size.tolist() == [2, 1, 2]
        assert stack.pop().tolist() == [4, 2, 6]
        assert stack.pop().tolist() == [1, 7, 3]  # lane 1 was empty: the fill value
        assert bool(stack.empty.all())
        stack.push(torch.tensor([1, 1, 1]))
        stack.push(torch.tensor([1, 1, 1]))
        with pytest.raises(PaddedLoopError, match="overflowed"):
            stack.push(torch.tensor([1, 1, 1]))


# -- run() ---------------------------------------------------------------------------


@pytest.mark.parametrize("form", geometric.FORMS)
def test_geometric_run(tmp_path, form):
    metrics = geometric.run(
        objective="iwae",
        num_particles=3,
        batch_size=2,
        steps=3,
        lr=0.05,
        out_dir=tmp_path,
        progress=False,
        form=form,
        dataset_size=20,
    )
    assert (tmp_path / "geometric-iwae.png").exists() and metrics["plot"].endswith(".png")
    assert metrics["form"] == form and math.isfinite(metrics["evidence_gap"])
    assert metrics["evidence_gap"] >= 0 and metrics["seconds"] > 0


@pytest.mark.parametrize("form", pcfg.FORMS)
def test_pcfg_run(tmp_path, form):
    metrics = pcfg.run(
        objective="rws",
        num_particles=2,
        batch_size=2,
        steps=2,
        lr=0.01,
        out_dir=tmp_path,
        progress=False,
        form=form,
        dataset_size=10,
        max_words=5,
        hidden=8,
    )
    assert (tmp_path / "pcfg-rws.png").exists()
    assert 0 < metrics["tv"] < 1 and set(metrics["probabilities"]) == {"NP", "VP"}
