"""Fault matrix (issue 12): never a silent wrong number, never a lost run.

Each case is a way a careful user or an attacker got a number, a traceback or a
lost run from batchplate; each must now raise a clear ``BatchPlateError`` (or
exit 2 from a command line) before doing any harm. For the atomic steps, the
parameters, the optimizer state and the gradients are compared bit for bit.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI

import batchplate
from batchplate import BatchPlateError, RenyiELBO, Trace_ELBO, batch_plate, log_weights
from batchplate.cli import main as cli_main
from batchplate.examples import _runner

X = torch.tensor([9.5, 9.1, 9.2])


def model(x):
    with batch_plate("data", len(x)):
        w = pyro.sample("w", dist.Normal(8.5, 1.0))
        pyro.sample("x", dist.Normal(w, 0.75), obs=x)


def guide(x):
    with batch_plate("data", len(x)):
        pyro.sample("w", dist.Normal(x, 1.0))


def guide_with(name="w", obs=None, extra=False, block=False):
    def g(x):
        with batch_plate("data", len(x)):
            if block:
                with poutine.block():
                    pyro.sample(name, dist.Normal(x, 1.0))
            else:
                pyro.sample(name, dist.Normal(x, 1.0))
            if extra:
                pyro.sample("v", dist.Normal(0.0, 1.0))
            if obs is not None:
                pyro.sample("x", dist.Normal(x, 1.0), obs=obs)

    return g


# -- strict matching, validation on and off ---------------------------------------

MISMATCHES = {
    "typo": (guide_with(name="ww"), r"did you mean 'w' for 'ww'"),
    "extra guide site": (guide_with(extra=True), r"guide sites \['v'\] are not latent"),
    "blocked guide site": (guide_with(block=True), r"model latent sites \['w'\] are not sampled"),
    "guide observes x": (guide_with(obs=X), r"guide site 'x' is observed"),
}


@pytest.mark.parametrize("validation", [True, False])
@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_model_guide_mismatch_raises(case, validation):
    bad_guide, match = MISMATCHES[case]
    pyro.enable_validation(validation)
    with pytest.raises(BatchPlateError, match=match):
        log_weights(model, bad_guide, X)
    with pytest.raises(BatchPlateError, match=match):
        batchplate.log_evidence(model, bad_guide, X, num_particles=4, chunk_size=2)


def test_guide_missing_a_latent_raises():
    def two_latents(x):
        with batch_plate("data", len(x)):
            w = pyro.sample("w", dist.Normal(8.5, 1.0))
            u = pyro.sample("u", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(w + u, 0.75), obs=x)

    with pytest.raises(BatchPlateError, match=r"\['u'\] are not sampled by the guide"):
        Trace_ELBO().loss(two_latents, guide, X)


def test_replay_latents_scores_fixed_values():
    values = {"w": torch.tensor([9.0, 9.0, 9.0])}
    got = log_weights(model, batchplate.replay_latents(guide, values), X)[0]
    w = values["w"]
    want = (
        dist.Normal(8.5, 1.0).log_prob(w)
        + dist.Normal(w, 0.75).log_prob(X)
        - dist.Normal(X, 1.0).log_prob(w)
    )
    assert torch.allclose(got, want)


# -- a padded loop whose model finishes differently from its guide ---------------------

OBS = torch.tensor([0.0, 2.0, 1.0, 3.0])


def padded_guide(obs):
    with batch_plate("data", len(obs)):
        lanes = batchplate.Lanes("g", 60)
        for _ in lanes:
            lanes.finish(lanes.sample(dist.Bernoulli(0.3)) == 1)


def padded_model(done_after: int):
    """The guide's loop, but the model's done test waits `done_after` steps longer (> 0)
    or less (< 0: it stops every lane after `-done_after` steps, heads or not)."""

    def model(obs):
        with batch_plate("data", len(obs)):
            lanes = batchplate.Lanes("g", 60)
            g = lanes.zeros()
            for t in lanes:
                flip = lanes.sample(dist.Bernoulli(0.5))
                g = lanes.where(g + 1 - flip, g)
                done = (flip == 1) & (t >= done_after) if done_after >= 0 else t >= -done_after - 1
                lanes.finish(done)
            pyro.sample("obs", dist.Normal(g, 1.0), obs=obs)

    return model


@pytest.mark.parametrize("vectorize", [True, False])
def test_padded_model_finishing_differently_raises(vectorize):
    """Same site names (both loops run as long overall), lanes counted differently: the
    masks disagree. More or fewer steps overall: the step sites disagree."""
    elbo = RenyiELBO(alpha=0.0, num_particles=3, vectorize_particles=vectorize)
    for seed in range(4):  # some draws end both loops at the same step, some not
        pyro.set_rng_seed(seed)
        with pytest.raises(BatchPlateError, match=r"padded loop\(s\) \['g'\]") as info:
            elbo.loss(padded_model(2), padded_guide, OBS)
        assert "masked differently" in str(info.value) or "not sampled by the guide" in str(
            info.value
        )
    pyro.set_rng_seed(0)
    with pytest.raises(BatchPlateError, match="masked differently in model and guide") as info:
        log_weights(padded_model(2), padded_guide, OBS, num_particles=3)
    assert "the model's loop finishes lanes differently from the guide's" in str(info.value)
    pyro.set_rng_seed(0)  # the same loop with the guide's done test is weighed
    assert torch.isfinite(log_weights(padded_model(0), padded_guide, OBS, num_particles=3)).all()


def test_padded_model_stopping_early_raises():
    pyro.set_rng_seed(1)
    with pytest.raises(BatchPlateError, match=r"guide sites \['g_1'.* padded loop") as info:
        log_weights(padded_model(-1), padded_guide, OBS, num_particles=4)
    assert "ran a different number of steps than the guide's" in str(info.value)


# -- atomic steps ------------------------------------------------------------------


def scale_guide(x):
    loc = pyro.param("loc", torch.zeros(3))
    scale = pyro.param("scale", torch.ones(3))
    with batch_plate("data", len(x)):
        pyro.sample("w", dist.Normal(loc + x, 0.5 + scale.abs() ** 0.5))


def snapshot(svi):
    store = pyro.get_param_store()
    params = {k: v.unconstrained().detach().clone() for k, v in store.items()}
    grads = {
        k: None if v.unconstrained().grad is None else v.unconstrained().grad.clone()
        for k, v in store.items()
    }
    return params, grads, copy.deepcopy(svi.optim.get_state())


def same(a, b) -> bool:
    """Bit-identical nested state (tensors compared with NaNs equal to NaNs)."""
    if isinstance(a, torch.Tensor):
        return torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan())
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_non_finite_gradient_changes_nothing():
    svi = SVI(model, scale_guide, pyro.optim.Adam({"lr": 0.1}), Trace_ELBO(num_particles=2))
    svi.step(X)
    pyro.param("scale").unconstrained().data[1] = 0.0  # d sqrt(|s|) / ds is inf at 0
    before = snapshot(svi)
    with pytest.raises(BatchPlateError, match=r"Non-finite gradient in parameters \['scale'\]"):
        svi.step(X)
    assert same(before, snapshot(svi))


def test_gradient_check_is_exact():
    """The fast check (one sum per gradient) passes finite entries whose sum overflows
    and catches a NaN or an infinity, in any dtype."""
    from batchplate.objectives.base import _all_finite

    big = torch.full((4,), 3e38)  # finite float32 entries, sum inf
    assert _all_finite([big, torch.ones(2, dtype=torch.float64)])
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert not _all_finite([torch.ones(3), torch.tensor([1.0, bad])])
    assert not _all_finite([torch.tensor([float("inf"), -float("inf")])])  # sums to NaN


def test_nan_alpha_is_refused_and_alpha_near_one_is_the_elbo():
    for alpha in (float("nan"), float("inf"), True):
        with pytest.raises(BatchPlateError, match="alpha must be a finite real number"):
            RenyiELBO(alpha=alpha)
    kw = {"num_particles": 2000, "vectorize_particles": True}
    pyro.set_rng_seed(1)
    near = RenyiELBO(alpha=1 + 1e-12, **kw).loss(model, guide, X)
    pyro.set_rng_seed(1)
    elbo = Trace_ELBO(**kw).loss(model, guide, X)
    assert near == pytest.approx(elbo, abs=1e-4)


# -- validated inputs ----------------------------------------------------------------


@pytest.mark.parametrize("K", [0, -1, True, 2.0])
def test_num_particles_must_be_a_positive_int(K):
    with pytest.raises(BatchPlateError, match="num_particles must be a positive int"):
        log_weights(model, guide, X, num_particles=K)
    with pytest.raises(BatchPlateError, match="num_particles must be a positive int"):
        batchplate.log_evidence(model, guide, X, num_particles=K)
    with pytest.raises(BatchPlateError, match="num_particles must be a positive int"):
        Trace_ELBO(num_particles=K)


def test_rws_num_sleep_particles_checked():
    with pytest.raises(BatchPlateError, match="num_sleep_particles must be a positive int"):
        batchplate.ReweightedWakeSleep(num_particles=2, num_sleep_particles=0)


def test_empty_batch_is_an_error():
    with pytest.raises(BatchPlateError, match=r"size must be a positive int, got 0"):
        Trace_ELBO().loss(model, guide, X[:0])


@pytest.mark.parametrize(
    "subsample, match",
    [
        (torch.tensor([3, 3]), "duplicated"),
        (torch.tensor([3, 99]), r"must lie in \[0, 10\)"),
        (torch.tensor([-1, 2]), r"must lie in \[0, 10\)"),
        (torch.tensor([1.0, 2.0]), "integer indices"),
    ],
)
def test_bad_subsample_indices(subsample, match):
    with pytest.raises(BatchPlateError, match=match):
        batch_plate("data", 10, subsample=subsample)


def test_subsample_size_larger_than_size():
    with pytest.raises(BatchPlateError, match="cannot be larger than the dataset"):
        batch_plate("data", 3, subsample_size=5)


def test_nan_datum_is_named():
    x = X.clone()
    x[1] = float("nan")
    with pytest.raises(BatchPlateError, match=r"at rows \[1\]"):
        log_weights(model, guide, x)

    def prior_guide(x):
        with batch_plate("data", len(x)):
            pyro.sample("w", dist.Normal(8.0, 1.0))

    with pytest.raises(BatchPlateError, match=r"Observed site 'x' .* at data \[1\]"):
        log_weights(model, prior_guide, x)


def test_nan_datum_is_named_with_vectorized_particles():
    """The first run that guesses `max_plate_nesting` meets the NaN first: named there too."""
    x = X.clone()
    x[1] = float("nan")
    with pytest.raises(BatchPlateError, match=r"at rows \[1\]"):
        Trace_ELBO(num_particles=2, vectorize_particles=True).loss(model, guide, x)


# -- the command lines ------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--steps", "0"], "steps must be an int >= 1"),
        (["--batch-size", "0"], "batch_size must be an int >= 1"),
        (["--batch-size", "-3"], "batch_size must be an int >= 1"),
        (["--batch-size", "100000"], "larger than dataset_size"),
        (["-K", "0"], "num_particles must be an int >= 1"),
        (["-o", "steps=abc"], "steps must be an int >= 1, got 'abc'"),
        (["--lr", "nan"], "lr must be a positive finite number"),
    ],
)
def test_run_options_checked_before_any_work(argv, match, capsys, tmp_path):
    assert cli_main(["run", "scale", "--out", str(tmp_path), *argv]) == 2
    assert match in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_run_checks_plotting_and_out_before_training(monkeypatch, capsys, tmp_path):
    real = _runner.importlib.util.find_spec
    monkeypatch.setattr(
        _runner.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real(name, *a),
    )
    assert cli_main(["run", "scale", "--out", str(tmp_path / "o")]) == 2
    assert "pip install" in capsys.readouterr().err
    monkeypatch.undo()
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli_main(["run", "scale", "--out", str(blocker / "sub")]) == 2
    assert "cannot write to the output folder" in capsys.readouterr().err


def test_plot_failure_keeps_metrics(monkeypatch, capsys, tmp_path):
    def broken(fig, path):
        raise OSError("disk full")

    monkeypatch.setattr(_runner.common, "save_figure", broken)
    argv = ["run", "scale", "--steps", "3", "--no-progress", "--out", str(tmp_path)]
    assert cli_main(argv) == 1
    out = capsys.readouterr()
    assert "plotting failed" in out.out
    metrics = (tmp_path / "scale-rws-metrics.json").read_text()
    assert "disk full" in metrics and '"example": "scale"' in metrics


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--nproc", "0"], "--nproc must be at least 1"),
        (["--timeout", "0"], "--timeout must be a positive number"),
        (["--inject", "raise", "--inject-rank", "5"], r"--inject-rank must be in \[0, 2\)"),
    ],
)
def test_selftest_arguments_checked(argv, match):
    cmd = [sys.executable, "-m", "batchplate.distributed_selftest", *argv]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert match.replace("\\", "") in result.stderr.replace("\\", "")


# -- independence check on nested arguments -------------------------------------------


def test_independence_accepts_nested_arguments():
    from collections import namedtuple

    from torch.nn.utils.rnn import pack_sequence

    Batch = namedtuple("Batch", ["x", "extra"])
    packed = pack_sequence([torch.ones(2), torch.ones(1)])

    def nested_model(batch, other):
        model(batch.x)

    def nested_guide(batch, other):
        guide(other["inner"][0].x)

    arg = Batch(X, packed)
    report = batchplate.check_batch_independence(
        nested_model, nested_guide, arg, {"inner": [Batch(X, packed)]}
    )
    assert report.independent
    assert "args[1]['inner'][0].x" in report.inputs_checked
