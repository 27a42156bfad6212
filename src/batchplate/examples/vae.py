"""A variational autoencoder on scikit-learn's handwritten digits, trained per datum.

The data are the 1797 8x8 images of `sklearn.datasets.load_digits`
(shipped inside scikit-learn, nothing is downloaded), binarized at half the
pixel range (`pixel > 8` of 16) and split once, with a fixed seed, into 1500
training and 297 test images.

The model is the VAE of Kingma & Welling (2014) with a Bernoulli likelihood,
`z_b ~ N(0, I_8)`, `x_b | z_b ~ Bernoulli(logits = decoder(z_b))`, and an
amortized Gaussian guide `q(z_b | x_b) = N(mu(x_b), diag sigma(x_b)^2)`. Both
are written with a vectorized `batch_plate` over the
minibatch, so every objective works per datum:

- `elbo`: `Trace_ELBO`, `(1/B) sum_b mean_k l[k, b]`;
- `iwae`: `RenyiELBO` with `alpha = 0`,
  `(1/B) sum_b log mean_k exp l[k, b]` (Burda, Grosse & Salakhutdinov, 2016);
- `vimco`: `VIMCO` (the IWAE bound; its leave-one-out
  baselines only matter for discrete latents, so here it equals `iwae`);
- `rws` / `ws`: `ReweightedWakeSleep` with
  `insomnia = 1` (wake-wake) or `0` (wake-sleep).

The test log-likelihood is `batchplate.log_evidence` at `K = 5000`
(`eval_particles`), as in Burda et al. Another program can reuse the pieces:
`load_data()`, `VAE` (an `nn.Module` with `model(x)` and `guide(x)`)
and `make_objective(name, K)`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

import batchplate
from batchplate import batch_plate
from batchplate.examples import _common as common
from batchplate.examples import _runner as runner

NAME = "vae"
OBJECTIVES = ("elbo", "iwae", "vimco", "rws", "ws")


@dataclass(frozen=True, kw_only=True)
class Options(runner.Options):
    """The keywords of `run()`: the shared ones, then this example's.

    :param eval_particles: particles of the final test log-likelihood.
    :param eval_chunk: particles per chunk of that evaluation.
    :param curve_particles: particles of the log-likelihood curves.
    :param curve_points: evaluations along the run (the curves' points).
    :param z_dim: latent dimension.
    :param hidden: width of the encoder's and decoder's hidden layer.
    :param eval_size: evaluate on this many test images only (quick runs).
    """

    OBJECTIVES = OBJECTIVES

    objective: str = "iwae"
    num_particles: int = 5
    batch_size: int = 100
    steps: int = 20000
    lr: float = 1e-3
    eval_particles: int = 5000
    eval_chunk: int = 500
    curve_particles: int = 100
    curve_points: int = 20
    z_dim: int = 8
    hidden: int = 128
    eval_size: int | None = None


DEFAULTS = runner.defaults(Options)

PIXELS, SIDE = 64, 8
NUM_TRAIN = 1500


def load_data(
    seed: int = 0, num_train: int = NUM_TRAIN, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Binarized digits `(train [1500, 64], test [297, 64])`, float 0/1.

    Pixels range over 0..16; a pixel is 1 when it is above 8. The split is a
    permutation drawn with `seed` (fixed by default, so every run and every
    objective sees the same test set).
    """
    from sklearn.datasets import load_digits

    images = torch.as_tensor(load_digits().data, dtype=torch.float32, device=device)
    x = (images > 8).float()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    perm = perm.to(x.device)
    return x[perm[:num_train]], x[perm[num_train:]]


class VAE(nn.Module):
    """MLP encoder and decoder with a Gaussian latent and Bernoulli pixels.

    `model(x)` and `guide(x)` are Pyro programs over a minibatch `x` of
    shape `[B, 64]`; each datum lives in one vectorized batch plate named
    `"data"`. `observations={"x": ...}` (passed by the sleep phase of
    reweighted wake-sleep) replaces `x` as the guide's input.
    """

    def __init__(self, z_dim: int = 8, hidden: int = 128, x_dim: int = PIXELS) -> None:
        super().__init__()
        self.z_dim, self.x_dim = z_dim, x_dim
        self.encoder = nn.Sequential(
            nn.Linear(x_dim, hidden), nn.Softplus(), nn.Linear(hidden, 2 * z_dim)
        )
        self.decoder = nn.Sequential(
            nn.Linear(z_dim, hidden), nn.Softplus(), nn.Linear(hidden, x_dim)
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Location and scale of `q(z | x)`."""
        loc, log_scale = self.encoder(x).chunk(2, dim=-1)
        # A floor on the scale keeps log q finite early in training.
        return loc, F.softplus(log_scale) + 1e-4

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits of the 64 pixels."""
        return self.decoder(z)

    def model(self, x: torch.Tensor, observations: dict[str, torch.Tensor] | None = None) -> None:
        pyro.module("decoder", self.decoder)
        with batch_plate("data", x.shape[0]):
            prior = dist.Normal(x.new_zeros(self.z_dim), x.new_ones(self.z_dim)).to_event(1)
            z = pyro.sample("z", prior)
            pyro.sample("x", dist.Bernoulli(logits=self.decode(z)).to_event(1), obs=x)

    def guide(self, x: torch.Tensor, observations: dict[str, torch.Tensor] | None = None) -> None:
        pyro.module("encoder", self.encoder)
        inputs = x if observations is None else observations["x"]
        with batch_plate("data", x.shape[0]):
            loc, scale = self.encode(inputs)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def make_objective(name: str, num_particles: int) -> batchplate.BatchObjective:
    """The batchplate objective called `name` with `K = num_particles`, vectorized."""
    return common.make_objective(name, num_particles, allowed=OBJECTIVES)


def test_log_likelihood(
    vae: VAE, x: torch.Tensor, num_particles: int = 5000, chunk_size: int = 500
) -> torch.Tensor:
    """Per-image `log p(x_b)` estimates `[B]` (IWAE bound at `K = num_particles`)."""
    return batchplate.log_evidence(
        vae.model,
        vae.guide,
        x,
        num_particles=num_particles,
        chunk_size=chunk_size,
        max_plate_nesting=1,
    )


def _grid(images: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """`rows * cols` images of `[64]` pixels as one `[rows*9-1, cols*9-1]` array,
    separated by light gray lines."""
    canvas = torch.full((rows * (SIDE + 1) - 1, cols * (SIDE + 1) - 1), 0.2)
    for i, image in enumerate(images[: rows * cols]):
        r, c = divmod(i, cols)
        canvas[r * (SIDE + 1) : r * (SIDE + 1) + SIDE, c * (SIDE + 1) : c * (SIDE + 1) + SIDE] = (
            image.reshape(SIDE, SIDE)
        )
    return canvas


def _minibatches(data: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Minibatches drawn without replacement, epoch by epoch, with a fixed generator."""
    g = torch.Generator().manual_seed(seed)
    order, cursor = torch.randperm(len(data), generator=g), 0
    while True:
        if cursor + batch_size > len(data):
            order, cursor = torch.randperm(len(data), generator=g), 0
        yield data[order[cursor : cursor + batch_size]]
        cursor += batch_size


def _train_run(o: Options, bar: Any) -> dict:
    """Train, recording the running loss every step and the log-likelihood curves
    `curve_points` times; then evaluate at `K = eval_particles`."""
    train, test = load_data()
    test = test if o.eval_size is None else test[: o.eval_size]
    train_eval = train[: len(test)]
    pyro.clear_param_store()
    pyro.set_rng_seed(o.seed)
    vae = VAE(z_dim=o.z_dim, hidden=o.hidden)
    loss_fn = make_objective(o.objective, o.num_particles)
    svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": o.lr}), loss_fn)
    batches = _minibatches(train, o.batch_size, o.seed)
    every = max(1, o.steps // max(1, o.curve_points))
    history: dict = {k: [] for k in ("step", "running_loss", "eval_step", "train_ll", "test_ll")}
    history["curve_particles"] = o.curve_particles
    clock = {"train": 0.0}

    def step(_: int):
        batch = next(batches)
        t0 = time.perf_counter()
        loss = svi.step(batch)
        clock["train"] += time.perf_counter() - t0
        return loss

    def record(t: int, running: float) -> dict[str, str] | None:
        history["step"].append(t)
        history["running_loss"].append(running)
        if t % every == 0 or t == o.steps:
            for key, x in (("train_ll", train_eval), ("test_ll", test)):
                ll = test_log_likelihood(vae, x, o.curve_particles, o.curve_particles)
                history[key].append(ll.mean().item())
            history["eval_step"].append(t)
        elif t % 20:
            return None
        last_test = f"{history['test_ll'][-1]:.2f}" if history["test_ll"] else "-"
        return {"loss": f"{running:.2f}", "test_ll": last_test}

    runner.train_loop(step, o.steps, every=1, record=record, bar=bar, smoothing=0.02)
    t0 = time.perf_counter()
    test_ll = test_log_likelihood(vae, test, o.eval_particles, o.eval_chunk)
    train_ll = test_log_likelihood(vae, train_eval, o.eval_particles, o.eval_chunk)
    return {
        "history": history,
        "vae": vae,
        "test": test,
        "test_ll": test_ll,
        "train_ll": train_ll,
        "train_seconds": clock["train"],
        "eval_seconds": time.perf_counter() - t0,
    }


def _curves_figure(history: dict, stem: str) -> Any:
    fig, ax = common.pyplot().subplots(figsize=(7, 4.2))
    ax.plot(history["step"], history["running_loss"], lw=1, color="0.6", label="training loss")
    for key, label, color in [
        ("train_ll", "train log p(x)", "C0"),
        ("test_ll", "test log p(x)", "C3"),
    ]:
        ax.plot(
            history["eval_step"],
            [-v for v in history[key]],
            "o-",
            ms=3,
            color=color,
            label=f"-({label}), K={history['curve_particles']}",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("nats per image")
    ax.set_title(stem)
    lo = min(min(-v for v in history["train_ll"]), min(history["running_loss"]))
    ax.set_ylim(lo - 1, lo + 25)
    ax.legend()
    return fig


def _reconstructions_figure(vae: VAE, test: torch.Tensor) -> Any:
    with torch.no_grad():
        shown = test[:16]
        loc, _ = vae.encode(shown)
        recon = torch.sigmoid(vae.decode(loc))
    fig, axes = common.pyplot().subplots(2, 1, figsize=(8, 2.6))
    for ax, images, title in [
        (axes[0], shown, "test images"),
        (axes[1], recon, "reconstructions: sigmoid(decoder(mean of q(z|x)))"),
    ]:
        ax.imshow(_grid(images.cpu(), 1, 16).numpy(), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    return fig


def _samples_figure(vae: VAE, seed: int, device: torch.device) -> Any:
    with torch.no_grad():
        z = torch.randn(32, vae.z_dim, generator=torch.Generator().manual_seed(seed))
        samples = torch.sigmoid(vae.decode(z.to(device)))
    fig, ax = common.pyplot().subplots(figsize=(6, 3.4))
    ax.imshow(_grid(samples.cpu(), 4, 8).numpy(), cmap="gray_r", vmin=0, vmax=1)
    ax.set_title("pixel probabilities of x | z, z ~ N(0, I) (prior samples)", fontsize=9)
    ax.axis("off")
    return fig


def _figures(result: dict, o: Options) -> dict[str, Any]:
    vae, test = result["vae"], result["test"]
    return {
        "plot": _curves_figure(result["history"], f"{NAME}-{o.objective}"),
        "reconstructions": _reconstructions_figure(vae, test),
        "samples": _samples_figure(vae, o.seed, test.device),
    }


def _metrics(result: dict, o: Options, seconds: float, paths: dict[str, Path]) -> dict:
    """The metrics; also saves the trained networks, the per-image test estimates and
    the curves next to the plot (`<plot>.pt`), for paired comparisons between
    objectives on the same test images."""
    state = paths["plot"].with_suffix(".pt")
    test_ll = result["test_ll"]
    torch.save(
        {
            "state_dict": result["vae"].state_dict(),
            "test_ll": test_ll.cpu(),
            "history": result["history"],
        },
        state,
    )
    return {
        "example": NAME,
        **o.pick("objective", "num_particles", "steps", "batch_size", "lr", "seed"),
        "test_ll": test_ll.mean().item(),
        "test_ll_se": (test_ll.std() / math.sqrt(len(test_ll))).item(),
        "train_ll": result["train_ll"].mean().item(),
        "eval_particles": o.eval_particles,
        "final_loss": result["history"]["running_loss"][-1],
        "seconds": result["train_seconds"],
        "eval_seconds": result["eval_seconds"],
        **{key: str(path) for key, path in paths.items()},
        "state": str(state),
    }


def _summary(m: dict) -> str:
    return (
        f"K={m['num_particles']}: test log-likelihood {m['test_ll']:.3f} "
        f"± {m['test_ll_se']:.3f} nats/image (K={m['eval_particles']}), "
        f"train {m['train_ll']:.3f}; {m['seconds']:.0f} s training"
    )


EXAMPLE = runner.Example(NAME, _train_run, _figures, _metrics, _summary)


def run(**options: Any) -> dict:
    """Train the VAE with one objective; return metrics, including the test log-likelihood.

    Minibatches of `batch_size` images are drawn without replacement, epoch
    by epoch; the optimizer is Adam. Every `steps // curve_points` steps the
    mean log-likelihood of the test set and of as many training images is
    estimated at `K = curve_particles` (the curves plot); at the end, the
    test log-likelihood at `K = eval_particles`, `eval_chunk` particles at
    a time.

    :param options: the fields of `Options` (defaults there).
    :returns: `test_ll` and `train_ll` (mean nats per image), `final_loss`
        (running mean of the training loss), `seconds` (training only),
        `eval_seconds`, `plot` and the paths of the other PNGs and of
        `state` (`out_dir/vae-<objective>.pt`: the trained weights, the
        per-image test estimates and the curves, via `torch.save`), and the
        options of the run.
    """
    return runner.run_example(EXAMPLE, Options(**options))
