"""Learning a probabilistic context-free grammar with RWS, in the DreamCoder spirit.

The seed discussion's motivating class of models ("DreamCoder-style
programmatic models") are programs whose latent is a *derivation*: its length
and shape depend on the sampled choices. This example learns the production
probabilities of the classic "astronomers" grammar::

    S  -> NP VP 1.0         PP -> P NP 1.0          P -> with 1.0   V -> saw 1.0
    VP -> V NP 0.7 | VP PP 0.3
    NP -> NP PP 0.4 | astronomers 0.1 | ears 0.18 | saw 0.04 | stars 0.18
        | telescopes 0.1

**Model.** Production probabilities ``softmax(theta_A)`` per nonterminal ``A``
(``theta`` learned; single-production nonterminals stay at 1). A derivation
``z`` is drawn leftmost-first: pop the leftmost pending nonterminal, sample its
production, push the children. Each terminal ``y_i`` of the yield emits the
sentence's token ``x_i`` through a noisy channel, ``p(x_i | y_i) = 1 - eps``
if equal and ``eps / 6`` for each other token (``eps = 1e-3``); after the last
terminal an end-of-sentence symbol is emitted the same way, so the yield must
have the sentence's length. The data are sentences of the true grammar with at
most ``max_words`` words (rejection sampling), so the model divides by
``Z(theta) = P_theta(|yield| <= max_words)``, computed exactly by a dynamic
program over yield lengths (a ``pyro.factor``): maximum likelihood then
recovers the true probabilities instead of shrinking the recursive productions.
(Yields longer than ``max_words`` get channel probability ``O(eps)`` instead of
exactly zero, a negligible difference.)

**Guide.** Amortized over sentences: a GRU encodes the sentence; a GRU cell
then chooses productions one at a time in leftmost-derivation order, fed with
the current nonterminal, the next two sentence tokens at the read pointer, the
pointer and the "slack" (words left minus pending nonterminals). Fixed
feasibility biases (``-15`` on the logits) discourage choices that cannot
produce a yield of the sentence's length (a binary production without room
for two more words, a terminal that ends the derivation early); a learned
weight favours terminal productions matching the next word. The guide keeps
full support.

**Two forms.** ``"sequential"``: one Python derivation per datum and particle
with a sequential :func:`~batchplate.batch_plate` (``vectorize_particles=
False``); sites ``f"{b}_r_{t}"`` (production), ``f"{b}_emit_{t}"``,
``f"{b}_end"``, ``f"{b}_trunc"``. ``"padded"``: all lanes at once with
:class:`~batchplate.Lanes` and :class:`~batchplate.LaneStack` (a stack per
lane), finished lanes masked; sites ``r_{t}``, ``r_emit_{t}``, ``r_end_{t}``,
``trunc``. On the same productions both give the same per-datum log weights.

Trained with :class:`~batchplate.ReweightedWakeSleep` (wake-wake) at batch
size > 1 (``"vimco"`` runs too). Tracked: the mean total-variation distance
between learned and true production distributions of ``NP`` and ``VP``; the
same distance to the maximum-likelihood estimate on the training sentences
(fitted beforehand by L-BFGS on the exact likelihood, which the inside
algorithm computes), whose own distance to the truth is the floor a finite
dataset allows; and the gap in exact mean log-likelihood to that maximum.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from torch import nn

import batchplate
from batchplate import batch_plate
from batchplate.examples import _common as common
from batchplate.padded import Lanes, LaneStack

NAME = "pcfg"
OBJECTIVES = ("rws", "vimco")
FORMS = ("padded", "sequential")
DEFAULTS: dict = {
    "objective": "rws",
    "num_particles": 16,
    "batch_size": 64,
    "steps": 1500,
    "lr": 0.02,
    "lr_final": 0.002,
    "form": "padded",
    "dataset_size": 2000,
    "max_words": 12,
    "eps": 1e-3,
    "hidden": 32,
    "eval_every": 25,
}

# -- the grammar -----------------------------------------------------------------

NONTERMINALS = ("S", "NP", "VP", "PP", "P", "V")
WORDS = ("astronomers", "ears", "saw", "stars", "telescopes", "with")
END = len(WORDS)  # end-of-sentence token (also the padding)
VOCAB = len(WORDS) + 1
RULES: dict[str, list] = {
    "S": [(("NP", "VP"), 1.0)],
    "NP": [
        (("NP", "PP"), 0.4),
        ("astronomers", 0.1),
        ("ears", 0.18),
        ("saw", 0.04),
        ("stars", 0.18),
        ("telescopes", 0.1),
    ],
    "VP": [(("V", "NP"), 0.7), (("VP", "PP"), 0.3)],
    "PP": [(("P", "NP"), 1.0)],
    "P": [("with", 1.0)],
    "V": [("saw", 1.0)],
}
START = NONTERMINALS.index("S")
R = max(len(r) for r in RULES.values())  # productions per nonterminal, padded
NEG = -1e4  # logit of a padding production: probability exactly 0 in float32, finite log


def _tables() -> dict[str, torch.Tensor]:
    n = len(NONTERMINALS)
    t = {
        "valid": torch.zeros(n, R, dtype=torch.bool),
        "binary": torch.zeros(n, R, dtype=torch.bool),
        "left": torch.zeros(n, R, dtype=torch.long),
        "right": torch.zeros(n, R, dtype=torch.long),
        "word": torch.zeros(n, R, dtype=torch.long),
        "probs": torch.zeros(n, R),
    }
    for a, name in enumerate(NONTERMINALS):
        for r, (rhs, p) in enumerate(RULES[name]):
            t["valid"][a, r] = True
            t["probs"][a, r] = p
            if isinstance(rhs, tuple):
                t["binary"][a, r] = True
                t["left"][a, r] = NONTERMINALS.index(rhs[0])
                t["right"][a, r] = NONTERMINALS.index(rhs[1])
            else:
                t["word"][a, r] = WORDS.index(rhs)
    # Shortest yield of each nonterminal (a fixed point), for the guide's feasibility bias.
    min_len = torch.full((n,), 10**6, dtype=torch.long)
    for _ in range(n):
        for a, name in enumerate(NONTERMINALS):
            for rhs, _p in RULES[name]:
                if isinstance(rhs, tuple):
                    b, c = NONTERMINALS.index(rhs[0]), NONTERMINALS.index(rhs[1])
                    length = min_len[b] + min_len[c]
                else:
                    length = 1
                min_len[a] = min(int(min_len[a]), int(length))
    t["min_len"] = min_len
    t["branch_len"] = torch.where(t["binary"], min_len[t["left"]] + min_len[t["right"]], 1)
    return t


TABLES = _tables()
LEARNED = tuple(a for a, name in enumerate(NONTERMINALS) if len(RULES[name]) > 1)


def tables(device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in TABLES.items()}


def production_log_probs(theta: torch.Tensor) -> torch.Tensor:
    """``[NT, R]`` log probabilities; padding productions get ``NEG`` (finite)."""
    valid = TABLES["valid"].to(theta.device)
    return torch.log_softmax(torch.where(valid, theta, torch.full_like(theta, NEG)), -1)


def log_length_normalizer(log_probs: torch.Tensor, max_words: int) -> torch.Tensor:
    """``log P(|yield of S| <= max_words)`` by dynamic programming over yield lengths.

    ``f[A][n] = P(A derives exactly n words)``: ``f[A][1]`` sums A's terminal
    productions; for ``n > 1`` each binary ``A -> B C`` adds
    ``p(A -> B C) sum_m f[B][m] f[C][n-m]`` (every symbol yields >= 1 word).
    """
    t = tables(log_probs.device)
    probs = log_probs.exp() * t["valid"]
    terminal = (probs * ~t["binary"]).sum(-1)  # [NT]
    binaries = t["binary"].nonzero().tolist()
    f = [None, terminal]  # f[n]: [NT]
    for n in range(2, max_words + 1):
        total = torch.zeros_like(terminal)
        for a, r in binaries:
            left, right = int(t["left"][a, r]), int(t["right"][a, r])
            inner = sum(f[m][left] * f[n - m][right] for m in range(1, n))
            total = total + torch.nn.functional.one_hot(torch.tensor(a), len(NONTERMINALS)).to(
                probs
            ) * (probs[a, r] * inner)
        f.append(total)
    return torch.log(sum(f[n][START] for n in range(1, max_words + 1)))


def emission_logits(eps: float, device=None) -> torch.Tensor:
    """``[VOCAB, VOCAB]``: row ``y`` are the logits of ``x`` given produced token ``y``."""
    off = math.log(eps / (VOCAB - 1))
    logits = torch.full((VOCAB, VOCAB), off, device=device)
    logits.fill_diagonal_(math.log1p(-eps))
    return logits


def total_variation(theta: torch.Tensor) -> torch.Tensor:
    """Mean over the learned nonterminals of ``TV(softmax(theta_A), p_true_A)``."""
    probs = production_log_probs(theta.detach().cpu()).exp()
    tv = 0.5 * (probs - TABLES["probs"]).abs().sum(-1)
    return tv[list(LEARNED)].mean()


def inside_log_likelihood(
    log_probs: torch.Tensor, sentences: torch.Tensor, lengths: torch.Tensor, max_words: int
) -> torch.Tensor:
    """Exact ``log p_theta(x_b | |x| <= max_words)`` by the inside algorithm, shape ``[N]``.

    ``chart[n][i][:, A] = P(A derives words i .. i+n-1)``; the channel noise
    ``eps`` is left out (it changes these values by ``O(eps)``).
    """
    t = tables(log_probs.device)
    probs = (log_probs.exp() * t["valid"]).double()
    n_nt = len(NONTERMINALS)
    emit = torch.zeros(n_nt, VOCAB, dtype=probs.dtype, device=probs.device)
    terminal = t["valid"] & ~t["binary"]
    for a in range(n_nt):
        for r in range(R):
            if terminal[a, r]:
                emit[a, t["word"][a, r]] += probs[a, r]
    binaries = [
        (a, r, int(t["left"][a, r]), int(t["right"][a, r]))
        for a, r in t["binary"].nonzero().tolist()
    ]
    chart = {1: [emit[:, sentences[:, i]].T for i in range(max_words)]}  # [N, NT]
    for n in range(2, max_words + 1):
        row = []
        for i in range(max_words - n + 1):
            cell = torch.zeros_like(chart[1][0])
            for a, r, left, right in binaries:
                inner = sum(
                    chart[m][i][:, left] * chart[n - m][i + m][:, right] for m in range(1, n)
                )
                cell[:, a] = cell[:, a] + probs[a, r] * inner
            row.append(cell)
        chart[n] = row
    top = torch.stack([chart[int(n)][0][b, START] for b, n in enumerate(lengths)])
    return top.log() - log_length_normalizer(log_probs, max_words).double()


def maximum_likelihood(
    sentences: torch.Tensor, lengths: torch.Tensor, max_words: int, steps: int = 300
) -> torch.Tensor:
    """The maximum-likelihood ``theta`` on ``sentences`` (exact likelihood, L-BFGS)."""
    theta = torch.zeros(len(NONTERMINALS), R, dtype=torch.float64, requires_grad=True)
    optim = torch.optim.LBFGS([theta], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optim.zero_grad()
        loss = -inside_log_likelihood(
            production_log_probs(theta), sentences, lengths, max_words
        ).mean()
        loss.backward()
        return loss

    optim.step(closure)
    return theta.detach().float()


def sample_sentences(
    n: int, max_words: int, seed: int = 0, probs: torch.Tensor | None = None
) -> list[list[int]]:
    """``n`` yields of the grammar with at most ``max_words`` words (rejection sampling)."""
    g = torch.Generator().manual_seed(seed)
    probs = TABLES["probs"] if probs is None else probs
    out: list[list[int]] = []
    while len(out) < n:
        stack, words = [START], []
        while stack and len(words) <= max_words:
            a = stack.pop()
            r = int(torch.multinomial(probs[a], 1, generator=g))
            if TABLES["binary"][a, r]:
                stack += [int(TABLES["right"][a, r]), int(TABLES["left"][a, r])]
            else:
                words.append(int(TABLES["word"][a, r]))
        if not stack and len(words) <= max_words:
            out.append(words)
    return out


def pad(sentences: list[list[int]], max_words: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, max_words + 1]`` tokens padded with ``END`` (one END column at least), lengths."""
    x = torch.full((len(sentences), max_words + 1), END, dtype=torch.long)
    for i, s in enumerate(sentences):
        x[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return x, torch.tensor([len(s) for s in sentences])


def sentence_text(tokens: torch.Tensor) -> str:
    return " ".join(WORDS[int(w)] for w in tokens if int(w) != END)


# -- the guide network ----------------------------------------------------------------


class GuideNet(nn.Module):
    """Sentence encoder (GRU) and a GRU cell that picks productions step by step.

    Works on any leading lane shape: ``step`` flattens it for the cell.
    """

    def __init__(self, max_words: int, hidden: int = 64, emb: int = 16) -> None:
        super().__init__()
        self.max_words = max_words
        self.hidden = hidden
        self.word_emb = nn.Embedding(VOCAB, emb)
        self.encoder = nn.GRU(emb, hidden, batch_first=True)
        self.nt_emb = nn.Embedding(len(NONTERMINALS), emb)
        n_features = 3 * emb + 6 + 2 + (max_words + 1)
        self.cell = nn.GRUCell(n_features, hidden)
        self.out = nn.Linear(hidden, R)
        self.match = nn.Parameter(torch.tensor(3.0))

    def encode(self, sentences: torch.Tensor) -> torch.Tensor:
        """``[B, L+1]`` tokens to ``[B, hidden]``."""
        _, h = self.encoder(self.word_emb(sentences))
        return h[-1]

    def step(
        self,
        h: torch.Tensor,
        nonterminal: torch.Tensor,
        next_words: torch.Tensor,
        pointer: torch.Tensor,
        pending: torch.Tensor,
        need: torch.Tensor,
        remaining: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One derivation step: new hidden state and production logits ``[..., R]``.

        ``next_words`` is ``[..., 2]`` (tokens at the pointer and after it);
        ``pending`` counts the nonterminals left on the stack, ``need`` their
        shortest total yield, ``remaining`` the words still to produce.
        """
        lead = nonterminal.shape
        slack = (remaining - need).clamp(-1, 4) + 1
        features = torch.cat(
            [
                self.nt_emb(nonterminal),
                self.word_emb(next_words).flatten(-2),
                nn.functional.one_hot(slack, 6).to(h.dtype),
                nn.functional.one_hot((pending == 0).long(), 2).to(h.dtype),
                nn.functional.one_hot(pointer.clamp(max=self.max_words), self.max_words + 1).to(
                    h.dtype
                ),
            ],
            -1,
        )
        h = self.cell(features.reshape(-1, features.shape[-1]), h.reshape(-1, self.hidden))
        h = h.reshape(lead + (self.hidden,))
        logits = self.out(h)
        t = tables(h.device)
        binary = t["binary"][nonterminal]  # [..., R]
        word = t["word"][nonterminal]
        matches = (~binary) & (word == next_words[..., :1])
        logits = logits + self.match * matches
        # Fixed feasibility biases: the yield must have exactly `remaining` more words.
        room = (remaining - need).unsqueeze(-1)
        cannot_branch = binary & (room < t["branch_len"][nonterminal])
        ends_early = ((pending == 0) & (remaining > 1)).unsqueeze(-1) & ~binary
        logits = logits - 15.0 * (cannot_branch | ends_early)
        valid = t["valid"][nonterminal]
        return h, torch.where(valid, logits, torch.full_like(logits, NEG))


# -- the programs ----------------------------------------------------------------------


class PCFG:
    """Model and guide, in both forms, sharing parameters ``pcfg_theta`` and ``pcfg_guide``."""

    def __init__(
        self,
        max_words: int = DEFAULTS["max_words"],
        eps: float = DEFAULTS["eps"],
        hidden: int = DEFAULTS["hidden"],
        max_steps: int | None = None,
    ) -> None:
        self.max_words = max_words
        self.eps = eps
        self.net = GuideNet(max_words, hidden)
        # A yield of n words takes 2n - 1 steps; leave room for the guide's detours.
        self.max_steps = 8 * max_words if max_steps is None else max_steps

    def theta(self, device=None) -> torch.Tensor:
        return pyro.param("pcfg_theta", lambda: torch.zeros(len(NONTERMINALS), R, device=device))

    def _model_terms(self, device):
        log_probs = production_log_probs(self.theta(device))
        log_z = log_length_normalizer(log_probs, self.max_words)
        return log_probs, log_z, emission_logits(self.eps, device)

    # padded ---------------------------------------------------------------

    def _padded(self, sentences, lengths, guide: bool):
        device = sentences.device
        t = tables(device)
        if guide:
            net = pyro.module("pcfg_guide", self.net)
            h0 = net.encode(sentences)
        else:
            log_probs, log_z, emit = self._model_terms(device)
        L = self.max_words
        with batch_plate("data", len(sentences)):
            lanes = Lanes("r", self.max_steps, device=device)
            stack = LaneStack(lanes, depth=self.max_steps + 1, fill=START)
            stack.push(START)
            pointer = lanes.zeros(dtype=torch.long)
            words = sentences.expand(lanes.shape + sentences.shape[-1:])
            length = lengths.expand(lanes.shape)
            if guide:
                h = h0.expand(lanes.shape + h0.shape[-1:])
                need = lanes.full(int(t["min_len"][START]), dtype=torch.long)
            for _ in lanes:
                a = stack.pop()
                here = pointer.clamp(max=L).unsqueeze(-1)
                current = words.gather(-1, here).squeeze(-1)
                if guide:
                    nxt = words.gather(-1, (here + 1).clamp(max=L)).squeeze(-1)
                    need = lanes.where(need - t["min_len"][a], need)
                    h, logits = net.step(
                        h,
                        a,
                        torch.stack([current, nxt], -1),
                        pointer,
                        stack.size,
                        need,
                        length - pointer,
                    )
                    r = lanes.sample(dist.Categorical(logits=logits))
                else:
                    r = lanes.sample(dist.Categorical(logits=log_probs[a]))
                binary = t["binary"][a, r]
                if not guide:
                    lanes.sample(
                        dist.Categorical(logits=emit[t["word"][a, r]]),
                        obs=current,
                        site="emit",
                        when=~binary,
                    )
                pointer = lanes.where(pointer + (~binary).long(), pointer)
                if guide:
                    need = lanes.where(need + t["branch_len"][a, r] * binary, need)
                stack.push(t["right"][a, r], where=lanes.active & binary)
                stack.push(t["left"][a, r], where=lanes.active & binary)
                done = stack.empty
                if not guide:
                    end = words.gather(-1, pointer.clamp(max=L).unsqueeze(-1)).squeeze(-1)
                    lanes.sample(dist.Categorical(logits=emit[END]), obs=end, site="end", when=done)
                lanes.finish(done)
            if not guide:
                # Expanded to the lanes: a factor's (empty) value then has the batch dim.
                pyro.factor("trunc", -log_z.expand(lanes.shape))

    def model_padded(self, sentences, lengths, observations=None) -> None:
        self._padded(sentences, lengths, guide=False)

    def guide_padded(self, sentences, lengths, observations=None) -> None:
        self._padded(sentences, lengths, guide=True)

    # sequential -----------------------------------------------------------------

    def _sequential(self, sentences, lengths, guide: bool):
        device = sentences.device
        t = tables(device)
        if guide:
            net = pyro.module("pcfg_guide", self.net)
            h0 = net.encode(sentences)
        else:
            log_probs, log_z, emit = self._model_terms(device)
        L = self.max_words
        for b in batch_plate("data", len(sentences)):
            stack, pointer, n = [START], 0, int(lengths[b])
            words = sentences[b]
            h = h0[b] if guide else None
            need = int(t["min_len"][START])  # shortest yield of the stack
            step = 0
            while stack:
                if step >= self.max_steps:
                    raise batchplate.PaddedLoopError(
                        f"derivation of datum {b} exceeded max_steps={self.max_steps}"
                    )
                a = stack.pop()
                need -= int(t["min_len"][a])
                current = words[min(pointer, L)]
                if guide:
                    nxt = words[min(pointer + 1, L)]
                    h, logits = net.step(
                        h,
                        torch.tensor(a, device=device),
                        torch.stack([current, nxt]),
                        torch.tensor(pointer, device=device),
                        torch.tensor(len(stack), device=device),
                        torch.tensor(need, device=device),
                        torch.tensor(n - pointer, device=device),
                    )
                    r = pyro.sample(f"{b}_r_{step}", dist.Categorical(logits=logits))
                else:
                    r = pyro.sample(f"{b}_r_{step}", dist.Categorical(logits=log_probs[a]))
                r = int(r)
                if t["binary"][a, r]:
                    stack += [int(t["right"][a, r]), int(t["left"][a, r])]
                    need += int(t["branch_len"][a, r])
                else:
                    if not guide:
                        pyro.sample(
                            f"{b}_emit_{step}",
                            dist.Categorical(logits=emit[t["word"][a, r]]),
                            obs=current,
                        )
                    pointer += 1
                step += 1
            if not guide:
                end = words[min(pointer, L)]
                pyro.sample(f"{b}_end", dist.Categorical(logits=emit[END]), obs=end)
                pyro.factor(f"{b}_trunc", -log_z)

    def model_sequential(self, sentences, lengths, observations=None) -> None:
        self._sequential(sentences, lengths, guide=False)

    def guide_sequential(self, sentences, lengths, observations=None) -> None:
        self._sequential(sentences, lengths, guide=True)

    def program(self, form: str):
        """``(model, guide)`` of the given form."""
        if form == "padded":
            return self.model_padded, self.guide_padded
        if form == "sequential":
            return self.model_sequential, self.guide_sequential
        raise ValueError(f"unknown form {form!r}; choose one of {FORMS}")


def make_objective(name: str, num_particles: int, form: str):
    """The batchplate objective called ``name``; particles vectorized for the padded form."""
    return common.make_objective(
        name, num_particles, vectorize_particles=form == "padded", allowed=OBJECTIVES
    )


def learned_probabilities(theta: torch.Tensor) -> dict[str, list[float]]:
    probs = production_log_probs(theta.detach().cpu()).exp()
    return {
        NONTERMINALS[a]: [round(float(p), 4) for p in probs[a, : len(RULES[NONTERMINALS[a]])]]
        for a in LEARNED
    }


def train(
    objective: str,
    num_particles: int,
    *,
    batch_size: int,
    steps: int,
    lr: float,
    lr_final: float | None = DEFAULTS["lr_final"],
    form: str = "padded",
    seed: int = 0,
    dataset_size: int = DEFAULTS["dataset_size"],
    max_words: int = DEFAULTS["max_words"],
    eps: float = DEFAULTS["eps"],
    hidden: int = DEFAULTS["hidden"],
    eval_every: int = DEFAULTS["eval_every"],
    bar=None,
) -> tuple[PCFG, dict]:
    """Train on minibatches of ``dataset_size`` sentences of the true grammar.

    Adam's learning rate decays geometrically from ``lr`` to ``lr_final``
    (constant when None). Every ``eval_every`` steps the history records the
    mean TV distance to the true probabilities (``tv``), to the
    maximum-likelihood ones on the same data (``tv_mle``), and the gap in exact
    mean log-likelihood to the maximum (``loglik_gap``, inside algorithm).
    """
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    sentences, lengths = pad(sample_sentences(dataset_size, max_words, seed=seed), max_words)
    theta_mle = maximum_likelihood(sentences, lengths, max_words)
    best = float(
        inside_log_likelihood(production_log_probs(theta_mle), sentences, lengths, max_words).mean()
    )
    mle_probs = production_log_probs(theta_mle).exp()

    def evaluate(theta: torch.Tensor) -> tuple[float, float, float]:
        log_probs = production_log_probs(theta.detach().cpu())
        tv_mle = 0.5 * (log_probs.exp() - mle_probs).abs().sum(-1)[list(LEARNED)].mean()
        ll = inside_log_likelihood(log_probs, sentences, lengths, max_words).mean()
        return float(total_variation(theta)), float(tv_mle), best - float(ll)

    pcfg = PCFG(max_words, eps, hidden)
    model, guide = pcfg.program(form)
    decay = 1.0 if lr_final is None else (lr_final / lr) ** (1.0 / max(1, steps))
    optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": decay, "clip_norm": math.inf})
    svi = pyro.infer.SVI(model, guide, optim, make_objective(objective, num_particles, form))
    history: dict = {"step": [], "tv": [], "tv_mle": [], "loglik_gap": [], "loss": []}

    def record(step: int, theta: torch.Tensor, running: float) -> None:
        tv, tv_mle, gap = evaluate(theta)
        history["step"].append(step)
        history["tv"].append(tv)
        history["tv_mle"].append(tv_mle)
        history["loglik_gap"].append(gap)
        history["loss"].append(running)

    record(0, torch.zeros(len(NONTERMINALS), R), math.nan)
    running = math.nan
    for step in range(1, steps + 1):
        idx = torch.randint(dataset_size, (batch_size,))
        loss = svi.step(sentences[idx], lengths[idx])
        loss = loss[0] if isinstance(loss, tuple) else loss
        running = loss if math.isnan(running) else 0.95 * running + 0.05 * loss
        if step % eval_every == 0 or step == steps:
            record(step, pyro.param("pcfg_theta"), running)
            if bar is not None:
                bar.set_postfix(loss=f"{running:.3f}", tv=f"{history['tv'][-1]:.4f}")
        if bar is not None:
            bar.update(1)
    history["mle_tv"] = float(total_variation(theta_mle))
    history["mle_probabilities"] = learned_probabilities(theta_mle)
    return pcfg, history


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
    lr_final: float | None = DEFAULTS["lr_final"],
    form: str = DEFAULTS["form"],
    dataset_size: int = DEFAULTS["dataset_size"],
    max_words: int = DEFAULTS["max_words"],
    eps: float = DEFAULTS["eps"],
    hidden: int = DEFAULTS["hidden"],
    eval_every: int = DEFAULTS["eval_every"],
) -> dict:
    """Learn the grammar's production probabilities; plot the distances to the truth
    and to the maximum-likelihood estimate, and the log-likelihood gap.

    Returns ``tv`` (final mean TV to the true probabilities), ``tv_tail`` (mean
    of the last 10% of evaluations), ``initial_tv``, ``mle_tv`` (the
    maximum-likelihood estimate's own TV to the truth: the floor set by the
    finite dataset), ``tv_mle`` (final TV to that estimate), ``loglik_gap``
    (nats per sentence below the maximum), the learned and maximum-likelihood
    ``probabilities`` of NP and VP, ``final_loss``, ``seconds``,
    ``ms_per_step`` and ``plot``.
    """

    common.check_choice("objective", objective, OBJECTIVES)
    common.check_choice("form", form, FORMS)
    out = common.output_dir(out_dir)
    stem = f"{NAME}-{objective}"
    bar = common.progress_bar(steps, f"{stem} ({form})", progress)
    t0 = time.perf_counter()
    _, history = train(
        objective,
        num_particles,
        batch_size=batch_size,
        steps=steps,
        lr=lr,
        lr_final=lr_final,
        form=form,
        seed=seed,
        dataset_size=dataset_size,
        max_words=max_words,
        eps=eps,
        hidden=hidden,
        eval_every=eval_every,
        bar=bar,
    )
    seconds = time.perf_counter() - t0
    bar.close()

    plt = common.pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
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
    fig.suptitle(f"PCFG ({form}), {objective}, K={num_particles}, B={batch_size}", fontsize=10)
    plot = common.save_figure(fig, out / f"{stem}.png")

    tv = history["tv"]
    n_tail = max(1, len(tv[1:]) // 10)
    metrics = {
        "example": NAME,
        "objective": objective,
        "form": form,
        "num_particles": num_particles,
        "batch_size": batch_size,
        "steps": steps,
        "lr": lr,
        "lr_final": lr_final,
        "seed": seed,
        "tv": tv[-1],
        "tv_tail": sum(tv[-n_tail:]) / n_tail,
        "initial_tv": tv[0],
        "mle_tv": history["mle_tv"],
        "tv_mle": history["tv_mle"][-1],
        "loglik_gap": history["loglik_gap"][-1],
        "initial_loglik_gap": history["loglik_gap"][0],
        "probabilities": learned_probabilities(pyro.param("pcfg_theta")),
        "mle_probabilities": history["mle_probabilities"],
        "final_loss": history["loss"][-1],
        "seconds": seconds,
        "ms_per_step": 1000 * seconds / max(1, steps),
        "plot": str(plot),
    }
    if progress:
        print(f"plot: {plot}")
        print(
            f"{stem} ({form}) K={num_particles} B={batch_size}: mean TV to truth "
            f"{metrics['tv']:.4f} (start {metrics['initial_tv']:.4f}, "
            f"MLE {metrics['mle_tv']:.4f}), "
            f"to MLE {metrics['tv_mle']:.4f}, log-lik gap {metrics['loglik_gap']:.4f} nats; "
            f"learned {metrics['probabilities']}; {seconds:.0f} s"
        )
    return metrics
