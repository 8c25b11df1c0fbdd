"""From logits to the next token of each sequence.

Order (as vLLM): the structured-output grammar mask, logit bias, min-tokens
EOS mask, repetition / presence / frequency penalties, temperature, top-k,
top-p, min-p, then a draw. Every sequence with a seed draws from its own
generator, so its output does not depend on what else shares the batch.
Reported logprobs are the model's raw ones.
"""
from __future__ import annotations

import torch

from levante.engine.outputs import Logprob, PositionLogprobs
from levante.engine.sampling_params import GREEDY_TEMPERATURE
from levante.engine.sequence import Sequence


def _mask_by_grammar(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """A copy of `logits` in which each constrained row allows only what its grammar allows next."""
    logits = logits.clone()
    for row, seq in enumerate(seqs):
        if seq.grammar is not None:
            seq.grammar.fill_mask(logits[row])
    return logits


def _penalize(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty:
            continue
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=logits.device)
            values = logits[row, seen]
            logits[row, seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
            output = torch.tensor(seq.output_token_ids, dtype=torch.long, device=logits.device)
            counts = torch.zeros(logits.size(1), device=logits.device).index_add_(
                0, output, torch.ones(len(output), device=logits.device))
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)


def _bias_and_mask(logits: torch.Tensor, seqs: list[Sequence], eos_ids: set[int]) -> None:
    for row, seq in enumerate(seqs):
        p = seq.params
        if not p.logit_bias and not p.min_tokens:
            continue
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), dtype=torch.long)
            logits[row, ids] += torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype)
        if seq.num_output_tokens < p.min_tokens:
            blocked = list((eos_ids if not p.ignore_eos else set()) | set(p.stop_token_ids))
            if blocked:
                logits[row, blocked] = float("-inf")


def _truncate(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Top-k, then top-p, then min-p, on temperature-scaled logits."""
    top_k = [s.params.top_k for s in seqs]
    if any(top_k):
        k = torch.tensor([kk if kk else logits.size(1) for kk in top_k], device=logits.device).clamp(max=logits.size(1))
        kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1).unsqueeze(1))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # Which filters apply is decided from the host-side params: no device sync.
    if any(s.params.top_p < 1 for s in seqs):
        top_p = torch.tensor([s.params.top_p for s in seqs], device=logits.device)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = (cumulative - sorted_logits.softmax(-1)) >= top_p.unsqueeze(1)  # keep the token crossing p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(remove, float("-inf")))
    if any(s.params.min_p > 0 for s in seqs):
        min_p = torch.tensor([s.params.min_p for s in seqs], device=logits.device)
        probs = logits.softmax(-1)
        floor = probs.max(-1, keepdim=True).values * min_p.unsqueeze(1)
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Exponential-race sampling (argmax of p / Exp(1)), a row's noise from its generator if it has one
    (a seeded sequence's)."""
    noise = torch.empty_like(probs).exponential_()
    for row, generator in enumerate(generators):
        if generator is not None:  # a CPU generator: its draw is the same on every device
            noise[row] = torch.empty(probs.size(1), dtype=probs.dtype).exponential_(generator=generator)
    return (probs / noise).argmax(-1)


def top_logprobs(logprobs: torch.Tensor, token: int, k: int, decode) -> PositionLogprobs:
    """The chosen token's logprob and rank, plus the k most likely tokens."""
    chosen = float(logprobs[token])
    result = {token: Logprob(chosen, int((logprobs > chosen).sum()) + 1, decode(token))}
    if k:
        values, ids = logprobs.topk(k)
        for rank, (value, tid) in enumerate(zip(values.tolist(), ids.tolist()), start=1):
            result.setdefault(tid, Logprob(value, rank, decode(tid)))
    return result


class Sampler:
    def __init__(self, eos_token_ids: set[int]):
        self.eos_token_ids = eos_token_ids

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], torch.Tensor | None]:
        """Returns the sampled token ids and, when any sequence wants logprobs, raw logprobs."""
        raw_logprobs = None
        params = [s.params for s in seqs]
        if any(p.logprobs is not None for p in params):
            raw_logprobs = logits.log_softmax(-1)
        logits, argmax, greedy = self._adjusted(logits, seqs)
        if all(greedy):
            return argmax.tolist(), raw_logprobs
        sampled = draw(self._probabilities(logits, seqs, greedy), [s.generator for s in seqs])
        if any(greedy):
            return torch.where(torch.tensor(greedy, device=logits.device), argmax, sampled).tolist(), raw_logprobs
        return sampled.tolist(), raw_logprobs

    def distributions(self, logits: torch.Tensor, seqs: list) -> tuple[list[int], torch.Tensor | None]:
        """What `__call__` would pick from, without picking (speculative decoding): each row's argmax
        after the grammar, bias and penalties (the token of a greedy row), and, when any row samples,
        the probabilities it draws from ([rows, vocab]; greedy rows' are not meaningful)."""
        logits, argmax, greedy = self._adjusted(logits, seqs)
        return argmax.tolist(), None if all(greedy) else self._probabilities(logits, seqs, greedy)

    def _adjusted(self, logits: torch.Tensor, seqs: list) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
        """Logits after the grammar mask, bias, min-tokens and penalties; their argmax; which rows are greedy."""
        params = [s.params for s in seqs]
        if any(s.grammar is not None for s in seqs):
            logits = _mask_by_grammar(logits, seqs)
        greedy = [p.temperature < GREEDY_TEMPERATURE for p in params]
        if all(greedy) and (all(_no_adjustment(p) for p in params) or all(_plain(s) for s in seqs)):
            return logits, logits.argmax(-1), greedy
        logits = logits.clone()
        _bias_and_mask(logits, seqs, self.eos_token_ids)
        _penalize(logits, seqs)
        return logits, logits.argmax(-1), greedy

    @staticmethod
    def _probabilities(logits: torch.Tensor, seqs: list, greedy: list[bool]) -> torch.Tensor:
        temperature = torch.tensor([1.0 if g else s.params.temperature for g, s in zip(greedy, seqs)],
                                   device=logits.device)
        return _truncate(logits / temperature.unsqueeze(1), seqs).softmax(-1)


def _no_adjustment(p) -> bool:
    """No bias, penalty or min_tokens: implies `_plain` (checked first: no per-sequence state)."""
    return (not (p.logit_bias or p.presence_penalty or p.frequency_penalty or p.min_tokens)
            and p.repetition_penalty == 1.0)


def _plain(seq: Sequence) -> bool:
    p = seq.params
    return (not p.logit_bias and p.repetition_penalty == 1.0 and not p.presence_penalty
            and not p.frequency_penalty and (not p.min_tokens or seq.num_output_tokens >= p.min_tokens))
