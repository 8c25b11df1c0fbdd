"""Runs a sentence-embedding model: texts or token ids in, one vector per input out.

No paged cache and no scheduler: a batch is one forward pass over right-padded
texts, with attention metadata that keeps each text to its own tokens. Inputs are
sorted by length first, so a batch holds texts of about the same length and
padding wastes little; results come back in input order.
"""
from __future__ import annotations

import time

import torch

from levante.config import EngineConfig
from levante.engine.engine import default_dtype, weight_bytes
from levante.errors import InvalidRequest
from levante.layers.attention import AttentionMetadata, attention_metadata
from levante.layers.pooling import normalize
from levante.loader.auto import ModelSource, open_model
from levante.loader.memory import release_memory
from levante.models.registry import build_embedding_model, load_weights

# What callers may pass: one text, texts, one token-id list, token-id lists.
EmbeddingInput = str | list[str] | list[int] | list[list[int]]


class SleepsByRebuilding:
    """Sleep and wake for a runner of one model (`self.model`, built by `self._build()` on `self.device`):
    asleep, the weights go back to the system and the tokenizer and settings stay for `wake_up`."""

    @property
    def asleep(self) -> bool:
        return self.model is None

    def sleep(self) -> None:
        self.model = None
        release_memory(self.device)

    def wake_up(self) -> None:
        if self.model is None:
            self.model = self._build()

    def memory_bytes(self) -> int:
        return weight_bytes(self.model) if self.model is not None else 0


class Embedder(SleepsByRebuilding):
    def __init__(self, source: ModelSource, dtype: torch.dtype, device: torch.device,
                 max_batch_tokens: int = 16384, max_batch_size: int = 128):
        started = time.monotonic()
        self.source, self.pipeline, self.config = source, source.pipeline, source.config
        self.device, self.dtype = device, dtype
        self.max_batch_tokens, self.max_batch_size = max_batch_tokens, max_batch_size
        self.max_length = self.pipeline.max_seq_length or self.config.max_position_embeddings
        self.tokenizer = source.tokenizer()
        self.tokenizer.backend.enable_truncation(self.max_length)  # as sentence-transformers truncates
        self.model = self._build()
        self.dimensions = self._output_dimensions()
        self.load_seconds = time.monotonic() - started

    def _build(self):
        model = build_embedding_model(self.config, self.pipeline, self.dtype, self.device)
        load_weights(model, model.checkpoint_tensors(self.source.weights()))
        return model.eval()


    @classmethod
    def load(cls, model: str, config: EngineConfig) -> Embedder:
        """Open `model` (alias or folder) with the engine's dtype, device and thread settings."""
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        device = torch.device(config.device)
        source = open_model(model)
        if not source.is_embedding:
            raise InvalidRequest(f"'{model}' is not a sentence-embedding model")
        return cls(source, config.dtype or default_dtype(device), device)

    def _output_dimensions(self) -> int:
        if self.pipeline.dense:
            return self.pipeline.dense[-1].out_features
        return self.config.hidden_size * len(self.pipeline.pooling)

    # -- inputs -----------------------------------------------------------
    def tokenize(self, texts: list[str], prompt: str = "") -> list[list[int]]:
        """Token ids of `prompt + text` for each text, truncated to the model's maximum length."""
        if prompt and not self.pipeline.include_prompt:
            raise InvalidRequest("this model pools without its prompt tokens (include_prompt: false), "
                                 "which levante does not support: embed without a prompt")
        texts = [prompt + t for t in texts]
        if self.pipeline.do_lower_case:
            texts = [t.lower() for t in texts]
        return [e.ids for e in self.tokenizer.backend.encode_batch(texts)]

    def token_ids(self, inputs: EmbeddingInput, prompt_name: str | None = None,
                  prompt: str | None = None) -> list[list[int]]:
        """Any accepted input shape -> token-id lists; texts get the named (or given) prompt prefix."""
        if isinstance(inputs, str):
            inputs = [inputs]
        if not inputs:
            raise InvalidRequest("input is empty")
        if all(isinstance(x, int) for x in inputs):
            return [list(inputs)]
        if all(isinstance(x, str) for x in inputs):
            if prompt is None:
                try:
                    prompt = self.pipeline.prompt_for(prompt_name)
                except KeyError as e:
                    raise InvalidRequest(str(e.args[0])) from None
            return self.tokenize(list(inputs), prompt)
        if all(isinstance(x, list) and all(isinstance(t, int) for t in x) for x in inputs):
            return [list(x) for x in inputs]
        raise InvalidRequest("input must be a string, a list of strings, a list of token ids or a list of those")

    def validate(self, inputs: list[list[int]]) -> None:
        vocab = self.config.vocab_size
        for index, ids in enumerate(inputs):
            if not ids:
                raise InvalidRequest(f"input[{index}] is empty")
            if len(ids) > self.max_length:
                raise InvalidRequest(f"input[{index}] has {len(ids)} tokens; this model takes at most "
                                     f"{self.max_length}")
            if min(ids) < 0 or max(ids) >= vocab:
                raise InvalidRequest(f"input[{index}]: token ids must be in [0, {vocab})")

    def check_dimensions(self, dimensions: int | None) -> None:
        if dimensions is None or dimensions == self.dimensions:
            return
        if not self.pipeline.matryoshka:
            raise InvalidRequest(f"dimensions: this model makes {self.dimensions}-dimensional embeddings and "
                                 "was not trained to be truncated (not a Matryoshka model)")
        if not 1 <= dimensions <= self.dimensions:
            raise InvalidRequest(f"dimensions: must be between 1 and {self.dimensions}")

    # -- forward ----------------------------------------------------------
    @torch.inference_mode()
    def embed(self, inputs: list[list[int]], dimensions: int | None = None) -> torch.Tensor:
        """[len(inputs), dimensions] float32 on the CPU, in input order."""
        self.validate(inputs)
        self.check_dimensions(dimensions)
        out = torch.empty(len(inputs), self.dimensions)
        for batch in self._batches(inputs):
            out[batch] = self._forward([inputs[i] for i in batch]).cpu()
        return self.truncate(out, dimensions)

    def truncate(self, vectors: torch.Tensor, dimensions: int | None) -> torch.Tensor:
        """Keep the first `dimensions` (Matryoshka), renormalised when the model normalises."""
        if dimensions is None or dimensions >= vectors.size(-1):
            return vectors
        vectors = vectors[:, :dimensions]
        return normalize(vectors) if self.pipeline.normalize else vectors

    def _batches(self, inputs: list[list[int]]) -> list[list[int]]:
        return length_batches([len(ids) for ids in inputs], self.max_batch_tokens, self.max_batch_size)

    def _forward(self, batch: list[list[int]]) -> torch.Tensor:
        return forward_padded(self.model, batch, self.device)


def length_batches(lengths: list[int], max_tokens: int, max_size: int) -> list[list[int]]:
    """Indices grouped longest first, each group within the padded-token and size budgets."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and ((len(current) + 1) * longest > max_tokens or len(current) >= max_size):
            batches.append(current)
            current = []
        current.append(i)
    return batches + [current] if current else batches


def forward_padded(model, rows: list[list[int]], device: torch.device,
                   token_types: list[list[int]] | None = None) -> torch.Tensor:
    """`model(input_ids, positions, lengths[, token_type_ids])` over `rows` right-padded into one batch,
    each row attending to its own tokens only (embedding and scoring models)."""
    lengths = [len(ids) for ids in rows]
    longest = max(lengths)
    input_ids = _padded(rows, longest)
    positions = torch.arange(longest).repeat(len(rows))
    metadata = padded_metadata(lengths, model.is_causal, device)
    extra = {} if token_types is None else {"token_type_ids": _padded(token_types, longest).view(-1).to(device)}
    with attention_metadata(metadata):
        return model(input_ids.view(-1).to(device), positions.to(device), metadata.kv_lens, **extra)


def _padded(rows: list[list[int]], longest: int) -> torch.Tensor:
    return torch.tensor([row + [0] * (longest - len(row)) for row in rows], dtype=torch.long)


def padded_metadata(lengths: list[int], causal: bool, device: torch.device) -> AttentionMetadata:
    """Attention over a right-padded batch with no cache: each text attends to its own tokens only.

    Rows are `[texts, max_len]` already, so attention takes keys in place. A padding row
    queries as its text's last token does, so it always has keys to attend to (no NaN
    rows to leak into later layers); its output is never pooled.
    """
    lens = torch.tensor(lengths, dtype=torch.long)
    longest = max(lengths)
    row = torch.arange(longest)
    return AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long, device=device),
        key_slots=(torch.arange(len(lengths) * longest).view(-1, longest)).to(device),
        query_positions=torch.minimum(row, (lens - 1).unsqueeze(1)).to(device),
        kv_lens=lens.to(device), query_index=None, output_index=None, max_position=longest - 1, causal=causal,
    )
