"""The semi-supervised VAE (M2) of Kingma et al. (2014) on scikit-learn's digits.

A port of Pyro's `examples/vae/ss_vae_M2.py`, small enough for a CPU: the
1797 8x8 images of `sklearn.datasets.load_digits` (nothing is downloaded),
binarized at `pixel > 8`, split once with a fixed seed into 1500 training
and 297 test images; `num_labelled` training images keep their label, the
others are unlabelled.

Model (per image): `z ~ N(0, I)`, `y ~ OneHotCategorical(1/10)` (observed
when labelled), `x | y, z ~ Bernoulli(logits = decoder(z, y))`. Guide:
`q(y | x)` (the classifier, enumerated in parallel by `config_enumerate`,
so an unlabelled image's ELBO sums over its 10 labels exactly) and
`q(z | x, y)`. The auxiliary loss of the paper, `model_classify`, scores
the labels of a labelled batch under `q(y | x)`, scaled by
`aux_loss_multiplier`; on an unlabelled batch it has no sample site and its
loss is 0, as in Pyro.

Objectives (`objective=`):

- `enum`: `batchplate.TraceEnum_ELBO` with `batch_plate` (loss per image),
  plus `batchplate.Trace_ELBO` for the auxiliary loss;
- `stock`: stock `pyro.infer.TraceEnum_ELBO` and `pyro.infer.Trace_ELBO`
  on the same program with `pyro.plate` (loss per batch: `B` times ours);
- `sampled`: `batchplate.Trace_ELBO` with the guide not enumerated: each
  unlabelled image's label is drawn from `q(y | x)` and the classifier
  learns from a score-function estimate (what enumeration avoids).

Adam is invariant to a constant factor on the gradient, and both losses are
scaled by the same `1/B`, so `enum` and `stock` should learn alike; `compare()` checks
the test accuracy over several seeds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.infer
import torch
import torch.nn.functional as F
from pyro.infer import config_enumerate
from torch import nn

import batchplate
from batchplate import batch_plate
from batchplate.examples import _common as common
from batchplate.examples import _runner as runner

NAME = "ssvae"
OBJECTIVES = ("enum", "stock", "sampled")
PIXELS, CLASSES = 64, 10
NUM_TRAIN = 1500


@dataclass(frozen=True, kw_only=True)
class Options(runner.Options):
    """The keywords of `run()`: the shared ones, then this example's.

    :param num_labelled: training images that keep their label.
    :param sup_every: every `sup_every`-th step trains on a labelled batch.
    :param aux_loss_multiplier: weight of the auxiliary classification loss.
    :param z_dim: dimension of the style latent `z`.
    :param hidden: width of every network's hidden layer.
    :param eval_every: test accuracy every this many steps (the curve).
    """

    OBJECTIVES = OBJECTIVES

    objective: str = "enum"
    num_particles: int = 1
    batch_size: int = 50
    steps: int = 1500
    lr: float = 3e-3
    num_labelled: int = 100
    sup_every: int = 4
    aux_loss_multiplier: float = 20.0
    z_dim: int = 8
    hidden: int = 128
    eval_every: int = 100


DEFAULTS = runner.defaults(Options)


def load_data(seed: int = 0) -> dict[str, torch.Tensor]:
    """Binarized digits and one-hot labels: `x_train [1500, 64]`, `y_train [1500, 10]`,
    `x_test [297, 64]`, `y_test [297, 10]`, split by a permutation drawn with `seed`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (torch.as_tensor(digits.data, dtype=torch.float32) > 8).float()
    y = F.one_hot(torch.as_tensor(digits.target), CLASSES).float()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = perm[:NUM_TRAIN], perm[NUM_TRAIN:]
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}


def _cat(*tensors: torch.Tensor) -> torch.Tensor:
    """Concatenate on the last dim after broadcasting the others: an enumerated label
    `[10, 1, 10]` meets images `[B, 64]` (Pyro's MLP with `allow_broadcast`)."""
    shape = torch.broadcast_shapes(*(t.shape[:-1] for t in tensors))
    return torch.cat([t.expand(*shape, t.shape[-1]) for t in tensors], dim=-1)


def _mlp(sizes: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers += [nn.Linear(a, b)] + ([nn.Softplus()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


class SSVAE(nn.Module):
    """Networks and programs of M2. `plate` is the plate over the minibatch:
    `batch_plate` for batchplate's objectives, `pyro.plate` for stock Pyro's;
    `name` is the networks' name in Pyro's parameter store (two networks side
    by side need two names); `x_dim` the pixels per image."""

    def __init__(
        self,
        z_dim: int = 8,
        hidden: int = 128,
        aux_loss_multiplier: float = 20.0,
        plate: Callable = batch_plate,
        x_dim: int = PIXELS,
        name: str = "ss_vae",
    ) -> None:
        super().__init__()
        self.z_dim, self.aux_loss_multiplier, self.plate = z_dim, aux_loss_multiplier, plate
        self.name = name
        self.encoder_y = _mlp((x_dim, hidden, CLASSES))
        self.encoder_z = _mlp((x_dim + CLASSES, hidden, 2 * z_dim))
        self.decoder = _mlp((z_dim + CLASSES, hidden, x_dim))

    def model(self, xs: torch.Tensor, ys: torch.Tensor | None = None) -> None:
        """`p(x, y, z)`; `y` is observed when `ys` is given."""
        pyro.module(self.name, self)
        with self.plate("data", xs.shape[0]):
            prior = dist.Normal(xs.new_zeros(self.z_dim), 1.0).to_event(1)
            zs = pyro.sample("z", prior)
            label_prior = dist.OneHotCategorical(logits=xs.new_zeros(CLASSES))
            ys = pyro.sample("y", label_prior, obs=ys)
            logits = self.decoder(_cat(zs, ys))
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=xs)

    def guide(self, xs: torch.Tensor, ys: torch.Tensor | None = None) -> None:
        """`q(y | x) q(z | x, y)`; `q(y | x)` only for unlabelled images."""
        pyro.module(self.name, self)
        with self.plate("data", xs.shape[0]):
            if ys is None:
                ys = pyro.sample("y", dist.OneHotCategorical(logits=self.encoder_y(xs)))
            loc, log_scale = self.encoder_z(_cat(xs, ys)).chunk(2, dim=-1)
            pyro.sample("z", dist.Normal(loc, F.softplus(log_scale) + 1e-4).to_event(1))

    def model_classify(self, xs: torch.Tensor, ys: torch.Tensor | None = None) -> None:
        """The auxiliary loss: labels scored under `q(y | x)`; no site when unlabelled."""
        pyro.module(self.name, self)
        with self.plate("data", xs.shape[0]):
            if ys is not None:
                classifier = dist.OneHotCategorical(logits=self.encoder_y(xs))
                with pyro.poutine.scale(scale=self.aux_loss_multiplier):
                    pyro.sample("y_aux", classifier, obs=ys)

    def guide_classify(self, xs: torch.Tensor, ys: torch.Tensor | None = None) -> None:
        """The auxiliary loss's empty guide."""

    def accuracy(self, xs: torch.Tensor, ys: torch.Tensor) -> float:
        """Fraction of images whose most probable label under `q(y | x)` is right."""
        with torch.no_grad():
            return (self.encoder_y(xs).argmax(-1) == ys.argmax(-1)).float().mean().item()


def objectives(name: str, num_particles: int = 1) -> tuple[Any, Any, Callable]:
    """`(elbo, aux, plate)` of the objective called `name`."""
    common.check_choice("objective", name, OBJECTIVES)
    kw = {"num_particles": num_particles, "max_plate_nesting": 1}
    # A labelled batch has nothing to enumerate, by design: no warning for it.
    enum_kw = {**kw, "strict_enumeration_warning": False}
    if name == "enum":
        return batchplate.TraceEnum_ELBO(**enum_kw), batchplate.Trace_ELBO(**kw), batch_plate
    if name == "sampled":
        return batchplate.Trace_ELBO(**kw), batchplate.Trace_ELBO(**kw), batch_plate
    return pyro.infer.TraceEnum_ELBO(**enum_kw), pyro.infer.Trace_ELBO(**kw), pyro.plate


def _batches(x: torch.Tensor, y: torch.Tensor, size: int, seed: int) -> Iterator[tuple]:
    """Minibatches without replacement, epoch by epoch, from a fixed generator."""
    g = torch.Generator().manual_seed(seed)
    size = min(size, len(x))
    while True:
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - size + 1, size):
            yield x[order[i : i + size]], y[order[i : i + size]]


def make_svis(o: Options) -> tuple[SSVAE, Any, Any]:
    """The network and the two SVIs (ELBO with `y` enumerated in the guide, auxiliary
    loss), sharing one Adam, as Pyro's example builds them."""
    elbo, aux, plate = objectives(o.objective, o.num_particles)
    net = SSVAE(o.z_dim, o.hidden, o.aux_loss_multiplier, plate)
    optim = pyro.optim.Adam({"lr": o.lr})
    guide = net.guide
    if o.objective != "sampled":
        guide = config_enumerate(net.guide, "parallel", expand=False)
    svi = pyro.infer.SVI(net.model, guide, optim, loss=elbo)
    svi_aux = pyro.infer.SVI(net.model_classify, net.guide_classify, optim, loss=aux)
    return net, svi, svi_aux


def _train_run(o: Options, bar: Any) -> dict:
    """Train; a labelled batch every `sup_every` steps, unlabelled ones otherwise."""
    data = load_data()
    n = o.num_labelled
    pyro.clear_param_store()
    pyro.set_rng_seed(o.seed)
    net, svi, svi_aux = make_svis(o)
    sup = _batches(data["x_train"][:n], data["y_train"][:n], o.batch_size, o.seed)
    unsup = _batches(data["x_train"][n:], data["y_train"][n:], o.batch_size, o.seed + 1)
    history: dict = {"step": [], "running_loss": [], "accuracy": []}

    def step(t: int) -> float:
        if t % o.sup_every == 0:
            xs, ys = next(sup)
            return svi.step(xs, ys) + svi_aux.step(xs, ys)
        xs, _ = next(unsup)
        return svi.step(xs) + svi_aux.step(xs)  # the auxiliary loss is 0 here

    def record(t: int, running: float) -> dict[str, str]:
        acc = net.accuracy(data["x_test"], data["y_test"])
        history["step"].append(t)
        history["running_loss"].append(running)
        history["accuracy"].append(acc)
        return {"loss": f"{running:.1f}", "test_acc": f"{acc:.3f}"}

    runner.train_loop(step, o.steps, every=o.eval_every, record=record, bar=bar)
    return history


def _figures(history: dict, o: Options) -> dict[str, Any]:
    fig, ax = common.pyplot().subplots(figsize=(6, 3.6))
    ax.plot(history["step"], history["accuracy"], "o-", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("test accuracy of q(y|x)")
    ax.set_ylim(0, 1)
    ax.set_title(f"{NAME}-{o.objective}, {o.num_labelled} labelled, seed {o.seed}")
    return {"plot": fig}


def _metrics(history: dict, o: Options, seconds: float, paths: dict[str, Path]) -> dict:
    return {
        "example": NAME,
        **o.pick("objective", "num_particles", "steps", "batch_size", "lr", "seed"),
        "num_labelled": o.num_labelled,
        "test_accuracy": history["accuracy"][-1],
        "accuracy_curve": dict(zip(history["step"], history["accuracy"], strict=True)),
        "final_loss": history["running_loss"][-1],
        **runner.timing(seconds, o.steps),
        **{key: str(path) for key, path in paths.items()},
    }


def _summary(m: dict) -> str:
    return f"test accuracy {m['test_accuracy']:.3f}; {m['seconds']:.0f} s"


EXAMPLE = runner.Example(NAME, _train_run, _figures, _metrics, _summary)


def run(**options: Any) -> dict:
    """Train M2 with one objective; return metrics, including the test accuracy.

    :param options: the fields of `Options` (defaults there).
    :returns: `test_accuracy` (of `q(y | x)` on the 297 test images),
        `final_loss` (running loss: per image for `enum`, per batch for
        `stock`), `seconds`, `ms_per_step`, `plot` and the options of the run.
    """
    return runner.run_example(EXAMPLE, Options(**options))


def compare(
    seeds: tuple[int, ...] = (0, 1, 2), checkpoints: tuple[int, ...] = (), **options: Any
) -> dict[str, dict[int, list[float]]]:
    """Test accuracy of every objective at equal steps for each seed; prints a table.

    Each run writes its metrics under `out_dir/seed-<seed>/`.

    :param seeds: the seeds; each runs both objectives.
    :param checkpoints: steps (multiples of `eval_every`) to report besides the last.
    :param options: further fields of `Options`, the same for every run.
    :returns: `{objective: {step: [accuracy per seed]}}`.
    """
    out = Path(options.pop("out_dir", "batchplate-runs"))
    options = {"progress": False, **options}
    acc: dict[str, dict[int, list[float]]] = {}
    for name in OBJECTIVES:
        for s in seeds:
            m = run(objective=name, seed=s, out_dir=out / f"seed-{s}", **options)
            steps = [*checkpoints, m["steps"]]
            for t in steps:
                acc.setdefault(name, {}).setdefault(t, []).append(m["accuracy_curve"][t])
    for name, by_step in acc.items():
        for t, values in by_step.items():
            sd = statistics.stdev(values) if len(values) > 1 else math.nan
            shown = " ".join(f"{v:.3f}" for v in values)
            print(f"{name:<6} step {t:>5}: {shown}  mean {statistics.mean(values):.3f} sd {sd:.3f}")
    return acc


if __name__ == "__main__":  # the comparison on the docs page (5 seeds, 600 steps)
    compare(seeds=(0, 1, 2, 3, 4), checkpoints=(50, 100, 300), steps=600, eval_every=50)
