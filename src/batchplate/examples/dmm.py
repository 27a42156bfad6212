"""The deep Markov model of Krishnan, Shalit & Sontag (2017) on generated sequences.

A small port of Pyro's `examples/dmm.py`. Pyro's example trains on the JSB
chorales; here the sequences are generated (nothing is downloaded): each
sequence has `input_dim` binary "notes" played by a hidden phase that turns
at its own speed, `x[t, d] ~ Bernoulli(sigmoid(3 cos(phase_t - 2 pi d / D)))`,
with lengths between `T_max / 2` and `T_max`, padded with zeros and a mask.

The programs are Pyro's, with `pyro.plate("z_minibatch")` replaced by a
`batch_plate` over the sequences:

- model: `z_t ~ N(trans(z_{t-1}))` (gated transition), `x_t ~
  Bernoulli(emitter(z_t))`, time steps under `pyro.markov`, padding removed
  with `.mask(mask[:, t - 1 : t])` (Pyro's ragged-sequence idiom), the
  latents scaled by the KL-annealing factor with `poutine.scale`;
- guide: an RNN over each sequence read backwards, a combiner
  `q(z_t | z_{t-1}, x_{t:T})`, optionally followed by `num_iafs` inverse
  autoregressive flows (`affine_autoregressive`).

Each sequence is one datum: `batchplate.Trace_ELBO` gives the ELBO per
sequence (nats per sequence, `reduction="mean"`), stock `Trace_ELBO` that
summed over the minibatch. Objectives: `elbo` (`batchplate.Trace_ELBO`),
`stock` (`pyro.infer.Trace_ELBO`, the program with `pyro.plate`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.infer
import pyro.poutine as poutine
import torch
from pyro.distributions.transforms import affine_autoregressive
from torch import nn

import batchplate
from batchplate import batch_plate
from batchplate.examples import _common as common
from batchplate.examples import _runner as runner

NAME = "dmm"
OBJECTIVES = ("elbo", "stock")


@dataclass(frozen=True, kw_only=True)
class Options(runner.Options):
    """The keywords of `run()`: the shared ones, then this example's.

    :param num_sequences: generated training sequences.
    :param t_max: longest sequence (the shortest has `t_max // 2` steps).
    :param input_dim: notes per time step.
    :param z_dim: latent dimension.
    :param hidden: width of the emitter, transition, combiner and RNN.
    :param num_iafs: inverse autoregressive flows in the guide (0: Gaussian).
    :param annealing_steps: the KL-annealing factor rises linearly from
        `min_annealing` to 1 over this many steps.
    :param min_annealing: the first annealing factor.
    """

    OBJECTIVES = OBJECTIVES

    objective: str = "elbo"
    num_particles: int = 1
    batch_size: int = 20
    steps: int = 300
    lr: float = 3e-3
    num_sequences: int = 200
    t_max: int = 16
    input_dim: int = 8
    z_dim: int = 4
    hidden: int = 32
    num_iafs: int = 0
    annealing_steps: int = 100
    min_annealing: float = 0.2


DEFAULTS = runner.defaults(Options)


def generate(
    num_sequences: int, t_max: int, input_dim: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(sequences [N, t_max, input_dim] of 0/1, lengths [N])`, padded with zeros."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(t_max // 2, t_max + 1, (num_sequences,), generator=g)
    speed = 0.3 + 0.5 * torch.rand(num_sequences, 1, generator=g)
    noise = 0.2 * torch.randn(num_sequences, t_max, generator=g)
    phase = 2 * math.pi * torch.rand(num_sequences, 1, generator=g)
    phase = phase + torch.cumsum(speed + noise, dim=1)
    notes = 2 * math.pi * torch.arange(input_dim) / input_dim
    probs = torch.sigmoid(3 * torch.cos(phase[..., None] - notes))
    x = torch.bernoulli(probs, generator=g)
    return x * sequence_mask(lengths, t_max)[..., None], lengths


def sequence_mask(lengths: torch.Tensor, t_max: int) -> torch.Tensor:
    """`[N, t_max]` bool, true on each sequence's real steps."""
    return torch.arange(t_max) < lengths[:, None]


def reverse_sequences(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each sequence's first `lengths[b]` steps in reverse order, padding left in place
    (Pyro's `reverse_sequences`/`pad_and_reverse` on padded tensors)."""
    t = torch.arange(x.shape[1])
    index = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)
    return x.gather(1, index[..., None].expand_as(x))


def minibatch(
    x: torch.Tensor, lengths: torch.Tensor, idx: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """The program's arguments for sequences `idx`: `(batch, reversed, mask, lengths)`,
    cut to the minibatch's longest sequence."""
    lengths = lengths[idx]
    t_max = int(lengths.max())
    batch = x[idx, :t_max]
    return batch, reverse_sequences(batch, lengths), sequence_mask(lengths, t_max), lengths


class Emitter(nn.Module):
    """Bernoulli probabilities of `x_t` given `z_t`."""

    def __init__(self, input_dim: int, z_dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.out = nn.Linear(hidden, input_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.out(self.net(z)))


class GatedTransition(nn.Module):
    """Location and scale of `p(z_t | z_{t-1})`: a gate mixes a linear map of
    `z_{t-1}` (initialized to the identity) with a proposed mean."""

    def __init__(self, z_dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, z_dim))
        self.proposed = nn.Sequential(nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, z_dim))
        self.sig = nn.Linear(z_dim, z_dim)
        self.z_to_loc = nn.Linear(z_dim, z_dim)
        self.z_to_loc.weight.data = torch.eye(z_dim)
        self.z_to_loc.bias.data = torch.zeros(z_dim)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate = torch.sigmoid(self.gate(z))
        proposed = self.proposed(z)
        loc = (1 - gate) * self.z_to_loc(z) + gate * proposed
        return loc, nn.functional.softplus(self.sig(torch.relu(proposed)))


class Combiner(nn.Module):
    """Location and scale of `q(z_t | z_{t-1}, x_{t:T})` from `z_{t-1}` and the RNN state."""

    def __init__(self, z_dim: int, rnn_dim: int) -> None:
        super().__init__()
        self.z_to_hidden = nn.Linear(z_dim, rnn_dim)
        self.to_loc = nn.Linear(rnn_dim, z_dim)
        self.to_scale = nn.Linear(rnn_dim, z_dim)

    def forward(self, z: torch.Tensor, h_rnn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = 0.5 * (torch.tanh(self.z_to_hidden(z)) + h_rnn)
        return self.to_loc(h), nn.functional.softplus(self.to_scale(h))


class DMM(nn.Module):
    """The networks; `model` and `guide` are below, as functions of a `DMM`.
    `plate` is the plate over the sequences (`batch_plate` or `pyro.plate`);
    `name` the networks' name in Pyro's parameter store."""

    def __init__(
        self,
        input_dim: int = 8,
        z_dim: int = 4,
        hidden: int = 32,
        num_iafs: int = 0,
        plate: Callable = batch_plate,
        name: str = "dmm",
    ) -> None:
        super().__init__()
        self.plate, self.name = plate, name
        self.emitter = Emitter(input_dim, z_dim, hidden)
        self.trans = GatedTransition(z_dim, hidden)
        self.combiner = Combiner(z_dim, hidden)
        self.rnn = nn.RNN(input_dim, hidden, nonlinearity="relu", batch_first=True)
        self.iafs = nn.ModuleList(
            [affine_autoregressive(z_dim, hidden_dims=[hidden]) for _ in range(num_iafs)]
        )
        self.z_0 = nn.Parameter(torch.zeros(z_dim))
        self.z_q_0 = nn.Parameter(torch.zeros(z_dim))
        self.h_0 = nn.Parameter(torch.zeros(1, 1, hidden))


def model(
    dmm: DMM,
    batch: torch.Tensor,
    reversed_batch: torch.Tensor,
    mask: torch.Tensor,
    lengths: torch.Tensor,
    annealing_factor: float = 1.0,
) -> None:
    """`p(x_{1:T}, z_{1:T})` of every sequence in the minibatch, one datum each."""
    pyro.module(dmm.name, dmm)
    z_prev = dmm.z_0.expand(batch.shape[0], -1)
    with dmm.plate("sequences", batch.shape[0]):
        for t in pyro.markov(range(1, batch.shape[1] + 1)):
            step_mask = mask[:, t - 1 : t]  # padding contributes nothing
            z_loc, z_scale = dmm.trans(z_prev)
            with poutine.scale(scale=annealing_factor):
                prior = dist.Normal(z_loc, z_scale).mask(step_mask).to_event(1)
                z_t = pyro.sample(f"z_{t}", prior)
            emission = dist.Bernoulli(dmm.emitter(z_t)).mask(step_mask).to_event(1)
            pyro.sample(f"obs_x_{t}", emission, obs=batch[:, t - 1, :])
            z_prev = z_t


def guide(
    dmm: DMM,
    batch: torch.Tensor,
    reversed_batch: torch.Tensor,
    mask: torch.Tensor,
    lengths: torch.Tensor,
    annealing_factor: float = 1.0,
) -> None:
    """`q(z_{1:T} | x_{1:T})`: an RNN read backwards, so `z_t` sees `x_{t:T}`."""
    pyro.module(dmm.name, dmm)
    h_0 = dmm.h_0.expand(1, batch.shape[0], -1).contiguous()
    rnn_output, _ = dmm.rnn(reversed_batch, h_0)
    rnn_output = reverse_sequences(rnn_output, lengths)
    z_prev = dmm.z_q_0.expand(batch.shape[0], -1)
    with dmm.plate("sequences", batch.shape[0]):
        for t in pyro.markov(range(1, batch.shape[1] + 1)):
            z_loc, z_scale = dmm.combiner(z_prev, rnn_output[:, t - 1, :])
            if len(dmm.iafs):  # the flow's event is the whole z_t
                z_dist = dist.TransformedDistribution(
                    dist.Normal(z_loc, z_scale).to_event(1), list(dmm.iafs)
                ).mask(mask[:, t - 1])
            else:
                z_dist = dist.Normal(z_loc, z_scale).mask(mask[:, t - 1 : t]).to_event(1)
            with poutine.scale(scale=annealing_factor):
                z_prev = pyro.sample(f"z_{t}", z_dist)


def annealing(step: int, o: Options) -> float:
    """The KL-annealing factor at `step` (1-based), as Pyro's example ramps it."""
    if step > o.annealing_steps:
        return 1.0
    return o.min_annealing + (1.0 - o.min_annealing) * step / o.annealing_steps


def make_svi(o: Options) -> tuple[DMM, pyro.infer.SVI]:
    """The networks and an SVI with `o.objective` and Pyro's `ClippedAdam`."""
    plate = batch_plate if o.objective == "elbo" else pyro.plate
    dmm = DMM(o.input_dim, o.z_dim, o.hidden, o.num_iafs, plate)
    kw = {"num_particles": o.num_particles, "max_plate_nesting": 1}
    elbo = batchplate.Trace_ELBO(**kw) if o.objective == "elbo" else pyro.infer.Trace_ELBO(**kw)
    optim = pyro.optim.ClippedAdam({"lr": o.lr, "clip_norm": 10.0})

    def bound(fn: Callable) -> Callable:
        return lambda *args: fn(dmm, *args)

    return dmm, pyro.infer.SVI(bound(model), bound(guide), optim, loss=elbo)


def _train_run(o: Options, bar: Any) -> dict:
    x, lengths = generate(o.num_sequences, o.t_max, o.input_dim)
    pyro.clear_param_store()
    pyro.set_rng_seed(o.seed)
    _, svi = make_svi(o)
    g = torch.Generator().manual_seed(o.seed)
    history: dict = {"step": [], "running_loss": []}

    def step(t: int) -> float:
        idx = torch.randperm(o.num_sequences, generator=g)[: o.batch_size]
        return svi.step(*minibatch(x, lengths, idx), annealing(t, o))

    def record(t: int, running: float) -> dict[str, str]:
        history["step"].append(t)
        history["running_loss"].append(running)
        return {"loss": f"{running:.2f}"}

    runner.train_loop(step, o.steps, every=10, record=record, bar=bar)
    return history


def _figures(history: dict, o: Options) -> dict[str, Any]:
    fig, ax = common.pyplot().subplots(figsize=(6, 3.6))
    ax.plot(history["step"], history["running_loss"])
    ax.set_xlabel("step")
    unit = "sequence" if o.objective == "elbo" else "minibatch"
    ax.set_ylabel(f"running loss (nats per {unit})")
    ax.set_title(f"{NAME}-{o.objective}, annealing over {o.annealing_steps} steps")
    return {"plot": fig}


def _metrics(history: dict, o: Options, seconds: float, paths: dict[str, Path]) -> dict:
    return {
        "example": NAME,
        **o.pick("objective", "num_particles", "steps", "batch_size", "lr", "seed"),
        "num_iafs": o.num_iafs,
        "first_loss": history["running_loss"][0],
        "final_loss": history["running_loss"][-1],
        **runner.timing(seconds, o.steps),
        **{key: str(path) for key, path in paths.items()},
    }


def _summary(m: dict) -> str:
    return f"running loss {m['first_loss']:.2f} -> {m['final_loss']:.2f}; {m['seconds']:.0f} s"


EXAMPLE = runner.Example(NAME, _train_run, _figures, _metrics, _summary)


def run(**options: Any) -> dict:
    """Train the DMM with one objective; return metrics, including the running loss.

    :param options: the fields of `Options` (defaults there).
    :returns: `first_loss` and `final_loss` (running loss after 10 steps and
        at the end, per sequence for `elbo`, per minibatch for `stock`; the
        early steps are annealed), `seconds`, `ms_per_step`, `plot` and the
        options of the run.
    """
    return runner.run_example(EXAMPLE, Options(**options))
