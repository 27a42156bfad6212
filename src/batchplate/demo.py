r"""`batchplate demo`: the problems of Pyro issue #2220, side by side, in under a minute.

Each row of the printed table puts stock Pyro's number, batchplate's number and
the exact number next to each other:

(a) the IWAE bound with a vectorized plate,
(b) the IWAE bound with a sequential plate,
(c) the scale of the ELBO gradient,
(d) the IWAE gradient of a discrete guide.

Every program below is written once and run under both libraries: stock Pyro
gets `plate=pyro.plate` and `pyro.infer`'s objective, batchplate gets
`plate=batch_plate` and batchplate's objective. The exact values come from
closed forms (the conjugate Gaussian) or from enumerating every `K`-tuple of
latent values (the Bernoulli model), never from either library. Monte Carlo
numbers are means over independent repeats, shown with their standard error.
"""

from __future__ import annotations

import itertools
import math
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TextIO

import pyro
import pyro.distributions as dist
import torch

import batchplate
from batchplate import batch_plate

# ---------------------------------------------------------------------------
# Program 1: the conjugate Gaussian of the scale example of Pyro issue #2220
# ---------------------------------------------------------------------------
#
# w_b ~ N(PRIOR_LOC, PRIOR_SCALE), x_b | w_b ~ N(w_b, OBS_SCALE). The exact
# amortized posterior is N(0.64 x + 3.06, 0.6); the demo's guide
# N(GUIDE_A x + GUIDE_C, exp(GUIDE_LOG_SCALE)) is deliberately not exact.

PRIOR_LOC, PRIOR_SCALE, OBS_SCALE = 8.5, 1.0, 0.75
GUIDE_A, GUIDE_C, GUIDE_LOG_SCALE = 0.5, 6.0, 0.0
NUM_DATA = 8


def gaussian_data(n: int = NUM_DATA, seed: int = 0) -> torch.Tensor:
    """`n` measurements drawn from the model."""
    g = torch.Generator().manual_seed(seed)
    w = PRIOR_LOC + PRIOR_SCALE * torch.randn(n, generator=g)
    return w + OBS_SCALE * torch.randn(n, generator=g)


def _gaussian_guide_params() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a = pyro.param("a", torch.tensor(GUIDE_A))
    c = pyro.param("c", torch.tensor(GUIDE_C))
    log_scale = pyro.param("log_scale", torch.tensor(GUIDE_LOG_SCALE))
    return a, c, log_scale


def model(x: torch.Tensor, plate: Callable = batch_plate) -> None:
    """Vectorized: `plate` is `pyro.plate` (stock) or `batch_plate`."""
    with plate("data", len(x)):
        w = pyro.sample("w", dist.Normal(PRIOR_LOC, PRIOR_SCALE))
        pyro.sample("x", dist.Normal(w, OBS_SCALE), obs=x)


def guide(x: torch.Tensor, plate: Callable = batch_plate) -> None:
    a, c, log_scale = _gaussian_guide_params()
    with plate("data", len(x)):
        pyro.sample("w", dist.Normal(a * x + c, log_scale.exp()))


def sequential_model(x: torch.Tensor, plate: Callable = batch_plate) -> None:
    """Sequential: one site per datum, as programs with stochastic control flow need."""
    for i in plate("data", len(x)):
        w = pyro.sample(f"w_{i}", dist.Normal(PRIOR_LOC, PRIOR_SCALE))
        pyro.sample(f"x_{i}", dist.Normal(w, OBS_SCALE), obs=x[i])


def sequential_guide(x: torch.Tensor, plate: Callable = batch_plate) -> None:
    a, c, log_scale = _gaussian_guide_params()
    for i in plate("data", len(x)):
        pyro.sample(f"w_{i}", dist.Normal(a * x[i] + c, log_scale.exp()))


def exact_log_evidence(x: torch.Tensor) -> torch.Tensor:
    """`log p(x_b) = log N(x_b; m, sqrt(s^2 + t^2))` (float64)."""
    scale = math.sqrt(PRIOR_SCALE**2 + OBS_SCALE**2)
    return dist.Normal(PRIOR_LOC, scale).log_prob(x.double())


def exact_elbo(
    x: torch.Tensor, a: torch.Tensor, c: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    r"""Per-datum ELBO $E_q[\log p(x_b, w) - \log q(w)]$ in closed form,
    $q = \mathcal{N}(\mu, r)$ with $\mu = a x_b + c$:

    $$
    \begin{aligned}
    E_q \log \mathcal{N}(w; m, s) &= -\tfrac12 \log(2 \pi s^2) - \frac{(\mu - m)^2 + r^2}{2 s^2}, \\
    E_q \log \mathcal{N}(x; w, t) &= -\tfrac12 \log(2 \pi t^2) - \frac{(x - \mu)^2 + r^2}{2 t^2}, \\
    H(q) &= \tfrac12 \log(2 \pi e r^2).
    \end{aligned}
    $$
    """
    x = x.double()
    mu, r2 = a * x + c, torch.exp(2 * log_scale)
    s2, t2 = PRIOR_SCALE**2, OBS_SCALE**2
    prior = -0.5 * math.log(2 * math.pi * s2) - ((mu - PRIOR_LOC) ** 2 + r2) / (2 * s2)
    likelihood = -0.5 * math.log(2 * math.pi * t2) - ((x - mu) ** 2 + r2) / (2 * t2)
    entropy = 0.5 * math.log(2 * math.pi * math.e) + log_scale
    return prior + likelihood + entropy


# ---------------------------------------------------------------------------
# Program 2: one Bernoulli site per datum
# ---------------------------------------------------------------------------
#
# z_b ~ Bernoulli(logits=theta), x_b | z_b ~ N(MU[z_b], SIGMA); the guide is
# q(z_b) = Bernoulli(logits=phi).

MU0, MU1, SIGMA = -1.0, 1.5, 1.0
BERNOULLI_X, PRIOR_LOGIT, GUIDE_LOGIT, BERNOULLI_K = -2.0, -1.0, 1.0, 3


def bernoulli_model(x: torch.Tensor, plate: Callable = batch_plate) -> None:
    theta = pyro.param("prior_logit", torch.tensor(PRIOR_LOGIT))
    with plate("data", len(x)):
        z = pyro.sample("z", dist.Bernoulli(logits=theta))
        pyro.sample("x", dist.Normal(MU0 + (MU1 - MU0) * z, SIGMA), obs=x)


def bernoulli_guide(x: torch.Tensor, plate: Callable = batch_plate) -> None:
    phi = pyro.param("guide_logit", torch.tensor(GUIDE_LOGIT))
    with plate("data", len(x)):
        pyro.sample("z", dist.Bernoulli(logits=phi))


def exact_iwae_guide_gradient(x: float, theta: float, phi: float, K: int) -> float:
    """`d/dphi E[log (1/K) sum_k exp l_k]` for one datum, exactly.

    The expectation over `z_1..z_K ~ q` is a finite sum over all `2**K`
    tuples, written as a function of `phi` (float64) and differentiated by
    autograd: both the tuple probabilities and the weights depend on `phi`.
    """
    phi_t = torch.tensor(phi, dtype=torch.float64, requires_grad=True)
    z = torch.tensor(list(itertools.product([0.0, 1.0], repeat=K)), dtype=torch.float64)
    log_q = dist.Bernoulli(logits=phi_t).log_prob(z)  # [2**K, K]
    log_p = dist.Bernoulli(logits=torch.tensor(theta, dtype=torch.float64)).log_prob(z)
    log_p = log_p + dist.Normal(MU0 + (MU1 - MU0) * z, SIGMA).log_prob(torch.tensor(x))
    bound = torch.logsumexp(log_p - log_q, dim=-1) - math.log(K)
    expected = (log_q.sum(-1).exp() * bound).sum()
    (grad,) = torch.autograd.grad(expected, phi_t)
    return float(grad)


# ---------------------------------------------------------------------------
# Monte Carlo estimates and their agreement
# ---------------------------------------------------------------------------

# Two-sided 99.9% quantiles of Student's t with df = 1, 2, ..., 30 degrees of
# freedom: a mean over n repeats is called consistent with a value when it lies
# within T * s.e., df = n - 1 (beyond df = 30 the df = 30 value, a little wide).
_T_999 = (
    636.6, 31.60, 12.92, 8.610, 6.869, 5.959, 5.408, 5.041, 4.781, 4.587,
    4.437, 4.318, 4.221, 4.140, 4.073, 4.015, 3.965, 3.922, 3.883, 3.850,
    3.819, 3.792, 3.768, 3.745, 3.725, 3.707, 3.690, 3.674, 3.659, 3.646,
)  # fmt: skip


@dataclass(frozen=True)
class Estimate:
    """Mean and standard error of `n` independent Monte Carlo repeats."""

    mean: float
    se: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Estimate:
        t = torch.tensor(values, dtype=torch.float64)
        se = float(t.std() / math.sqrt(len(values))) if len(values) > 1 else 0.0
        return cls(float(t.mean()), se, len(values))

    def scaled(self, factor: float) -> Estimate:
        return Estimate(self.mean * factor, self.se * abs(factor), self.n)

    def agrees_with(self, value: float, value_se: float = 0.0) -> bool:
        """Within the 99.9% t interval (`value_se`: another estimate's s.e.)."""
        if self.n < 2:
            return self.mean == value
        t = _T_999[min(self.n - 1, len(_T_999)) - 1]
        return abs(self.mean - value) <= t * math.hypot(self.se, value_se)


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table. `*_se` are Monte Carlo standard errors (0: not MC)."""

    key: str
    quantity: str
    stock: float
    batchplate: float
    exact: float
    verdict: str
    stock_se: float = 0.0
    batchplate_se: float = 0.0
    batchplate_ok: bool = True
    """batchplate's value agrees with the exact one within Monte Carlo error."""
    stock_form: str = ""
    """For the IWAE rows: what stock Pyro's value is, checked on the same particles."""

    @classmethod
    def of(
        cls,
        key: str,
        quantity: str,
        *,
        stock: Estimate,
        batchplate: Estimate,
        exact: float,
        verdict: str,
        stock_form: str = "",
    ) -> Row:
        """The row of two Monte Carlo estimates and the exact value."""
        return cls(
            key=key,
            quantity=quantity,
            stock=stock.mean,
            batchplate=batchplate.mean,
            exact=exact,
            verdict=verdict,
            stock_se=stock.se,
            batchplate_se=batchplate.se,
            batchplate_ok=batchplate.agrees_with(exact),
            stock_form=stock_form,
        )


@dataclass
class Settings:
    """Sizes of the tour; `quick` is a smaller one for tests."""

    iwae_particles: int = 1000
    iwae_repeats: int = 30
    sequential_particles: int = 500
    sequential_repeats: int = 4
    elbo_particles: int = 1000
    elbo_repeats: int = 20
    bernoulli_data: int = 2000
    bernoulli_repeats: int = 20

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            iwae_particles=1000,
            iwae_repeats=10,
            sequential_particles=250,
            sequential_repeats=4,
            elbo_particles=500,
            elbo_repeats=8,
            bernoulli_data=500,
            bernoulli_repeats=20,
        )


@dataclass
class DemoResult:
    rows: list[Row]
    seconds: float
    settings: Settings
    data: torch.Tensor
    notes: list[str] = field(default_factory=list)

    def row(self, key: str) -> Row:
        return next(r for r in self.rows if r.key == key)

    @property
    def ok(self) -> bool:
        """Every batchplate value agrees with the exact one."""
        return all(r.batchplate_ok for r in self.rows)


def _grad_of(name: str) -> float:
    """The gradient accumulated in `pyro.param(name)`, reset to `None`."""
    leaf = pyro.param(name).unconstrained()
    grad = 0.0 if leaf.grad is None else float(leaf.grad)
    leaf.grad = None
    return grad


def _ok(ok: bool) -> str:
    return "batchplate OK" if ok else "batchplate OFF"


def _paired(
    repeats: int, seed: int, stock: Callable[[], float], ours: Callable[[], float]
) -> tuple[list[float], list[float]]:
    """`repeats` values of stock Pyro's and of batchplate's computation, each
    repeat from a fresh parameter store and the same seed for both."""
    stock_values, ours_values = [], []
    for r in range(repeats):
        for compute, values in ((stock, stock_values), (ours, ours_values)):
            pyro.clear_param_store()
            pyro.set_rng_seed(seed + r)
            values.append(compute())
    return stock_values, ours_values


def _iwae_rows(x: torch.Tensor, settings: Settings, seed: int, layout: str) -> list[Row]:
    """IWAE value, stock vs batchplate, with a vectorized or a sequential plate.

    The vectorized plate runs with vectorized particles; the sequential plate
    with one trace per particle, as programs with stochastic control flow need
    (the setting of Pyro issue #2220).
    """
    if layout == "vectorized":
        m, g, label = model, guide, "(a) IWAE, vectorized plate"
        K, repeats, vectorize = settings.iwae_particles, settings.iwae_repeats, True
    else:
        m, g, label = sequential_model, sequential_guide, "(b) IWAE, sequential plate"
        K, repeats, vectorize = settings.sequential_particles, settings.sequential_repeats, False
    # Objectives are made anew for each call, as a user would.
    kw = {"alpha": 0, "num_particles": K, "vectorize_particles": vectorize}
    stock_values, ours_values = _paired(
        repeats,
        seed,
        lambda: -pyro.infer.RenyiELBO(max_plate_nesting=1, **kw).loss(m, g, x, plate=pyro.plate),
        lambda: -batchplate.RenyiELBO(**kw).loss(m, g, x, plate=batch_plate),
    )
    form = _stock_iwae_form(m, g, x, K, vectorize, seed, stock_values[0])
    stock, ours = Estimate.of(stock_values), Estimate.of(ours_values)
    per_datum = stock.scaled(1 / len(x))
    exact = float(exact_log_evidence(x).mean())
    raw_verdict, per_datum_verdict = _iwae_verdicts(form, per_datum, ours, exact, len(x))
    common = {"batchplate": ours, "exact": exact, "stock_form": form}
    return [
        Row.of(f"iwae_{layout}", f"{label}, K={K}", stock=stock, verdict=raw_verdict, **common),
        Row.of(
            f"iwae_{layout}_per_datum",
            f"    per datum (stock / {len(x)})",
            stock=per_datum,
            verdict=per_datum_verdict,
            **common,
        ),
    ]


def _iwae_verdicts(
    form: str, per_datum: Estimate, ours: Estimate, exact: float, B: int
) -> tuple[str, str]:
    """The verdicts of the raw and of the per-datum IWAE row (`per_datum`: stock's / B)."""
    # The IWAE bound lies below log p(x) by O(1/K): tiny for this guide at these K.
    ok = _ok(ours.agrees_with(exact))
    if form == SUM_OF_BOUNDS:
        return f"stock = batch sum ({B} x per datum)", f"same bound per datum; {ok}"
    if form == JOINT_BOUND:
        gap = per_datum.mean - exact
        return (
            "stock = one bound on the joint weight",
            f"stock {gap:+.2f}/datum: looser, wrong; {ok}",
        )
    return "stock: neither per-datum nor joint", ok


SUM_OF_BOUNDS = "sum over the batch of per-datum bounds"
JOINT_BOUND = "one bound on the joint weight of the batch"


def _stock_iwae_form(
    m: Callable,
    g: Callable,
    x: torch.Tensor,
    K: int,
    vectorize: bool,
    seed: int,
    stock_value: float,
) -> str:
    """What stock Pyro computed, checked on the very particles it drew.

    With the same seed, `batchplate.log_weights` traces the same program the
    same way and so draws the same particles: its `[K, B]` log weights give
    both candidate values, `sum_b log mean_k exp l[k, b]` and
    `log mean_k exp sum_b l[k, b]`, to compare with stock Pyro's value.
    """
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        log_w = batchplate.log_weights(
            m,
            g,
            x,
            plate=batch_plate,
            num_particles=K,
            vectorize_particles=vectorize,
            max_plate_nesting=1,
        ).double()
    candidates = {
        SUM_OF_BOUNDS: float((torch.logsumexp(log_w, 0) - math.log(K)).sum()),
        JOINT_BOUND: float(torch.logsumexp(log_w.sum(1), 0) - math.log(K)),
    }
    for form, value in candidates.items():
        if abs(value - stock_value) <= 1e-4 * abs(value) + 1e-3:
            return form
    return ""


def _gradient(
    objective: Callable[[], Any],
    program: tuple[Callable, Callable],
    x: torch.Tensor,
    plate: Callable,
    param: str,
) -> float:
    """`d(-loss)/d param` of one `loss_and_grads` call of a new `objective()`."""
    objective().loss_and_grads(*program, x, plate=plate)
    return -_grad_of(param)


def _elbo_gradient_row(x: torch.Tensor, settings: Settings, seed: int) -> Row:
    """d ELBO / d c (the guide's offset): stock's is B times the per-datum gradient."""
    K = settings.elbo_particles
    params = [
        torch.tensor(v, dtype=torch.float64, requires_grad=True)
        for v in (GUIDE_A, GUIDE_C, GUIDE_LOG_SCALE)
    ]
    exact = float(torch.autograd.grad(exact_elbo(x, *params).mean(), params[1])[0])
    kw = {"num_particles": K, "vectorize_particles": True}
    stock_objective = partial(pyro.infer.Trace_ELBO, max_plate_nesting=1, **kw)
    objective = partial(batchplate.Trace_ELBO, **kw)
    stock_grads, ours_grads = _paired(
        settings.elbo_repeats,
        seed,
        lambda: _gradient(stock_objective, (model, guide), x, pyro.plate, "c"),
        lambda: _gradient(objective, (model, guide), x, batch_plate, "c"),
    )
    stock, ours = Estimate.of(stock_grads), Estimate.of(ours_grads)
    return Row.of(
        "elbo_gradient",
        f"(c) ELBO gradient d/dc, K={K}",
        stock=stock,
        batchplate=ours,
        exact=exact,
        verdict=f"stock = {stock.mean / exact:.2f} x exact: too large; "
        + _ok(ours.agrees_with(exact)),
    )


def _discrete_gradient_row(settings: Settings, seed: int) -> Row:
    """IWAE (alpha=0) gradient of a discrete guide's logit: stock Pyro gives exactly 0."""
    K, n = BERNOULLI_K, settings.bernoulli_data
    x = torch.full((n,), BERNOULLI_X)
    exact = exact_iwae_guide_gradient(BERNOULLI_X, PRIOR_LOGIT, GUIDE_LOGIT, K)
    kw = {"alpha": 0, "num_particles": K, "vectorize_particles": True}
    stock_objective = partial(pyro.infer.RenyiELBO, max_plate_nesting=1, **kw)
    objective = partial(batchplate.RenyiELBO, **kw)
    program = (bernoulli_model, bernoulli_guide)
    stock_grads, ours_grads = _paired(
        settings.bernoulli_repeats,
        seed,
        # Stock Pyro sums over the batch; batchplate's is the mean of n per-datum estimates.
        lambda: _gradient(stock_objective, program, x, pyro.plate, "guide_logit") / n,
        lambda: _gradient(objective, program, x, batch_plate, "guide_logit"),
    )
    stock, ours = Estimate.of(stock_grads), Estimate.of(ours_grads)
    if all(v == 0.0 for v in stock_grads):
        stock_word = "stock exactly 0, every call"
    else:
        stock_word = f"stock {stock.mean:.3f}"
    return Row.of(
        "discrete_gradient",
        f"(d) IWAE grad d/dphi, discrete guide, K={K}",
        stock=stock,
        batchplate=ours,
        exact=exact,
        verdict=f"{stock_word}; {_ok(ours.agrees_with(exact))}",
    )


def run_demo(quick: bool = False, seed: int = 0) -> DemoResult:
    """Compute the table (no printing). `quick` uses fewer Monte Carlo repeats."""
    settings = Settings.quick() if quick else Settings()
    start = time.perf_counter()
    x = gaussian_data(NUM_DATA, seed=seed)
    rows = []
    rows += _iwae_rows(x, settings, seed, "vectorized")
    rows += _iwae_rows(x, settings, seed + 1000, "sequential")
    rows.append(_elbo_gradient_row(x, settings, seed + 2000))
    rows.append(_discrete_gradient_row(settings, seed + 3000))
    pyro.clear_param_store()
    notes = [
        f"Data: {NUM_DATA} draws of w ~ N({PRIOR_LOC}, {PRIOR_SCALE}), x | w ~ N(w, {OBS_SCALE}). "
        f"Guide: N({GUIDE_A} x + {GUIDE_C}, {math.exp(GUIDE_LOG_SCALE):g}), not the exact "
        "posterior N(0.64 x + 3.06, 0.6).",
        "(a), (b): the objective's value -loss. Exact: the mean over the batch of "
        "log p(x_b) = log N(x_b; 8.5, 1.25), which the per-datum IWAE bound approaches "
        "from below as K grows. (a) vectorizes particles; (b) traces one particle at a "
        "time (vectorize_particles=False), as programs with stochastic control flow must. "
        "What stock Pyro computed is checked on the particles it drew: "
        + "; ".join(
            f"{r.key.split('_')[1]} plate: {r.stock_form or 'neither candidate'}"
            for r in rows
            if r.key.startswith("iwae_") and not r.key.endswith("per_datum")
        )
        + ".",
        "(c): gradient of the ELBO for the guide's offset c. Exact: the closed-form "
        "expected ELBO, averaged over the batch, differentiated by autograd.",
        f"(d): z ~ Bernoulli(logits={PRIOR_LOGIT}), x | z ~ N({MU0} if z = 0 else {MU1}, "
        f"{SIGMA}), x = {BERNOULLI_X}, guide Bernoulli(logits={GUIDE_LOGIT}); each call sees "
        f"a batch of {settings.bernoulli_data} copies of x (stock's batch sum is divided by "
        f"{settings.bernoulli_data}). Exact: the expected gradient, summing over all "
        f"2^{BERNOULLI_K} K-tuples of z.",
        "Monte Carlo cells: mean +- standard error over independent calls with fixed seeds. "
        "OK: within the 99.9% t-interval of exact.",
    ]
    return DemoResult(rows, time.perf_counter() - start, settings, x, notes)


def _cell(value: float, se: float) -> str:
    text = f"{value:.3f}"
    return f"{text} +- {se:.3f}" if se > 0 else text


def format_table(rows: list[Row]) -> str:
    header = ("quantity", "stock Pyro", "batchplate", "exact", "verdict")
    cells = [
        (
            r.quantity,
            _cell(r.stock, r.stock_se),
            _cell(r.batchplate, r.batchplate_se),
            f"{r.exact:.3f}",
            r.verdict,
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(4)]

    def line(parts: tuple[str, ...]) -> str:
        left = parts[0].ljust(widths[0])
        numbers = "  ".join(p.rjust(w) for p, w in zip(parts[1:4], widths[1:4], strict=True))
        return f"{left}  {numbers}  {parts[4]}".rstrip()

    rule = "-" * (sum(widths) + 2 * 4 + len(header[4]))
    return "\n".join([line(header), rule, *(line(c) for c in cells)])


INTRO = """\
batchplate demo: three problems of Pyro issue #2220, stock Pyro vs batchplate vs exact.

The same model and guide run under both libraries; only the plate and the
objective's import change:

    stock:       pyro.infer.RenyiELBO(...)  with  model(x, plate=pyro.plate)
    batchplate:  batchplate.RenyiELBO(...)  with  model(x, plate=batchplate.batch_plate)
"""


def main(quick: bool = False, seed: int = 0, file: TextIO | None = None) -> DemoResult:
    """Run the tour and print it."""
    out = sys.stdout if file is None else file
    print(INTRO, file=out)
    result = run_demo(quick=quick, seed=seed)
    print(format_table(result.rows), file=out)
    print(file=out)
    for note in result.notes:
        print(textwrap.fill(note, width=100, subsequent_indent="  "), file=out)
    print(f"\nTook {result.seconds:.1f} s.", file=out)
    return result
