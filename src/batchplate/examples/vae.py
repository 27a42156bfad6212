"""A variational autoencoder on scikit-learn's handwritten digits, trained per datum.

The data are the 1797 8x8 images of :func:`sklearn.datasets.load_digits`
(shipped inside scikit-learn, nothing is downloaded), binarized at half the
pixel range (``pixel > 8`` of 16) and split once, with a fixed seed, into 1500
training and 297 test images.

The model is the VAE of Kingma & Welling (2014) with a Bernoulli likelihood,
``z_b ~ N(0, I_8)``, ``x_b | z_b ~ Bernoulli(logits = decoder(z_b))``, and an
amortized Gaussian guide ``q(z_b | x_b) = N(mu(x_b), diag sigma(x_b)^2)``. Both
are written with a vectorized :func:`~batchplate.batch_plate` over the
minibatch, so every objective works per datum:

- ``elbo``: :class:`~batchplate.Trace_ELBO`, ``(1/B) sum_b mean_k l[k, b]``;
- ``iwae``: :class:`~batchplate.RenyiELBO` with ``alpha = 0``,
  ``(1/B) sum_b log mean_k exp l[k, b]`` (Burda, Grosse & Salakhutdinov, 2016);
- ``vimco``: :class:`~batchplate.VIMCO` (the IWAE bound; its leave-one-out
  baselines only matter for discrete latents, so here it equals ``iwae``);
- ``rws`` / ``ws``: :class:`~batchplate.ReweightedWakeSleep` with
  ``insomnia = 1`` (wake-wake) or ``0`` (wake-sleep).

The test log-likelihood is :func:`batchplate.log_evidence` at ``K = 5000``
(``eval_particles``), as in Burda et al. Another program can reuse the pieces:
``load_data()``, ``VAE`` (an ``nn.Module`` with ``model(x)`` and ``guide(x)``)
and ``make_objective(name, K)``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

import batchplate
from batchplate import batch_plate
from batchplate.examples import _common as common

NAME = "vae"
OBJECTIVES = ("elbo", "iwae", "vimco", "rws", "ws")
DEFAULTS: dict = {
    "objective": "iwae",
    "num_particles": 5,
    "batch_size": 100,
    "steps": 20000,
    "lr": 1e-3,
    "eval_particles": 5000,
    "eval_chunk": 500,
    "curve_particles": 100,
    "curve_points": 20,
    "z_dim": 8,
    "hidden": 128,
}

PIXELS, SIDE = 64, 8
NUM_TRAIN = 1500


def load_data(
    seed: int = 0, num_train: int = NUM_TRAIN, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Binarized digits ``(train [1500, 64], test [297, 64])``, float 0/1.

    Pixels range over 0..16; a pixel is 1 when it is above 8. The split is a
    permutation drawn with ``seed`` (fixed by default, so every run and every
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

    ``model(x)`` and ``guide(x)`` are Pyro programs over a minibatch ``x`` of
    shape ``[B, 64]``; each datum lives in one vectorized batch plate named
    ``"data"``. ``observations={"x": ...}`` (passed by the sleep phase of
    reweighted wake-sleep) replaces ``x`` as the guide's input.
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
        """Location and scale of ``q(z | x)``."""
        loc, log_scale = self.encoder(x).chunk(2, dim=-1)
        # A floor on the scale keeps log q finite early in training.
        return loc, F.softplus(log_scale) + 1e-4

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits of the 64 pixels."""
        return self.decoder(z)

    def model(self, x: torch.Tensor, observations: dict | None = None) -> None:
        pyro.module("decoder", self.decoder)
        with batch_plate("data", x.shape[0]):
            prior = dist.Normal(x.new_zeros(self.z_dim), x.new_ones(self.z_dim)).to_event(1)
            z = pyro.sample("z", prior)
            pyro.sample("x", dist.Bernoulli(logits=self.decode(z)).to_event(1), obs=x)

    def guide(self, x: torch.Tensor, observations: dict | None = None) -> None:
        pyro.module("encoder", self.encoder)
        inputs = x if observations is None else observations["x"]
        with batch_plate("data", x.shape[0]):
            loc, scale = self.encode(inputs)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def make_objective(name: str, num_particles: int) -> batchplate.BatchObjective:
    """The batchplate objective called ``name`` with ``K = num_particles``, vectorized."""
    return common.make_objective(name, num_particles, allowed=OBJECTIVES)


def test_log_likelihood(
    vae: VAE, x: torch.Tensor, num_particles: int = 5000, chunk_size: int = 500
) -> torch.Tensor:
    """Per-image ``log p(x_b)`` estimates ``[B]`` (IWAE bound at ``K = num_particles``)."""
    return batchplate.log_evidence(
        vae.model,
        vae.guide,
        x,
        num_particles=num_particles,
        chunk_size=chunk_size,
        max_plate_nesting=1,
    )


def _grid(images: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``rows * cols`` images of ``[64]`` pixels as one ``[rows*9-1, cols*9-1]`` array,
    separated by light gray lines."""
    canvas = torch.full((rows * (SIDE + 1) - 1, cols * (SIDE + 1) - 1), 0.2)
    for i, image in enumerate(images[: rows * cols]):
        r, c = divmod(i, cols)
        canvas[r * (SIDE + 1) : r * (SIDE + 1) + SIDE, c * (SIDE + 1) : c * (SIDE + 1) + SIDE] = (
            image.reshape(SIDE, SIDE)
        )
    return canvas


def _save_plots(out: Path, stem: str, history: dict, vae: VAE, test: torch.Tensor, seed: int):
    plt = common.pyplot()

    paths = {}
    fig, ax = plt.subplots(figsize=(7, 4.2))
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
    paths["plot"] = common.save_figure(fig, out / f"{stem}.png")

    with torch.no_grad():
        shown = test[:16]
        loc, _ = vae.encode(shown)
        recon = torch.sigmoid(vae.decode(loc))
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(32, vae.z_dim, generator=g).to(test.device)
        samples = torch.sigmoid(vae.decode(z))
    fig, axes = plt.subplots(2, 1, figsize=(8, 2.6))
    for ax, images, title in [
        (axes[0], shown, "test images"),
        (axes[1], recon, "reconstructions: sigmoid(decoder(mean of q(z|x)))"),
    ]:
        ax.imshow(_grid(images.cpu(), 1, 16).numpy(), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    paths["reconstructions"] = common.save_figure(fig, out / f"{stem}-reconstructions.png")

    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.imshow(_grid(samples.cpu(), 4, 8).numpy(), cmap="gray_r", vmin=0, vmax=1)
    ax.set_title("pixel probabilities of x | z, z ~ N(0, I) (prior samples)", fontsize=9)
    ax.axis("off")
    paths["samples"] = common.save_figure(fig, out / f"{stem}-samples.png")
    return paths


def run(
    *,
    objective: str = DEFAULTS["objective"],
    num_particles: int = DEFAULTS["num_particles"],
    batch_size: int = DEFAULTS["batch_size"],
    steps: int = DEFAULTS["steps"],
    lr: float = DEFAULTS["lr"],
    seed: int = 0,
    out_dir: str | Path = "batchplate-runs",
    progress: bool = True,
    eval_particles: int = DEFAULTS["eval_particles"],
    eval_chunk: int = DEFAULTS["eval_chunk"],
    curve_particles: int = DEFAULTS["curve_particles"],
    curve_points: int = DEFAULTS["curve_points"],
    z_dim: int = DEFAULTS["z_dim"],
    hidden: int = DEFAULTS["hidden"],
    eval_size: int | None = None,
) -> dict:
    """Train the VAE with one objective; return metrics, including the test log-likelihood.

    Minibatches of ``batch_size`` images are drawn without replacement, epoch
    by epoch; the optimizer is Adam. Every ``steps // curve_points`` steps the
    mean log-likelihood of the test set and of as many training images is
    estimated at ``K = curve_particles`` (the curves plot); at the end, the
    test log-likelihood at ``K = eval_particles``, ``eval_chunk`` particles at
    a time. ``eval_size`` limits the evaluated test images (for quick runs).

    Returns ``test_ll`` and ``train_ll`` (mean nats per image), ``final_loss``
    (running mean of the training loss), ``seconds`` (training only),
    ``eval_seconds``, ``plot`` and the paths of the other PNGs and of
    ``state`` (``out_dir/vae-<objective>.pt``: the trained weights, the
    per-image test estimates and the curves, via :func:`torch.save`).
    """
    from tqdm.auto import tqdm

    common.check_choice("objective", objective, OBJECTIVES)
    out = common.output_dir(out_dir)
    stem = f"{NAME}-{objective}"

    train, test = load_data()
    if eval_size is not None:
        test = test[:eval_size]
    train_eval = train[: len(test)]
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    vae = VAE(z_dim=z_dim, hidden=hidden)
    loss_fn = make_objective(objective, num_particles)
    svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": lr}), loss_fn)

    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=g)
    cursor = 0
    every = max(1, steps // max(1, curve_points))
    history: dict = {
        "step": [],
        "running_loss": [],
        "eval_step": [],
        "train_ll": [],
        "test_ll": [],
        "curve_particles": curve_particles,
    }
    running = math.nan
    last_test = "-"
    train_seconds = 0.0
    bar = tqdm(range(1, steps + 1), desc=stem, disable=not progress, mininterval=0.5)
    for step in bar:
        if cursor + batch_size > len(train):
            order, cursor = torch.randperm(len(train), generator=g), 0
        batch = train[order[cursor : cursor + batch_size]]
        cursor += batch_size
        t0 = time.perf_counter()
        loss = svi.step(batch)
        train_seconds += time.perf_counter() - t0
        loss = loss[0] if isinstance(loss, tuple) else loss  # RWS: (wake-theta, phi)
        running = loss if math.isnan(running) else 0.98 * running + 0.02 * loss
        history["step"].append(step)
        history["running_loss"].append(running)
        if step % every == 0 or step == steps:
            for key, x in (("train_ll", train_eval), ("test_ll", test)):
                ll = test_log_likelihood(vae, x, curve_particles, curve_particles)
                history[key].append(ll.mean().item())
            history["eval_step"].append(step)
            last_test = f"{history['test_ll'][-1]:.2f}"
            bar.set_postfix(loss=f"{running:.2f}", test_ll=last_test)
        elif step % 20 == 0:
            bar.set_postfix(loss=f"{running:.2f}", test_ll=last_test)
    bar.close()

    t0 = time.perf_counter()
    test_ll = test_log_likelihood(vae, test, eval_particles, eval_chunk)
    train_ll = test_log_likelihood(vae, train_eval, eval_particles, eval_chunk)
    eval_seconds = time.perf_counter() - t0
    paths = _save_plots(out, stem, history, vae, test, seed)
    # The trained networks and the per-image estimates, for paired comparisons
    # between objectives on the same test images.
    paths["state"] = out / f"{stem}.pt"
    torch.save(
        {"state_dict": vae.state_dict(), "test_ll": test_ll.cpu(), "history": history},
        paths["state"],
    )
    metrics = {
        "example": NAME,
        "objective": objective,
        "num_particles": num_particles,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "test_ll": test_ll.mean().item(),
        "test_ll_se": (test_ll.std() / math.sqrt(len(test_ll))).item(),
        "train_ll": train_ll.mean().item(),
        "eval_particles": eval_particles,
        "final_loss": running,
        "seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "plot": str(paths["plot"]),
        "reconstructions": str(paths["reconstructions"]),
        "samples": str(paths["samples"]),
        "state": str(paths["state"]),
    }
    if progress:
        print(f"plot: {paths['plot']}")
        print(
            f"{stem} K={num_particles}: test log-likelihood {metrics['test_ll']:.3f} "
            f"± {metrics['test_ll_se']:.3f} nats/image (K={eval_particles}), "
            f"train {metrics['train_ll']:.3f}; {train_seconds:.0f} s training"
        )
    return metrics
