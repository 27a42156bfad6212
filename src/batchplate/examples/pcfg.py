r"""Learning a probabilistic context-free grammar with RWS, in the DreamCoder spirit.

Pyro issue #2220 names "DreamCoder-style programmatic models" as a motivating
class of models: programs whose latent is a *derivation*, whose length and
shape depend on the sampled choices. This example learns the production
probabilities of the classic "astronomers" grammar:

```text
S  -> NP VP 1.0         PP -> P NP 1.0          P -> with 1.0   V -> saw 1.0
VP -> V NP 0.7 | VP PP 0.3
NP -> NP PP 0.4 | astronomers 0.1 | ears 0.18 | saw 0.04 | stars 0.18
    | telescopes 0.1
```

**Model.** Production probabilities `softmax(theta_A)` per nonterminal `A`
(`theta` learned; single-production nonterminals stay at 1). A derivation `z`
is drawn leftmost-first: pop the leftmost pending nonterminal, sample its
production, push the children. Each terminal `y_i` of the yield emits the
sentence's token `x_i` through a noisy channel,
$p(x_i \mid y_i) = 1 - \epsilon$ if equal and $\epsilon / 6$ for each other
token ($\epsilon = 10^{-3}$); after the last terminal an end-of-sentence symbol
is emitted the same way, so the yield must have the sentence's length. The
data are sentences of the true grammar with at most `max_words` words
(rejection sampling), so the model divides by
$Z(\theta) = P_\theta(|\mathrm{yield}| \le \mathrm{max\_words})$, computed
exactly by a dynamic program over yield lengths (a `pyro.factor`): maximum
likelihood then recovers the true probabilities instead of shrinking the
recursive productions. (Yields longer than `max_words` get channel probability
$O(\epsilon)$ instead of exactly zero, a negligible difference.)

**Guide.** Amortized over sentences: `GuideNet` reads the sentence and picks
the productions one at a time in the same leftmost order, with fixed biases
against productions that cannot yield the sentence's length.

**Two forms.** `"sequential"`: one Python derivation per datum and particle
with a sequential `batch_plate` (`vectorize_particles=False`); sites
`f"{b}_r_{t}"` (production), `f"{b}_emit_{t}"`, `f"{b}_end"`, `f"{b}_trunc"`.
`"padded"`: all lanes at once with `Lanes` and `LaneStack` (a stack per lane),
finished lanes masked; sites `r_{t}`, `r_emit_{t}`, `r_end_{t}`, `trunc`. On
the same productions both give the same per-datum log weights. `"autobatch"`:
the sequential programs run with `autobatch=True` (all `K * B` derivations at
once, productions and the guide's GRU steps batched per round).

Trained with `ReweightedWakeSleep` (wake-wake) at batch size > 1 (`"vimco"`
runs too). Tracked: the mean total-variation distance between learned and true
production distributions of `NP` and `VP`; the same distance to the
maximum-likelihood estimate on the training sentences (fitted beforehand by
L-BFGS on the exact likelihood, which the inside algorithm computes), whose
own distance to the truth is the floor a finite dataset allows; and the gap in
exact mean log-likelihood to that maximum.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch

import batchplate
from batchplate.examples import _common as common
from batchplate.examples import _runner as runner
from batchplate.examples._pcfg_grammar import (
    END,
    LEARNED,
    NONTERMINALS,
    START,
    TABLES,
    WORDS,
    R,
    inside_log_likelihood,
    learned_probabilities,
    log_length_normalizer,
    maximum_likelihood,
    pad,
    production_log_probs,
    sample_sentences,
    total_variation,
)
from batchplate.examples._pcfg_programs import FORMS, PCFG, GuideNet

# The grammar's and the programs' names are part of this example's API (`pcfg.pad`, ...).
__all__ = [
    "END",
    "FORMS",
    "LEARNED",
    "NONTERMINALS",
    "PCFG",
    "R",
    "START",
    "TABLES",
    "WORDS",
    "GuideNet",
    "Options",
    "inside_log_likelihood",
    "learned_probabilities",
    "log_length_normalizer",
    "make_objective",
    "pad",
    "production_log_probs",
    "run",
    "sample_sentences",
    "train",
]

NAME = "pcfg"
OBJECTIVES = ("rws", "vimco")


@dataclass(frozen=True, kw_only=True)
class Options(runner.Options):
    """The keywords of `run()`: the shared ones, then this example's.

    :param lr_final: Adam's learning rate at the last step (decaying
        geometrically from `lr`; constant when None).
    :param form: `"padded"`, `"sequential"` or `"autobatch"` (the sequential
        programs with `autobatch=True`).
    :param dataset_size: number of training sentences.
    :param max_words: longest sentence.
    :param eps: the channel's probability of a wrong token.
    :param hidden: width of the guide network.
    :param eval_every: steps between two records of the history.
    """

    OBJECTIVES = OBJECTIVES
    CHOICES = {"form": FORMS}

    objective: str = "rws"
    num_particles: int = 16
    batch_size: int = 64
    steps: int = 1500
    lr: float = 0.02
    lr_final: float | None = 0.002
    form: str = "padded"
    dataset_size: int = 2000
    max_words: int = 12
    eps: float = 1e-3
    hidden: int = 32
    eval_every: int = 25


DEFAULTS = runner.defaults(Options)


def make_objective(name: str, num_particles: int, form: str) -> batchplate.BatchObjective:
    """The batchplate objective called `name`; particles vectorized for the padded
    and autobatch forms (for the latter: all `K * B` lanes in one run)."""
    return common.make_objective(
        name,
        num_particles,
        vectorize_particles=form != "sequential",
        allowed=OBJECTIVES,
        autobatch=form == "autobatch",
    )


# -- training ----------------------------------------------------------------------


def _evaluator(
    sentences: torch.Tensor, lengths: torch.Tensor, max_words: int
) -> tuple[Callable[[torch.Tensor], tuple[float, float, float]], torch.Tensor]:
    """`(evaluate, theta_mle)`: `evaluate(theta)` is `theta`'s mean TV to the true
    probabilities, its mean TV to the maximum-likelihood ones `theta_mle`, and its
    gap in exact mean log-likelihood to the maximum."""
    theta_mle = maximum_likelihood(sentences, lengths, max_words)
    mle_log_probs = production_log_probs(theta_mle)
    best = float(inside_log_likelihood(mle_log_probs, sentences, lengths, max_words).mean())

    def evaluate(theta: torch.Tensor) -> tuple[float, float, float]:
        log_probs = production_log_probs(theta.detach().cpu())
        tv_mle = 0.5 * (log_probs.exp() - mle_log_probs.exp()).abs().sum(-1)[list(LEARNED)].mean()
        ll = inside_log_likelihood(log_probs, sentences, lengths, max_words).mean()
        return float(total_variation(theta)), float(tv_mle), best - float(ll)

    return evaluate, theta_mle


def train(options: Options, bar: Any = None) -> dict:
    """Train on minibatches of `dataset_size` sentences of the true grammar.

    Every `eval_every` steps the history records the mean TV distance to the
    true probabilities (`tv`), to the maximum-likelihood ones on the same data
    (`tv_mle`), and the gap in exact mean log-likelihood to the maximum
    (`loglik_gap`, inside algorithm).
    """
    o = options
    pyro.clear_param_store()
    pyro.set_rng_seed(o.seed)
    sentences, lengths = pad(
        sample_sentences(o.dataset_size, o.max_words, seed=o.seed), o.max_words
    )
    evaluate, theta_mle = _evaluator(sentences, lengths, o.max_words)
    model, guide = PCFG(o.max_words, o.eps, o.hidden).program(o.form)
    optim = common.decaying_adam(o.lr, o.lr_final, o.steps)
    svi = pyro.infer.SVI(model, guide, optim, make_objective(o.objective, o.num_particles, o.form))
    history: dict = {"step": [], "tv": [], "tv_mle": [], "loglik_gap": [], "loss": []}

    def record(step: int, running: float) -> dict[str, str]:
        theta = pyro.param("pcfg_theta") if step else torch.zeros(len(NONTERMINALS), R)
        for key, value in zip(("tv", "tv_mle", "loglik_gap"), evaluate(theta), strict=True):
            history[key].append(value)
        history["step"].append(step)
        history["loss"].append(running)
        return {"loss": f"{running:.3f}", "tv": f"{history['tv'][-1]:.4f}"}

    def step(_: int):
        idx = torch.randint(o.dataset_size, (o.batch_size,))
        return svi.step(sentences[idx], lengths[idx])

    record(0, float("nan"))
    runner.train_loop(step, o.steps, every=o.eval_every, record=record, bar=bar)
    history["mle_tv"] = float(total_variation(theta_mle))
    history["mle_probabilities"] = learned_probabilities(theta_mle)
    history["probabilities"] = learned_probabilities(pyro.param("pcfg_theta"))
    return history


def _figures(history: dict, o: Options) -> dict[str, Any]:
    fig, axes = common.pyplot().subplots(1, 2, figsize=(9, 3.5))
    axes[0].plot(history["step"], history["tv"], label="to the true grammar")
    axes[0].plot(history["step"], history["tv_mle"], label="to the maximum-likelihood fit")
    axes[0].axhline(history["mle_tv"], color="k", ls="--", lw=0.8, label="MLE to true (floor)")
    axes[0].set_ylabel("mean TV over NP, VP productions")
    axes[0].legend(fontsize=7)
    axes[1].plot(history["step"], [max(v, 1e-6) for v in history["loglik_gap"]])
    axes[1].set_ylabel("max mean log p(x) - mean log p_theta(x)")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both")
    title = f"PCFG ({o.form}), {o.objective}, K={o.num_particles}, B={o.batch_size}"
    fig.suptitle(title, fontsize=10)
    return {"plot": fig}


def _metrics(history: dict, o: Options, seconds: float, paths: dict[str, Path]) -> dict:
    tv = history["tv"]
    n_tail = max(1, len(tv[1:]) // 10)
    return {
        "example": NAME,
        **o.pick("objective", "form", "num_particles", "batch_size", "steps", "lr", "lr_final"),
        "seed": o.seed,
        "tv": tv[-1],
        "tv_tail": sum(tv[-n_tail:]) / n_tail,
        "initial_tv": tv[0],
        "mle_tv": history["mle_tv"],
        "tv_mle": history["tv_mle"][-1],
        "loglik_gap": history["loglik_gap"][-1],
        "initial_loglik_gap": history["loglik_gap"][0],
        "probabilities": history["probabilities"],
        "mle_probabilities": history["mle_probabilities"],
        "final_loss": history["loss"][-1],
        **runner.timing(seconds, o.steps),
        "plot": str(paths["plot"]),
    }


def _summary(m: dict) -> str:
    return (
        f"K={m['num_particles']} B={m['batch_size']}: mean TV to truth {m['tv']:.4f} "
        f"(start {m['initial_tv']:.4f}, MLE {m['mle_tv']:.4f}), to MLE {m['tv_mle']:.4f}, "
        f"log-lik gap {m['loglik_gap']:.4f} nats; learned {m['probabilities']}; "
        f"{m['seconds']:.0f} s"
    )


EXAMPLE = runner.Example(NAME, train, _figures, _metrics, _summary, lambda o: f" ({o.form})")


def run(**options: Any) -> dict:
    """Learn the grammar's production probabilities; plot the distances to the truth
    and to the maximum-likelihood estimate, and the log-likelihood gap.

    :param options: the fields of `Options` (defaults there).
    :returns: `tv` (final mean TV to the true probabilities), `tv_tail` (mean
        of the last 10% of evaluations), `initial_tv`, `mle_tv` (the
        maximum-likelihood estimate's own TV to the truth: the floor set by the
        finite dataset), `tv_mle` (final TV to that estimate), `loglik_gap`
        (nats per sentence below the maximum), the learned and maximum-likelihood
        `probabilities` of NP and VP, `final_loss`, `seconds`, `ms_per_step`,
        `plot` and the options of the run.
    """
    return runner.run_example(EXAMPLE, Options(**options))
