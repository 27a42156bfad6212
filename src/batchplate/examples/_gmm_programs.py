"""The Gaussian-mixture example's model and amortized guide, and the exact
quantities computed by enumerating the components."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from batchplate import batch_plate

C = 20  # components
SIGMA = 5.0
X_SHIFT, X_SCALE = 95.0, 60.0  # standardizes x for the guide network (mu spans 0..190)


def means(device: torch.device | str | None = None) -> torch.Tensor:
    """`mu_c = 10 c` for `c = 0 .. C-1`."""
    return 10.0 * torch.arange(C, dtype=torch.get_default_dtype(), device=device)


def true_weights(device: torch.device | str | None = None) -> torch.Tensor:
    """The true mixture weights `pi_c ∝ c + 5`."""
    w = torch.arange(C, dtype=torch.get_default_dtype(), device=device) + 5.0
    return w / w.sum()


def sample_data(n: int, seed: int = 0) -> torch.Tensor:
    """`n` draws of `x` from the true model (fixed generator)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.multinomial(true_weights(), n, replacement=True, generator=g)
    return means()[c] + SIGMA * torch.randn(n, generator=g)


class GuideNet(nn.Module):
    """`x -> logits` of `q(c | x)`: an MLP `1-hidden-C` with `tanh`."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(((x - X_SHIFT) / X_SCALE).unsqueeze(-1))


class GMM:
    """The model and its amortized guide, sharing `theta` and the guide network.

    Data come in Pyro's RWS convention, `observations={"x": minibatch [B]}`,
    so the sleep phase can hand the guide its fantasies (then `[S, B]`).
    """

    def __init__(self, hidden: int = 16, theta: torch.Tensor | None = None) -> None:
        self.net = GuideNet(hidden)
        self.theta_init = torch.zeros(C) if theta is None else theta

    def theta(self) -> torch.Tensor:
        return pyro.param("theta", self.theta_init.clone())

    def model(
        self,
        observations: dict[str, torch.Tensor],
        size: int | None = None,
        subsample: torch.Tensor | None = None,
    ) -> None:
        x = observations["x"]
        theta = self.theta()
        with batch_plate("data", size or x.shape[-1], subsample=subsample):
            c = pyro.sample("c", dist.Categorical(logits=theta))
            # The branch: which component's mean (and likelihood) the datum uses.
            loc = means(x.device)[c]
            pyro.sample("x", dist.Normal(loc, SIGMA), obs=x)

    def guide(
        self,
        observations: dict[str, torch.Tensor],
        size: int | None = None,
        subsample: torch.Tensor | None = None,
    ) -> None:
        x = observations["x"]
        net = pyro.module("guide_net", self.net)
        with batch_plate("data", size or x.shape[-1], subsample=subsample):
            pyro.sample("c", dist.Categorical(logits=net(x)))

    # -- exact quantities, by enumeration -----------------------------------

    def log_joint(self, x: torch.Tensor) -> torch.Tensor:
        """`[T, C]` exact `log p_theta(c, x_t)`."""
        log_prior = torch.log_softmax(self.theta(), -1)
        return log_prior + dist.Normal(means(x.device), SIGMA).log_prob(x.unsqueeze(-1))

    def log_posterior(self, x: torch.Tensor) -> torch.Tensor:
        """`[T, C]` exact `log p_theta(c | x_t)`."""
        return torch.log_softmax(self.log_joint(x), -1)

    def log_evidence(self, x: torch.Tensor) -> torch.Tensor:
        """`[T]` exact `log p_theta(x_t)`."""
        return torch.logsumexp(self.log_joint(x), -1)

    def posterior_kl(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over `x` of `KL(p_theta(c | x) || q_phi(c | x))`, by enumeration."""
        with torch.no_grad():
            log_p = self.log_posterior(x)
            log_q = torch.log_softmax(self.net(x), -1)
            return (log_p.exp() * (log_p - log_q)).sum(-1).mean()

    def weight_error(self) -> torch.Tensor:
        """`||softmax(theta) - pi||_2`."""
        with torch.no_grad():
            theta = self.theta()
            return torch.linalg.vector_norm(torch.softmax(theta, -1) - true_weights(theta.device))
