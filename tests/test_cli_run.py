"""``batchplate run <example>`` and ``batchplate bench``, and the VAE example's pieces."""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import batchplate
from batchplate import cli
from batchplate.examples import vae

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A VAE run small enough for a test: a few images, few particles, a tiny network.
TINY_VAE = [
    "-K",
    "3",
    "--batch-size",
    "16",
    "-o",
    "eval_particles=20",
    "-o",
    "eval_chunk=10",
    "-o",
    "curve_particles=4",
    "-o",
    "eval_size=12",
    "-o",
    "hidden=16",
]


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def _printed_metrics(text: str) -> dict[str, str]:
    """The ``  key  value`` lines that ``batchplate run`` prints after the run."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("batchplate run "))
    return dict(line.split(None, 1) for line in lines[start + 1 :] if line.startswith("  "))


def _is_png(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC


# -- run -------------------------------------------------------------------------------


def test_run_vae_in_process(tmp_path):
    code, out, _ = _cli(["run", "vae", "--steps", "2", "--out", str(tmp_path), *TINY_VAE])
    assert code == 0
    metrics = _printed_metrics(out)
    # Given options reach run(); the rest come from the module's DEFAULTS.
    assert metrics["steps"] == "2" and metrics["num_particles"] == "3"
    assert metrics["objective"] == vae.DEFAULTS["objective"]
    assert metrics["lr"] == f"{vae.DEFAULTS['lr']:.4g}"
    assert float(metrics["eval_particles"]) == 20
    # Binary 8x8 images: -64 log 2 = -44.4 nats is the uniform model; an untrained
    # VAE is near it, and a log-likelihood is never positive.
    assert -80 < float(metrics["test_ll"]) < 0
    plot = tmp_path / "vae-iwae.png"
    assert f"plot saved to {plot}" in out
    for name in ("vae-iwae.png", "vae-iwae-reconstructions.png", "vae-iwae-samples.png"):
        assert _is_png(tmp_path / name)


@pytest.mark.parametrize("objective", ["elbo", "ws"])
def test_vae_run_returns_metrics(tmp_path, objective):
    """run() directly, for the objective without particles' logsumexp and for wake-sleep
    (whose sleep phase hands the guide fantasy images through ``observations=``)."""
    metrics = vae.run(
        objective=objective,
        num_particles=2,
        batch_size=8,
        steps=2,
        lr=1e-3,
        out_dir=tmp_path,
        progress=False,
        eval_particles=6,
        eval_chunk=4,
        curve_particles=2,
        eval_size=5,
        hidden=8,
    )
    assert metrics["objective"] == objective and metrics["steps"] == 2
    assert metrics["seconds"] > 0 and -80 < metrics["test_ll"] < 0
    assert Path(metrics["plot"]) == tmp_path / f"vae-{objective}.png"
    assert _is_png(metrics["plot"])


def test_run_scale_through_the_console_script(tmp_path):
    script = shutil.which("batchplate", path=str(Path(sys.executable).parent))
    assert script is not None, "the batchplate console script is not installed next to python"
    proc = subprocess.run(
        [script, "run", "scale", "--steps", "3", "--out", str(tmp_path / "tmp")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    metrics = _printed_metrics(proc.stdout)
    assert metrics["steps"] == "3"
    plot = Path(proc.stdout.split("plot saved to ", 1)[1].split("\n", 1)[0])
    assert plot.parent == tmp_path / "tmp" and _is_png(plot)


def test_unknown_example_is_a_clear_error():
    code, out, err = _cli(["run", "no_such_example"])
    assert code == 2 and out == ""
    assert "unknown example 'no_such_example'" in err
    assert "vae" in err and "scale" in err  # the choices are listed


def test_unknown_objective_is_a_clear_error():
    code, _, err = _cli(["run", "vae", "--objective", "nope", "--steps", "1"])
    assert code == 2
    assert "unknown objective 'nope'" in err and "iwae" in err


def test_unknown_choice_is_a_clear_error():
    code, out, err = _cli(["run", "geometric", "-o", "form=nope", "--steps", "1"])
    assert code == 2 and out == ""
    assert "unknown form 'nope'" in err and "padded" in err


def test_options_parse_as_literals():
    assert cli.parse_options(["a=3", "b=0.5", "c=sequential", "d=True"]) == {
        "a": 3,
        "b": 0.5,
        "c": "sequential",
        "d": True,
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        cli.parse_options(["no_equals_sign"])
    code, _, err = _cli(["run", "vae", "-o", "oops"])
    assert code == 2 and "KEY=VALUE" in err
    code, _, err = _cli(["run", "vae", "-o", "no_such_option=1"])
    assert code == 2 and "no_such_option" in err


def test_examples_are_discovered_by_name():
    names = cli.available_examples()
    assert {"scale", "vae"} <= set(names)
    assert cli.load_example("vae") is vae
    with pytest.raises(LookupError, match="available examples"):
        cli.load_example("../vae")


# -- bench -----------------------------------------------------------------------------


def test_bench_help():
    with pytest.raises(SystemExit) as exit_info:
        _cli(["bench", "--help"])
    assert exit_info.value.code == 0


def test_bench_help_text(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = capsys.readouterr().out
    assert "--quick" in text and "--only" in text


def test_bench_unknown_name():
    code, _, err = _cli(["bench", "--only", "nope"])
    assert code == 2 and "iwae_vae" in err


def test_bench_quick_iwae_vae_prints_times_and_ratios():
    code, out, _ = _cli(["bench", "--quick", "--only", "iwae_vae"])
    assert code == 0
    for method in ("batchplate", "stock", "torch"):
        line = next(x for x in out.splitlines() if x.strip().startswith(method + " "))
        assert float(line.split()[1]) > 0  # median ms/step
    for ratio in ("batchplate / stock", "batchplate / torch", "stock / torch"):
        assert ratio in out


def test_bench_rows_and_ratios():
    from batchplate.bench import iwae_vae

    times = {"batchplate": [2.0, 4.0, 3.0], "stock": [1.0, 2.0, 2.0], "torch": [1.0, 1.0, 1.0]}
    rows = {row["method"]: row for row in iwae_vae.summarize(times)}
    assert rows["batchplate"]["ms_per_step"] == 3.0
    assert rows["batchplate"]["ratio_to_stock"] == 1.5
    assert rows["batchplate"]["paired_ratio_to_stock"] == 2.0  # median of 2, 2, 1.5
    assert rows["stock"]["ratio_to_torch"] == 2.0 and "ratio_to_stock" not in rows["stock"]


def test_bench_methods_compute_the_same_iwae_loss():
    """The three timed steps optimize the same per-datum IWAE bound (so the timing is fair):
    batchplate and hand-written PyTorch agree up to Monte Carlo error, and stock Pyro with a
    vectorized plate returns B times it."""
    from batchplate.bench import iwae_vae

    torch.manual_seed(0)
    sizes, B = (20, 16, 3), 16
    x = torch.bernoulli(torch.full((B, 20), 0.3))
    steps = iwae_vae.build(K=32, sizes=sizes, lr=0.0, seed=0)
    losses = {name: [steps[name](x) for _ in range(12)] for name in steps}
    mean = {name: sum(v) / len(v) for name, v in losses.items()}
    se = {
        name: (sum((a - mean[name]) ** 2 for a in v) / (len(v) - 1) / len(v)) ** 0.5
        for name, v in losses.items()
    }
    for other, scale in (("torch", 1), ("stock", B)):
        gap = abs(mean[other] / scale - mean["batchplate"])
        assert gap <= 5 * ((se[other] / scale) ** 2 + se["batchplate"] ** 2) ** 0.5 + 1e-4
    assert 5 < mean["torch"] < 40  # ~20 pixels x 0.6 nats: a per-datum loss, not a sum


# -- the VAE example's pieces -------------------------------------------------------


def test_vae_data_split_is_fixed_binary_and_disjoint():
    train, test = vae.load_data()
    assert train.shape == (1500, 64) and test.shape == (297, 64)
    assert set(train.unique().tolist()) == {0.0, 1.0}
    again, _ = vae.load_data()
    assert torch.equal(train, again)
    rows = {tuple(r) for r in train.tolist()}
    # Some digits repeat exactly after binarization; most test images are new.
    assert sum(tuple(r) not in rows for r in test.tolist()) > 250


def test_vae_programs_give_per_datum_weights():
    model = vae.VAE(z_dim=2, hidden=8)
    x = vae.load_data()[1][:7]
    log_w = batchplate.log_weights(
        model.model, model.guide, x, num_particles=5, vectorize_particles=True
    )
    assert log_w.shape == (5, 7)
    assert bool((log_w < 0).all())
    with pytest.raises(ValueError, match="unknown objective"):
        vae.make_objective("nope", 2)
