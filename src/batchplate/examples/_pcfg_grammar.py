"""The astronomers grammar of the PCFG example: its tables, the exact dynamic
programs over it, and sampling and padding of its sentences.

The grammar and its true production probabilities are `RULES` (drawn in the
`batchplate.examples.pcfg` docstring). Productions are indexed
`[nonterminal, r]`, padded to `R` per nonterminal; tokens are the indices of
`WORDS`, with `END` the end-of-sentence token.
"""

from __future__ import annotations

import math

import torch

NONTERMINALS = ("S", "NP", "VP", "PP", "P", "V")
WORDS = ("astronomers", "ears", "saw", "stars", "telescopes", "with")
END = len(WORDS)  # end-of-sentence token (also the padding)
VOCAB = len(WORDS) + 1
RULES: dict[str, list[tuple[tuple[str, str] | str, float]]] = {
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
    """`TABLES` on `device`."""
    return {k: v.to(device) for k, v in TABLES.items()}


def production_log_probs(theta: torch.Tensor) -> torch.Tensor:
    """`[NT, R]` log probabilities; padding productions get `NEG` (finite)."""
    valid = TABLES["valid"].to(theta.device)
    return torch.log_softmax(torch.where(valid, theta, torch.full_like(theta, NEG)), -1)


def log_length_normalizer(log_probs: torch.Tensor, max_words: int) -> torch.Tensor:
    """`log P(|yield of S| <= max_words)` by dynamic programming over yield lengths.

    `f[A][n] = P(A derives exactly n words)`: `f[A][1]` sums A's terminal
    productions; for `n > 1` each binary `A -> B C` adds
    `p(A -> B C) sum_m f[B][m] f[C][n-m]` (every symbol yields >= 1 word).
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


def emission_logits(eps: float, device: torch.device | str | None = None) -> torch.Tensor:
    """`[VOCAB, VOCAB]`: row `y` are the logits of `x` given produced token `y`."""
    off = math.log(eps / (VOCAB - 1))
    logits = torch.full((VOCAB, VOCAB), off, device=device)
    logits.fill_diagonal_(math.log1p(-eps))
    return logits


def total_variation(theta: torch.Tensor) -> torch.Tensor:
    """Mean over the learned nonterminals of `TV(softmax(theta_A), p_true_A)`."""
    probs = production_log_probs(theta.detach().cpu()).exp()
    tv = 0.5 * (probs - TABLES["probs"]).abs().sum(-1)
    return tv[list(LEARNED)].mean()


def inside_log_likelihood(
    log_probs: torch.Tensor, sentences: torch.Tensor, lengths: torch.Tensor, max_words: int
) -> torch.Tensor:
    """Exact `log p_theta(x_b | |x| <= max_words)` by the inside algorithm, shape `[N]`.

    `chart[n][i][:, A] = P(A derives words i .. i+n-1)`; the channel noise
    `eps` is left out (it changes these values by `O(eps)`).
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
    """The maximum-likelihood `theta` on `sentences` (exact likelihood, L-BFGS)."""
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
    """`n` yields of the grammar with at most `max_words` words (rejection sampling)."""
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
    """`[N, max_words + 1]` tokens padded with `END` (one END column at least), lengths."""
    x = torch.full((len(sentences), max_words + 1), END, dtype=torch.long)
    for i, s in enumerate(sentences):
        x[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return x, torch.tensor([len(s) for s in sentences])


def learned_probabilities(theta: torch.Tensor) -> dict[str, list[float]]:
    """The production probabilities of the learned nonterminals, rounded, by name."""
    probs = production_log_probs(theta.detach().cpu()).exp()
    return {
        NONTERMINALS[a]: [round(float(p), 4) for p in probs[a, : len(RULES[NONTERMINALS[a]])]]
        for a in LEARNED
    }
