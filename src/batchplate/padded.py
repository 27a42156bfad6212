r"""Padded traces: stochastic-length loops and recursions over all lanes at once.

A program whose control flow depends on sampled values (a geometric loop, a
grammar derivation) normally needs one trace per particle and a sequential
batch plate: `K * B` Python executions per step. When the data are
conditionally independent and only the *lengths* differ, the same program can
be written once over all **lanes** (every particle of every datum, the shape of
the vectorized batch plate times the particle plate): each step samples a site
for every lane, and the lanes that have already finished are masked with
`pyro.poutine.mask`, so they contribute `0` to $\log p$ and $\log q$. On the
same latent values the per-datum log weights then equal the sequential
program's (the Contract page (docs/contract.md), "Padded traces"):

$$
l[k, b] = \sum_{t < T[k, b]} (\log p_t - \log q_t)[k, b]
        = \sum_t \mathrm{mask}_t[k, b]\, (\log p_t - \log q_t)[k, b],
$$

where $T[k, b]$ is lane $(k, b)$'s own number of steps. The trace has
$\max_{k, b} T[k, b]$ steps, and the loop stops as soon as every lane is done.

Example: the geometric program of Pyro issue #2220, before (sequential, one
Python recursion per datum and particle) and after (padded):

```python
def geometric(prefix, i, logits):          # sequential
    if pyro.sample(f"{prefix}_{i}", dist.Bernoulli(logits=logits)).item() == 1:
        return 0
    return geometric(prefix, i + 1, logits) + 1

def geometric(name, logits, max_steps=100):  # padded, inside batch_plate(...)
    lanes = Lanes(name, max_steps)
    g = lanes.zeros(dtype=torch.long)
    for t in lanes:
        flip = lanes.sample(dist.Bernoulli(logits=logits))  # site f"{name}_{t}"
        g = lanes.where(g + (1 - flip).long(), g)           # update running lanes only
        lanes.finish(flip == 1)
    return g
```

Model and guide both run the loop. The guide draws every step's values and the
model replays them, so as long as a lane's "done" test is a function of the
sampled values (and of the data), the model's loop runs exactly as many steps
as the guide's and both traces have the same sites.

Finished lanes still get values (drawn by the guide, ignored by the weights).
Keep the distributions of finished lanes *valid and finite*: a masked entry's
`log_prob` is replaced by zero in the forward pass, but a `-inf` or NaN
there still poisons gradients (`0 * inf = nan`). Use `Lanes.safe` to
give finished lanes a harmless value (a valid index, a finite logit).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import pyro
import torch
from pyro import poutine
from pyro.poutine.runtime import get_plates

from .errors import BatchPlateError

ON_MAX = ("error", "warn")


class PaddedLoopError(BatchPlateError):
    """A padded loop reached `max_steps` while some lanes were still running."""


def lane_shape() -> torch.Size:
    """The batch shape of the vectorized plates currently active (particle plate included).

    This is the shape every sample site gets inside those plates, e.g.
    `[K, B]` inside a batch plate at dim `-1` with vectorized particles, or
    `[B]` without. A subsampled plate contributes its subsample size `B`, not
    the dataset size `N`.

    :returns: the lane shape; `torch.Size([])` outside any vectorized plate.
    """
    # Pyro's public view of the enclosing plates: each frame's `size` is the
    # subsample size (`full_size` is N); sequential plates have no dim.
    dims = {frame.dim: int(frame.size) for frame in get_plates() if frame.vectorized}
    if not dims:
        return torch.Size()
    n = -min(dims)
    return torch.Size(dims.get(d, 1) for d in range(-n, 0))


class Lanes:
    """The state of a stochastic-length loop over all lanes of the enclosing plates.

    Create it inside the (vectorized) batch plate, in the model and in the
    guide alike, then iterate over it:

    ```python
    lanes = Lanes("g", max_steps=100)
    for t in lanes:              # stops when every lane is done
        x = lanes.sample(dist.Bernoulli(logits=0.0))   # site "g_{t}", masked
        lanes.finish(x == 1)
    ```

    Attributes: `shape` (lane shape, see `lane_shape`), `active`
    (bool tensor of running lanes), `t` (current step), `steps` (long
    tensor: steps each lane has run so far, its trace length).

    :param name: prefix of the loop's sample sites: `f"{name}_{t}"` for the
        main site of step `t`, `f"{name}_{site}_{t}"` for others.
    :param max_steps: bound on the number of steps. Reaching it with lanes
        still running raises [PaddedLoopError][batchplate.PaddedLoopError] (`on_max="error"`,
        the default) or, with `on_max="warn"`, warns and stops, which
        **truncates** those lanes (a biased program: use it only when the
        truncation is part of your model).
    :param on_max: `"error"` or `"warn"`.
    :param active: initial running lanes (a bool tensor broadcastable to the
        lane shape); all lanes by default.
    :param device: device of the lane tensors (default: that of `active`, or CPU).
    """

    def __init__(
        self,
        name: str,
        max_steps: int,
        *,
        on_max: str = "error",
        active: torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if on_max not in ON_MAX:
            raise ValueError(f"on_max must be one of {ON_MAX}, got {on_max!r}")
        if not (isinstance(max_steps, int) and max_steps >= 1):
            raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
        self.name = name
        self.max_steps = max_steps
        self.on_max = on_max
        self.shape = lane_shape()
        if device is None:
            device = active.device if isinstance(active, torch.Tensor) else None
        self.device = torch.device("cpu") if device is None else torch.device(device)
        running = torch.ones(self.shape, dtype=torch.bool, device=self.device)
        if active is not None:
            running = running & torch.as_tensor(active, dtype=torch.bool, device=self.device)
        self.active = running
        self.steps = torch.zeros(self.shape, dtype=torch.long, device=self.device)
        self.t = -1
        self.truncated = False

    # -- the loop ------------------------------------------------------------

    def __iter__(self) -> Iterator[int]:
        for t in range(self.max_steps):
            if not bool(self.active.any()):
                return
            self.t = t
            running = self.active
            yield t
            self.steps = self.steps + running.long()
        if bool(self.active.any()):
            running = int(self.active.sum())
            message = (
                f"padded loop '{self.name}' reached max_steps={self.max_steps} with "
                f"{running} of {self.active.numel()} lanes still running. Raise max_steps "
                "(the trace only has as many steps as its longest lane needs), or pass "
                "on_max='warn' to truncate those lanes on purpose (this changes the model)."
            )
            if self.on_max == "error":
                raise PaddedLoopError(message)
            self.truncated = True
            warnings.warn(message, RuntimeWarning, stacklevel=2)

    def finish(self, done: torch.Tensor | bool) -> None:
        """Mark lanes where `done` is true as finished (from the next site on).

        Sites sampled later in the current step are still unmasked for these
        lanes unless sampled with `when=`; call `finish` last in a step.
        """
        done = torch.as_tensor(done, dtype=torch.bool, device=self.device)
        self.active = self.active & ~done

    # -- sites -----------------------------------------------------------------

    def site_name(self, site: str | None = None) -> str:
        """`f"{name}_{t}"`, or `f"{name}_{site}_{t}"`."""
        if self.t < 0:
            raise RuntimeError(f"padded loop '{self.name}': sample sites belong inside the loop")
        return f"{self.name}_{self.t}" if site is None else f"{self.name}_{site}_{self.t}"

    def mask(self, when: torch.Tensor | None = None) -> contextlib.AbstractContextManager:
        """`poutine.mask` to the running lanes (and `when`, if given).

        For sample sites you name yourself inside the loop body.
        """
        mask = self.active if when is None else self.active & when
        return poutine.mask(mask=mask)

    def sample(
        self,
        fn: pyro.distributions.Distribution,
        *,
        obs: torch.Tensor | None = None,
        site: str | None = None,
        when: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """`pyro.sample` of this step's site, masked to the running lanes.

        :param fn: the distribution; its batch shape broadcasts to the lanes
            (the enclosing plates expand it).
        :param obs: observed value (as in `pyro.sample`).
        :param site: extra name part for a step with several sites.
        :param when: further restrict the site to lanes where this is true
            (e.g. an emission that only happens on some steps).
        """
        # The mark lets strict matching name the loop when model and guide finish differently.
        infer = dict(kwargs.pop("infer", None) or {}, padded_loop=self.name)
        with self.mask(when):
            return pyro.sample(self.site_name(site), fn, obs=obs, infer=infer, **kwargs)

    # -- state helpers -----------------------------------------------------------

    def _active_like(self, value: torch.Tensor) -> torch.Tensor:
        # Dims of `value` beyond the lane shape are trailing (event) dims.
        extra = value.dim() - len(self.shape)
        return self.active.reshape(self.active.shape + (1,) * extra) if extra > 0 else self.active

    def where(self, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """`new` on running lanes, `old` on finished ones (state updates).

        Tensors with more dims than the lane shape have trailing per-lane
        dims (a hidden state `[*lanes, H]`).
        """
        new = torch.as_tensor(new)
        return torch.where(self._active_like(new), new, old)

    def safe(self, value: torch.Tensor, fill: float | int | torch.Tensor) -> torch.Tensor:
        """`value` on running lanes, the harmless `fill` on finished ones.

        Use it on whatever feeds a distribution (indices, probabilities,
        scales) so masked lanes never produce non-finite log probs or
        gradients. Trailing dims beyond the lane shape are per-lane (e.g. the
        probabilities of a categorical).
        """
        fill = torch.as_tensor(fill, dtype=value.dtype, device=value.device)
        return torch.where(self._active_like(value), value, fill)

    def zeros(self, *trailing: int, dtype: torch.dtype = torch.float) -> torch.Tensor:
        """A lane-shaped tensor of zeros (with optional trailing dims)."""
        return torch.zeros(self.shape + torch.Size(trailing), dtype=dtype, device=self.device)

    def full(
        self, fill: float | int | bool, *trailing: int, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """A lane-shaped tensor filled with `fill` (with optional trailing dims)."""
        return torch.full(self.shape + torch.Size(trailing), fill, dtype=dtype, device=self.device)


class LaneStack:
    """A stack of small integers per lane, for recursions written as loops.

    A recursion over lanes (a grammar's leftmost derivation, a tree walk)
    becomes a padded loop with an explicit stack: pop the top symbol, sample
    its expansion, push the children. Storage is a `[*lanes, depth]` long
    tensor plus a per-lane size; pushing beyond `depth` raises
    [PaddedLoopError][batchplate.PaddedLoopError].

    :param lanes: the loop whose lanes own the stack.
    :param depth: capacity per lane.
    :param fill: value read from an empty stack (keep it a valid symbol, so
        finished lanes stay safe).
    """

    def __init__(self, lanes: Lanes, depth: int, fill: int = 0) -> None:
        self.lanes = lanes
        self.depth = depth
        self.fill = fill
        self.data = lanes.full(fill, depth, dtype=torch.long)
        self.size = lanes.zeros(dtype=torch.long)

    @property
    def empty(self) -> torch.Tensor:
        return self.size == 0

    def top(self) -> torch.Tensor:
        """The top symbol of each lane (`fill` where empty)."""
        index = (self.size - 1).clamp(min=0).unsqueeze(-1)
        top = self.data.gather(-1, index).squeeze(-1)
        return torch.where(self.empty, torch.full_like(top, self.fill), top)

    def pop(self, where: torch.Tensor | None = None) -> torch.Tensor:
        """Pop on lanes where `where` (default: running lanes) and the stack is non-empty."""
        where = self.lanes.active if where is None else where
        top = self.top()
        self.size = torch.where(where & ~self.empty, self.size - 1, self.size)
        return top

    def push(self, symbol: torch.Tensor | int, where: torch.Tensor | None = None) -> None:
        """Push `symbol` on lanes where `where` (default: running lanes)."""
        where = self.lanes.active if where is None else where
        symbol = torch.as_tensor(symbol, dtype=torch.long, device=self.data.device)
        where = where.expand(self.size.shape)
        if bool((where & (self.size >= self.depth)).any()):
            raise PaddedLoopError(
                f"stack of padded loop '{self.lanes.name}' overflowed its depth {self.depth}; "
                "raise depth."
            )
        index = self.size.clamp(max=self.depth - 1).unsqueeze(-1)
        current = self.data.gather(-1, index).squeeze(-1)
        value = torch.where(where, symbol.expand(self.size.shape), current)
        self.data = self.data.scatter(-1, index, value.unsqueeze(-1))
        self.size = self.size + where.long()
