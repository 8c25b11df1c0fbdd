"""Which sequences run this step, and how many tokens each computes.

Thinks in tokens, not phases (vLLM v1): every sequence has `num_computed_tokens`
and wants to reach `num_tokens`; a prefill is just many tokens, cut into chunks
by the step's token budget. Running sequences go first, oldest first; when the
cache is full the newest running sequence is preempted (its blocks freed, to be
recomputed later, mostly from the prefix cache) so that older ones finish.
"""
from __future__ import annotations

from collections import deque

from levante.engine.kv_cache import BlockManager
from levante.engine.sequence import Sequence, Status


class ScheduledSequence:
    """One sequence of a step and how many tokens it computes. `samples`: True when this step
    computes the sequence's last known token, so it yields a new one (fixed when scheduled,
    read before `Scheduler.after_step` moves `num_computed_tokens`). `drafts`: proposed tokens
    computed after the known ones (speculative decoding), counted in `num_new_tokens`."""

    __slots__ = ("seq", "num_new_tokens", "samples", "drafts")

    def __init__(self, seq: Sequence, num_new_tokens: int, drafts: list[int] = ()):
        self.seq = seq
        self.num_new_tokens = num_new_tokens
        self.drafts = drafts
        self.samples = seq.num_computed_tokens + num_new_tokens - len(drafts) == len(seq.token_ids)

    def __repr__(self) -> str:
        return f"ScheduledSequence(seq={self.seq.seq_id}, num_new_tokens={self.num_new_tokens})"


def keep_spans_whole(seq: Sequence, start: int, num_new: int) -> int:
    """`num_new` moved so a chunk does not end inside a bidirectional span (an image's tokens, which
    see each other): back to the span's start, or, when the chunk starts inside or at it, on to its end
    (over the step's budget if need be)."""
    spans = () if seq.multimodal is None else seq.multimodal.bidirectional_spans
    end = start + num_new
    for span_start, span_end in spans:
        if span_start < end < span_end:
            return span_start - start if span_start > start else span_end - start
    return num_new


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSequence]:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        preempted = False
        manager, running = self.block_manager, Status.RUNNING
        block_size, free = manager.block_size, manager.free
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.status is not running:  # preempted below while making room
                continue
            computed = seq.num_computed_tokens
            known = len(seq.token_ids) - computed
            drafts = seq.draft_token_ids
            num_new = min(known + len(drafts), budget)
            if seq.multimodal is not None:
                num_new = keep_spans_whole(seq, computed, num_new)
            if drafts and num_new < known + len(drafts):
                drafts = drafts[:max(0, num_new - known)]
            # BlockManager.blocks_needed, inlined (no prefix: the sequence holds its blocks).
            needed = -(-(computed + num_new) // block_size) - len(seq.block_table)
            if drafts and needed > len(free):  # drafts are the first thing to go, before any preemption
                num_new -= len(drafts)
                drafts = ()
                needed = -(-(computed + num_new) // block_size) - len(seq.block_table)
            while needed > len(free):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                if needed > 0:
                    manager.allocate(seq, num_new)
                scheduled.append(ScheduledSequence(seq, num_new, drafts))
                budget -= num_new
        if not preempted:
            budget = self._admit_waiting(scheduled, budget)
        return scheduled

    def _admit_waiting(self, scheduled: list[ScheduledSequence], budget: int) -> int:
        manager = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            prefix = manager.match_prefix(seq)
            start = len(prefix) * manager.block_size
            num_new = keep_spans_whole(seq, start, min(seq.num_tokens - start, budget))
            if manager.blocks_needed(seq, num_new, prefix) > manager.num_free_blocks:
                break
            self.waiting.popleft()
            manager.claim_prefix(seq, prefix)
            manager.allocate(seq, num_new)
            seq.status = Status.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
        return budget

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free_sequence(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def after_step(self, scheduled: list[ScheduledSequence]) -> None:
        """Record computed tokens and share newly full blocks; call once the forward is done.
        Drafts are not counted: `advance` counts each once it is accepted into the sequence."""
        advance = self.advance
        for item in scheduled:
            advance(item.seq, item.num_new_tokens - len(item.drafts))

    def advance(self, seq: Sequence, count: int = 1) -> None:
        """`count` more computed tokens of `seq.token_ids`; blocks that became full are shared. Also
        called for each accepted draft once it is in `seq.token_ids` (the step wrote its keys and values;
        the slots of rejected drafts stay past `num_computed_tokens`, to be overwritten)."""
        seq.num_computed_tokens += count
        manager = self.block_manager
        if manager.enable_prefix_caching and seq.num_computed_tokens // manager.block_size != seq.num_hashed_blocks:
            manager.commit(seq)

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free_sequence(seq)
