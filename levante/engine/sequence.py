"""One generated continuation: its tokens, its place in the KV cache, its text so far."""
from __future__ import annotations

import itertools
from enum import Enum
from typing import TYPE_CHECKING

import torch

from levante.engine.outputs import PositionLogprobs
from levante.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from levante.engine.structured import GrammarMatcher
    from levante.multimodal.inputs import MultiModalPrompt


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


class Sequence:
    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams,
                 detokenizer=None, seed: int | None = None, grammar: GrammarMatcher | None = None,
                 multimodal: MultiModalPrompt | None = None):
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.index = index  # which of the request's n outputs
        self.params = params
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache
        self.block_table: list[int] = []
        self.num_hashed_blocks = 0
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.detokenizer = detokenizer
        self.text = ""
        self.cumulative_logprob = 0.0
        self.logprobs: list[PositionLogprobs] = []
        self.prompt_logprobs: list[PositionLogprobs | None] | None = (
            [None] * self.num_prompt_tokens if params.prompt_logprobs is not None else None
        )
        self.prompt_logits: torch.Tensor | None = None
        # Whether the prompt's rows of logits are kept (prompt logprobs or logits): checked every step.
        self.wants_prompt_rows = params.prompt_logprobs is not None or params.return_prompt_logits
        self.generator: torch.Generator | None = None
        if seed is not None:
            self.generator = torch.Generator().manual_seed(seed)
        self.grammar = grammar  # structured output: what the next token may be
        self.multimodal = multimodal  # images in the prompt and their M-RoPE positions, if any
        # Speculative decoding: tokens proposed to follow `token_ids`, checked by the next step (not yet part
        # of the sequence; engine/speculative.py sets them before each step).
        self.draft_token_ids: list[int] = []

    def image_keys(self, start: int, end: int) -> tuple:
        """(key, offset) of the images whose placeholder tokens overlap [start, end): placeholders
        are one token id for every image, so prefix-cache block hashes must include these."""
        if self.multimodal is None:
            return ()
        return tuple((img.key, img.offset) for img in self.multimodal.images
                     if img.offset < end and img.offset + img.length > start)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
