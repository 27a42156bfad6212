"""The PCFG example's programs: the model and the guide, each in a padded and a
sequential form, and the guide's network.

The guide network: a GRU encodes the sentence; a GRU cell then chooses
productions one at a time in leftmost-derivation order, fed with the current
nonterminal, the next two sentence tokens at the read pointer, the pointer and
the "slack" (words left minus the shortest yield of the pending nonterminals).
Fixed feasibility biases (`-15` on the logits) discourage choices that cannot
produce a yield of the sentence's length; a learned weight favours terminal
productions matching the next word. The guide keeps full support.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from torch import nn

import batchplate
from batchplate import batch_plate
from batchplate.autobatch import once
from batchplate.examples import _common as common
from batchplate.examples._pcfg_grammar import (
    END,
    NEG,
    NONTERMINALS,
    START,
    TABLES,
    VOCAB,
    R,
    emission_logits,
    log_length_normalizer,
    production_log_probs,
    tables,
)
from batchplate.padded import Lanes, LaneStack

#: `"autobatch"` runs the sequential programs with `autobatch=True`.
FORMS = ("padded", "sequential", "autobatch")

#: The grammar's tables as Python lists, for the sequential programs' per-step
#: lookups (indexing a tensor costs microseconds, a list tens of nanoseconds).
TABLE_LISTS = {name: table.tolist() for name, table in TABLES.items()}

#: The fixed bias against infeasible productions (a binary production without room
#: for its shortest yield, a terminal that ends the derivation early).
INFEASIBLE = 15.0


class GuideNet(nn.Module):
    """Sentence encoder (GRU) and a GRU cell that picks productions step by step.

    Works on any leading lane shape: `step` flattens it for the cell.
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
        """`[B, L+1]` tokens to `[B, hidden]`."""
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
        """One derivation step: new hidden state and production logits `[..., R]`.

        `next_words` is `[..., 2]` (tokens at the pointer and after it);
        `pending` counts the nonterminals left on the stack, `need` their
        shortest total yield, `remaining` the words still to produce.
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
        logits = logits - INFEASIBLE * (cannot_branch | ends_early)
        valid = t["valid"][nonterminal]
        return h, torch.where(valid, logits, torch.full_like(logits, NEG))


def _word_at(words: torch.Tensor, pointer: torch.Tensor, max_words: int) -> torch.Tensor:
    """Each lane's token at its read pointer (`END` past the sentence)."""
    return words.gather(-1, pointer.clamp(max=max_words).unsqueeze(-1)).squeeze(-1)


class PCFG:
    """Model and guide, in both forms, sharing parameters `pcfg_theta` and `pcfg_guide`.

    `model_padded`/`guide_padded` and `model_sequential`/`guide_sequential`
    take `(sentences, lengths)`: tokens `[B, max_words + 1]` padded with `END`,
    and the sentences' lengths `[B]`.
    """

    def __init__(
        self,
        max_words: int = 12,
        eps: float = 1e-3,
        hidden: int = 32,
        max_steps: int | None = None,
    ) -> None:
        self.max_words = max_words
        self.eps = eps
        self.net = GuideNet(max_words, hidden)
        # A yield of n words takes 2n - 1 steps; leave room for the guide's detours.
        self.max_steps = 8 * max_words if max_steps is None else max_steps

    def theta(self, device: torch.device | str | None = None) -> torch.Tensor:
        return pyro.param("pcfg_theta", lambda: torch.zeros(len(NONTERMINALS), R, device=device))

    def _model_terms(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        log_probs = production_log_probs(self.theta(device))
        log_z = log_length_normalizer(log_probs, self.max_words)
        return log_probs, log_z, emission_logits(self.eps, device)

    def program(self, form: str) -> tuple[Callable, Callable]:
        """`(model, guide)` of the given form."""
        common.check_choice("form", form, FORMS)
        if form == "padded":
            return self.model_padded, self.guide_padded
        return self.model_sequential, self.guide_sequential

    # -- padded --------------------------------------------------------------------

    def _lanes(self, sentences: torch.Tensor) -> tuple[Lanes, LaneStack]:
        lanes = Lanes("r", self.max_steps, device=sentences.device)
        stack = LaneStack(lanes, depth=self.max_steps + 1, fill=START)
        stack.push(START)
        return lanes, stack

    @staticmethod
    def _expand(
        lanes: Lanes, stack: LaneStack, pointer: torch.Tensor, a: torch.Tensor, r: torch.Tensor
    ) -> torch.Tensor:
        """Push a binary production's children; move the pointer past a terminal."""
        t = tables(pointer.device)
        binary = t["binary"][a, r]
        pointer = lanes.where(pointer + (~binary).long(), pointer)
        stack.push(t["right"][a, r], where=lanes.active & binary)
        stack.push(t["left"][a, r], where=lanes.active & binary)
        return pointer

    def model_padded(
        self, sentences: torch.Tensor, lengths: torch.Tensor, observations: dict | None = None
    ) -> None:
        t = tables(sentences.device)
        log_probs, log_z, emit = self._model_terms(sentences.device)
        with batch_plate("data", len(sentences)):
            lanes, stack = self._lanes(sentences)
            pointer = lanes.zeros(dtype=torch.long)
            words = sentences.expand(lanes.shape + sentences.shape[-1:])
            for _ in lanes:
                a = stack.pop()
                current = _word_at(words, pointer, self.max_words)
                r = lanes.sample(dist.Categorical(logits=log_probs[a]))
                terminal = ~t["binary"][a, r]
                word_logits = emit[t["word"][a, r]]
                lanes.sample(
                    dist.Categorical(logits=word_logits), obs=current, site="emit", when=terminal
                )
                pointer = self._expand(lanes, stack, pointer, a, r)
                end = _word_at(words, pointer, self.max_words)
                done = stack.empty
                lanes.sample(dist.Categorical(logits=emit[END]), obs=end, site="end", when=done)
                lanes.finish(done)
            # Expanded to the lanes: a factor's (empty) value then has the batch dim.
            pyro.factor("trunc", -log_z.expand(lanes.shape))

    def guide_padded(
        self, sentences: torch.Tensor, lengths: torch.Tensor, observations: dict | None = None
    ) -> None:
        t = tables(sentences.device)
        net = pyro.module("pcfg_guide", self.net)
        h0 = net.encode(sentences)
        with batch_plate("data", len(sentences)):
            lanes, stack = self._lanes(sentences)
            pointer = lanes.zeros(dtype=torch.long)
            words = sentences.expand(lanes.shape + sentences.shape[-1:])
            length = lengths.expand(lanes.shape)
            h = h0.expand(lanes.shape + h0.shape[-1:])
            need = lanes.full(int(t["min_len"][START]), dtype=torch.long)
            for _ in lanes:
                a = stack.pop()
                next_words = torch.stack(
                    [_word_at(words, p, self.max_words) for p in (pointer, pointer + 1)], -1
                )
                need = lanes.where(need - t["min_len"][a], need)
                remaining = length - pointer
                h, logits = net.step(h, a, next_words, pointer, stack.size, need, remaining)
                r = lanes.sample(dist.Categorical(logits=logits))
                need = lanes.where(need + t["branch_len"][a, r] * t["binary"][a, r], need)
                pointer = self._expand(lanes, stack, pointer, a, r)
                lanes.finish(stack.empty)

    # -- sequential ----------------------------------------------------------------

    def _check_steps(self, b: int, step: int) -> None:
        if step >= self.max_steps:
            raise batchplate.PaddedLoopError(
                f"derivation of datum {b} exceeded max_steps={self.max_steps}"
            )

    def model_sequential(
        self, sentences: torch.Tensor, lengths: torch.Tensor, observations: dict | None = None
    ) -> None:
        t = TABLE_LISTS
        # Once per draw under autobatch, not once per lane (the normalizer's graph is large).
        log_probs, log_z, emit = once(self._model_terms, sentences.device)
        trunc = once(torch.neg, log_z)
        for b in batch_plate("data", len(sentences)):
            words, stack, pointer, step = sentences[b], [START], 0, 0
            while stack:
                self._check_steps(b, step)
                a = stack.pop()
                r = int(pyro.sample(f"{b}_r_{step}", dist.Categorical(logits=log_probs[a])))
                if t["binary"][a][r]:
                    stack += [t["right"][a][r], t["left"][a][r]]
                else:
                    word = words[min(pointer, self.max_words)]
                    word_logits = emit[t["word"][a][r]]
                    pyro.sample(f"{b}_emit_{step}", dist.Categorical(logits=word_logits), obs=word)
                    pointer += 1
                step += 1
            end = words[min(pointer, self.max_words)]
            pyro.sample(f"{b}_end", dist.Categorical(logits=emit[END]), obs=end)
            pyro.factor(f"{b}_trunc", trunc)

    def guide_sequential(
        self, sentences: torch.Tensor, lengths: torch.Tensor, observations: dict | None = None
    ) -> None:
        device, t = sentences.device, TABLE_LISTS
        net = pyro.module("pcfg_guide", self.net)
        h0 = net.encode(sentences)
        L = self.max_words
        for b in batch_plate("data", len(sentences)):
            words, stack, pointer, step = sentences[b], [START], 0, 0
            h, n = h0[b], int(lengths[b])
            need = t["min_len"][START]  # shortest yield of the stack
            while stack:
                self._check_steps(b, step)
                a = stack.pop()
                need -= t["min_len"][a]
                next_words = words[[min(pointer, L), min(pointer + 1, L)]]
                state = (pointer, len(stack), need, n - pointer)
                h, logits = net.step(
                    h,
                    torch.tensor(a, device=device),
                    next_words,
                    *(torch.tensor(v, device=device) for v in state),
                )
                r = int(pyro.sample(f"{b}_r_{step}", dist.Categorical(logits=logits)))
                if t["binary"][a][r]:
                    stack += [t["right"][a][r], t["left"][a][r]]
                    need += t["branch_len"][a][r]
                else:
                    pointer += 1
                step += 1
