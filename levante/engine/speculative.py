"""Speculative decoding: guess a few tokens per decoding sequence, check them all in one forward.

Before each step a proposer guesses up to K tokens to follow every decoding sequence
(`Sequence.draft_token_ids`): prompt lookup (`NgramProposer`) or a small draft model
(engine/draft.py). The scheduler computes them right after the sequence's last token, a small
prefill of K+1 tokens, and the runner returns logits for each of those positions.
`Speculator.verify` then keeps the longest run of drafts the target model agrees with, plus
one token of its own:

* greedy: a draft is kept while it is the row's argmax, so the output is plain decoding's;
* sampling: rejection sampling (Leviathan et al. 2023; Chen et al. 2023): a draft x drawn from
  q is kept with probability min(1, p(x) / q(x)); at the first rejection the token is drawn
  from max(0, p - q), renormalised; after K kept drafts one more comes from p. The output
  follows p exactly. For prompt lookup q is a point mass at x: keep x with probability p(x),
  else draw from p without x.

p is what plain decoding would draw from at that position: the row's logits through the same
grammar mask, bias, penalties, temperature and top-k/p/min-p (`Sampler.distributions`), the
drafts before it counted as generated (`SequenceWithDrafts`). Rejected drafts never reach the
sequence, its grammar (masks are computed on a rolled-back walk) or its prefix-cache hashes
(`Scheduler.advance` counts only accepted ones); their KV slots lie past
`num_computed_tokens`, and the next step overwrites them.
"""
from __future__ import annotations

import numpy as np
import torch

from levante.config import SpeculativeConfig
from levante.engine.sampler import Sampler, draw
from levante.engine.scheduler import ScheduledSequence
from levante.engine.sequence import Sequence, Status


class NgramProposer:
    """Prompt lookup: find the longest suffix of the sequence (`min_n` to `max_n` tokens) that
    occurred before, at its most recent occurrence, and propose the tokens that followed it."""

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        last = len(token_ids) - 1
        if last < self.min_n or k <= 0:
            return []
        tokens = np.asarray(token_ids)
        # Ends of earlier n-grams equal to the suffix of length n, for n = 1, 2, ...: each round keeps the
        # ends whose n-gram also matches one token further back.
        ends = np.flatnonzero(tokens[:last] == tokens[last])
        best = -1
        for n in range(1, min(self.max_n, last) + 1):
            if ends.size == 0:
                break
            if n >= self.min_n:
                best = int(ends[-1])  # the most recent occurrence of the longest suffix so far
            ends = ends[ends >= n]
            ends = ends[tokens[ends - n] == tokens[last - n]]
        if best < 0:
            return []
        return tokens[best + 1:best + 1 + k].tolist()


class SequenceWithDrafts:
    """A sequence as it would stand with `extra` tokens appended: what the sampler reads for the row
    of a draft (penalties and min_tokens count the drafts before it; `grammar`: that row's mask)."""

    __slots__ = ("seq", "extra", "params", "grammar")

    def __init__(self, seq: Sequence, extra: list[int], grammar=None):
        self.seq, self.extra, self.params, self.grammar = seq, extra, seq.params, grammar

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids + self.extra

    @property
    def output_token_ids(self) -> list[int]:
        return self.seq.output_token_ids + self.extra

    @property
    def num_output_tokens(self) -> int:
        return self.seq.num_output_tokens + len(self.extra)


def rejection_sample(target: torch.Tensor, drafts: list[int], draft_probs: torch.Tensor | None,
                     generator: torch.Generator | None) -> list[int]:
    """The tokens a sampled sequence gets from one verification: the kept drafts, then one drawn.

    `target`: [len(drafts) + 1, vocab] what plain decoding draws from at each position;
    `draft_probs`: [len(drafts), vocab] what each draft was drawn from, None for a point mass
    (prompt lookup). Random numbers come from `generator` (a seeded sequence's), else torch's."""
    k = len(drafts)
    index = torch.arange(k, device=target.device)
    drafted = torch.tensor(drafts, device=target.device)
    p = target[index, drafted].tolist()
    q = [1.0] * k if draft_probs is None else draft_probs[index, drafted].tolist()
    uniform = torch.rand(k, generator=generator).tolist()
    for j in range(k):
        if uniform[j] * q[j] < p[j]:  # u < p / q
            continue
        if draft_probs is None:
            residual = target[j].clone()
            residual[drafts[j]] = 0
        else:
            residual = (target[j] - draft_probs[j]).clamp_(min=0)
        if not residual.sum() > 0:  # p == q up to rounding: nothing left to correct
            residual = target[j]
        return drafts[:j] + [_draw_one(residual, generator)]
    return drafts + [_draw_one(target[k], generator)]


def _draw_one(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(draw(probs.unsqueeze(0), [generator])[0])


class Speculator:
    """Proposes drafts before each step and verifies them after its forward; counts what it did
    (`num_draft_tokens` checked, `num_accepted_tokens` kept) for /metrics."""

    def __init__(self, config: SpeculativeConfig, draft=None, max_step_rows: int | None = None):
        self.config = config
        # Rows a step may have and still be cheap (None: no limit): drafts are proposed only within it.
        self.max_step_rows = max_step_rows
        self.k = config.num_speculative_tokens
        self.ngram = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max) \
            if config.method == "ngram" else None
        self.draft = draft  # engine/draft.py's DraftProposer, for method "draft"
        self._draft_probs: dict[int, torch.Tensor] = {}  # seq_id -> [drafts, vocab], sampled sequences
        self.num_drafts = 0  # sequence-steps that checked drafts
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0

    def kv_bytes_per_token(self) -> int:
        return 0 if self.draft is None else self.draft.kv_bytes_per_token

    def propose(self, running: list[Sequence], max_model_len: int) -> None:
        """Set `draft_token_ids` of every running sequence: drafts for those decoding, [] for others."""
        self._draft_probs.clear()
        decoding, budgets = [], []
        rows_left = None
        if self.max_step_rows is not None:  # each running sequence computes at least what it has pending
            rows_left = self.max_step_rows - sum(len(seq.token_ids) - seq.num_computed_tokens for seq in running)
        for seq in running:
            seq.draft_token_ids = []
            k = self._budget(seq, max_model_len)
            if rows_left is not None:
                k = min(k, rows_left)
                rows_left -= max(0, k)
            if k > 0:
                decoding.append(seq)
                budgets.append(k)
        if not decoding:
            return
        if self.ngram is not None:
            proposals = [(self.ngram.propose(seq.token_ids, k), None) for seq, k in zip(decoding, budgets)]
        else:
            proposals = self.draft.propose(decoding, budgets)
        for seq, (drafts, probs) in zip(decoding, proposals):
            if drafts and seq.grammar is not None:
                drafts = drafts[:seq.grammar.valid_prefix(drafts)]  # the rest could never be kept
            seq.draft_token_ids = drafts
            if drafts and probs is not None and not seq.params.greedy:
                self._draft_probs[seq.seq_id] = probs

    def _budget(self, seq: Sequence, max_model_len: int) -> int:
        """Drafts worth proposing: a decoding sequence (its last token the only one to compute), no more
        than its remaining tokens less the one every step yields anyway."""
        if seq.status is not Status.RUNNING or seq.num_output_tokens == 0 \
                or seq.num_computed_tokens != len(seq.token_ids) - 1:
            return 0
        left = max_model_len - len(seq.token_ids)
        if seq.params.max_tokens is not None:
            left = min(left, seq.params.max_tokens - seq.num_output_tokens)
        return min(self.k, left - 1)

    def verify(self, sampler: Sampler, logits: torch.Tensor, items: list[ScheduledSequence],
               first_rows: list[int]) -> list[tuple[list[int], torch.Tensor | None]]:
        """For each item with drafts (its rows of `logits` from `first_rows`): the tokens it gets, and
        their raw logprob rows when it asks for logprobs. Changes no state (a failed step may re-run it),
        but for the random draws of sampled sequences."""
        positions, rows, checked = [], [], []
        for item, first in zip(items, first_rows):
            seq, drafts = item.seq, list(item.drafts)
            masks = None
            if seq.grammar is not None:
                masks = seq.grammar.masks_along(drafts)
                drafts = drafts[:len(masks) - 1]  # all of them, as proposals are checked against the grammar
            positions.extend(SequenceWithDrafts(seq, drafts[:j], masks and masks[j])
                             for j in range(len(drafts) + 1))
            rows.extend(range(first, first + len(drafts) + 1))
            checked.append(drafts)
        # One speculating sequence (or several in a row): a view, not a gather of [rows, vocab].
        logits = logits[rows[0]:rows[-1] + 1] if rows[-1] - rows[0] + 1 == len(rows) else logits[rows]
        raw = logits.log_softmax(-1) if any(item.seq.params.logprobs is not None for item in items) else None
        argmax, probs = sampler.distributions(logits, positions)
        results, row = [], 0
        for item, drafts in zip(items, checked):
            seq, count = item.seq, len(drafts) + 1
            if seq.params.greedy:
                kept = 0
                while kept < len(drafts) and argmax[row + kept] == drafts[kept]:
                    kept += 1
                tokens = drafts[:kept] + [argmax[row + kept]]
            else:
                draft_probs = self._draft_probs.get(seq.seq_id)
                tokens = rejection_sample(probs[row:row + count], drafts,
                                          None if draft_probs is None else draft_probs[:len(drafts)],
                                          seq.generator)
            results.append((tokens, None if raw is None else raw[row:row + count]))
            row += count
        return results

    def count(self, item: ScheduledSequence, tokens: list[int]) -> None:
        """Record a verification: `tokens` (those `verify` gave) for the drafts of `item`."""
        self.num_drafts += 1
        self.num_draft_tokens += len(item.drafts)
        self.num_accepted_tokens += len(tokens) - 1
