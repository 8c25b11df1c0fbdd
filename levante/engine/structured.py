"""Structured output: generation held to a JSON schema, a regex, a Lark grammar or a fixed choice.

llguidance does the parsing. Per engine, a `GrammarCompiler` wraps our tokenizer once (its
`tokenizers` JSON, as llguidance's own `hf.py` does, but without transformers) and compiles each
distinct grammar once into a template matcher; every constrained sequence gets a deep copy of it
(microseconds). Before each draw, the sequence's `GrammarMatcher` writes a bitmask of the tokens
the grammar allows next and every other logit becomes -inf; after the draw it consumes the token.

We apply the bitmask ourselves (`np.unpackbits` + `masked_fill_`) rather than through
`llguidance.torch`, whose kernel is a `torch.compile` function: importing it costs seconds and
compiling it wants a C++ toolchain on CPU.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from copy import copy
from dataclasses import dataclass, field
from typing import Any, Literal

import llguidance
import llguidance.numpy
import numpy as np
import torch

from levante.errors import InvalidRequest

# JSON laid out as `json.dumps` does, on one line. llguidance's default allows any whitespace between
# tokens, and a small model, once it starts, may emit nothing but whitespace until max_tokens.
# A schema may override these through its own "x-guidance" key.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

Kind = Literal["json_object", "json_schema", "regex", "lark", "choice"]
KINDS = ("json_object", "json_schema", "regex", "lark", "choice")


@dataclass
class StructuredOutput:
    """What the output must match.

    `json_object`: any JSON object (no value); `json_schema`: a schema, as a dict or a JSON string;
    `regex`: a pattern the whole output matches (Rust `regex` syntax); `lark`: a grammar in
    llguidance's Lark dialect (rule `start`); `choice`: one of a list of strings, verbatim.
    """

    kind: Kind
    value: Any = None
    # The compiled grammar, when `GrammarCompiler.prepare` ran ahead (the server does, off the engine thread).
    template: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise InvalidRequest(f"structured output kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        value, kind = self.value, self.kind
        if kind == "json_object" and value is not None:
            raise InvalidRequest("structured output 'json_object' takes no value (use 'json_schema' for a schema)")
        if kind == "json_schema" and not isinstance(value, (dict, str)):
            raise InvalidRequest("structured output 'json_schema' needs a schema: a dict or a JSON string")
        if kind in ("regex", "lark") and not (isinstance(value, str) and value):
            raise InvalidRequest(f"structured output '{kind}' needs a non-empty string")
        if kind == "choice" and not (isinstance(value, (list, tuple)) and value
                                     and all(isinstance(c, str) and c for c in value)):
            raise InvalidRequest("structured output 'choice' needs a non-empty list of non-empty strings")

    def cache_key(self) -> tuple[str, str]:
        value = self.value
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=repr)
        return self.kind, text


class GrammarCompiler:
    """One per engine: the llguidance tokenizer and a bounded cache of compiled grammars, keyed by
    (kind, value).

    The llguidance tokenizer is built on first use: about a second for a 150k vocabulary, all of it
    holding the GIL, so built ahead (before a server reports ready, or in a thread after) it would
    cost every start or stall every request of that second; built on first use, only the first
    constrained request waits."""

    def __init__(self, tokenizer, model_vocab_size: int, eos_token_ids: set[int], cache_size: int = 64):
        self.tokenizer = tokenizer
        # Logits may be wider than the tokenizer (padded embeddings): llguidance then disallows the
        # ids it has no text for. A tokenizer wider than the logits only adds bits we cut off.
        self.vocab_size = max(model_vocab_size, tokenizer.vocab_size)
        self.eos_token_ids = sorted(eos_token_ids)
        self.cache_size = cache_size
        self._templates: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()  # compiled in worker threads, copied on the engine thread
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._ll_tokenizer_lock = threading.Lock()

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._ll_tokenizer_lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = self._build_ll_tokenizer()
            return self._ll_tokenizer

    def _build_ll_tokenizer(self) -> llguidance.LLTokenizer:
        backend = self.tokenizer.backend
        if backend.padding is not None or backend.truncation is not None:  # a copy costs ~0.5 s: only if needed
            backend = copy(backend)
            backend.no_padding()
            backend.no_truncation()
        try:
            return llguidance.LLTokenizer(backend.to_str(), n_vocab=self.vocab_size, eos_token=self.eos_token_ids)
        except Exception as error:  # llguidance raises plain ValueError/RuntimeError
            raise InvalidRequest(f"structured output is not supported for this model's tokenizer: {error}") from error

    def prepare(self, spec: StructuredOutput) -> None:
        """Compile `spec` now, so that `matcher` only copies it. Blocking, and as slow as the grammar:
        the server runs it in a worker thread under a time limit, never on the engine thread."""
        spec.template = self._template(spec)

    def matcher(self, spec: StructuredOutput) -> GrammarMatcher:
        """A fresh matcher at the start of `spec`'s grammar; InvalidRequest if it does not compile."""
        template = spec.template if spec.template is not None else self._template(spec)
        return GrammarMatcher(template.deep_copy(), self.vocab_size)

    def _template(self, spec: StructuredOutput) -> llguidance.LLMatcher:
        key = spec.cache_key()
        with self._lock:
            template = self._templates.get(key)
            if template is not None:
                self._templates.move_to_end(key)
                return template
        template = self._compile(spec)
        with self._lock:
            self._templates[key] = template
            if len(self._templates) > self.cache_size:
                self._templates.popitem(last=False)
        return template

    def _compile(self, spec: StructuredOutput) -> llguidance.LLMatcher:
        try:
            grammar = _grammar_text(spec)
        except (ValueError, TypeError) as error:
            raise InvalidRequest(f"invalid {spec.kind}: {_one_line(str(error))}") from error
        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequest(f"invalid {spec.kind}: {_one_line(matcher.get_error())}")
        return matcher


class GrammarMatcher:
    """Follows one sequence through its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self._matcher = matcher
        self._bitmask = llguidance.numpy.allocate_token_bitmask(1, vocab_size)

    def fill_mask(self, logits: torch.Tensor) -> None:
        """Set, in place, the logit of every token the grammar does not allow next to -inf (one row)."""
        _forbid(self._allowed(), logits)

    def _allowed(self) -> np.ndarray:
        """One uint8 per token id: 1 if the grammar allows it next."""
        llguidance.numpy.fill_next_token_bitmask(self._matcher, self._bitmask)
        return np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")  # bit i of word w: token 32w+i

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of `tokens`, from the first, the grammar would accept in a row (nothing is consumed)."""
        return self._matcher.validate_tokens(tokens) if tokens else 0

    def masks_along(self, tokens: list[int]) -> list["FixedMask"]:
        """The masks before each of `tokens` (all valid, see `valid_prefix`) and after the last: the
        tokens are consumed only to compute them, then rolled back (speculative decoding's drafts)."""
        masks = [FixedMask(self._allowed())]
        for token in tokens:
            if not self._matcher.consume_token(token):
                break
            masks.append(FixedMask(self._allowed()))
        self._matcher.rollback(len(masks) - 1)
        return masks

    def accept(self, token_id: int) -> bool:
        """Advance past `token_id`; False (and the matcher stuck in error) if the grammar forbids it."""
        return self._matcher.consume_token(token_id)

    def is_finished(self) -> bool:
        """The grammar is complete and nothing but EOS may follow (also true after EOS, or an error)."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str:
        return self._matcher.get_error()


class FixedMask:
    """A grammar mask computed ahead, for one position: `fill_mask` as `GrammarMatcher`'s."""

    __slots__ = ("allowed",)

    def __init__(self, allowed: np.ndarray):
        self.allowed = allowed

    def fill_mask(self, logits: torch.Tensor) -> None:
        _forbid(self.allowed, logits)


def _forbid(allowed: np.ndarray, logits: torch.Tensor) -> None:
    width = logits.size(-1)
    if allowed.size < width:
        allowed = np.pad(allowed, (0, width - allowed.size))
    forbidden = torch.from_numpy(allowed[:width]).to(logits.device) == 0
    logits.masked_fill_(forbidden, float("-inf"))


def _grammar_text(spec: StructuredOutput) -> str:
    """llguidance's grammar for `spec`; ValueError (or TypeError) for a schema that is not JSON."""
    kind, value = spec.kind, spec.value
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if kind == "json_schema":
        schema = json.loads(value) if isinstance(value, str) else value
        if not isinstance(schema, dict):
            raise ValueError("the schema must be a JSON object")
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    if kind == "choice":
        return llguidance.grammar_from("choice", list(value))
    return llguidance.grammar_from(kind, value)


def _one_line(message: str) -> str:
    """llguidance's errors quote the source with carets over several lines: keep the prose."""
    lines = [line.strip() for line in message.splitlines()]
    prose = [line for line in lines if line and not set(line) <= {"^", " "} and "|" not in line[:6]]
    return " ".join(prose) or message.strip()
