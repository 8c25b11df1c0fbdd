"""What a caller may ask of one generation (vLLM's names and defaults)."""
from __future__ import annotations

from dataclasses import dataclass, field

from levante.engine.structured import StructuredOutput
from levante.errors import InvalidRequest

GREEDY_TEMPERATURE = 1e-5  # below it, sampling is greedy (argmax)
OUTPUT_KINDS = ("cumulative", "final_only")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no limit
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16  # None: until the context is full
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k logprobs per generated token (the sampled one always included)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    structured: StructuredOutput | None = None  # constrained decoding: JSON schema, regex, grammar, choice
    # vLLM's RequestOutputKind: "cumulative" (an output after every step that adds to the request,
    # text and tokens so far: streaming) or "final_only" (one output, when it finishes: LLM.generate,
    # which then spares the engine building an output per running request per step).
    output_kind: str = "cumulative"
    # The LoRA adapter to apply, by the name it was loaded under (LLM(lora=...), load_lora); None: the base model.
    lora: str | None = None
    # Internal: keep the raw logits of every prompt position (used by scoring and tests).
    return_prompt_logits: bool = field(default=False, repr=False)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k is None or self.top_k < 0:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        checks = [
            (self.n >= 1, "n must be at least 1"),
            (self.temperature >= 0, "temperature must be non-negative"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be positive"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be at least 1"),
            (self.min_tokens >= 0, "min_tokens must be non-negative"),
            (self.logprobs is None or self.logprobs >= 0, "logprobs must be non-negative"),
            (self.prompt_logprobs is None or self.prompt_logprobs >= 0, "prompt_logprobs must be non-negative"),
        ]
        checks.append((self.output_kind in OUTPUT_KINDS, f"output_kind must be one of {', '.join(OUTPUT_KINDS)}"))
        for ok, message in checks:
            if not ok:
                raise InvalidRequest(message)
        if self.structured is not None:
            if not isinstance(self.structured, StructuredOutput):
                raise InvalidRequest("structured must be a StructuredOutput")
            self.structured.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE
