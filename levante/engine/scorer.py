"""Runs a reranking model: (query, document) pairs in, one relevance score per pair out.

Two kinds (models/cross_encoder.py):
- cross-encoders (BERT, XLM-R `*ForSequenceClassification`): the pair is tokenized as the model's
  tokenizer pairs texts (`[CLS] q [SEP] d [SEP]`, token types 0 then 1), cut longest-first to the
  model's length; the score is the logit through the activation sentence-transformers' CrossEncoder
  applies by default (the saved `activation_fn`, else a sigmoid);
- yes/no rerankers (a decoder LLM, Qwen3-Reranker's format): the pair is written into the model's
  judging prompt, and the score is the probability of "yes" against "no" for the next token.
As the Embedder runs embedding models: no paged cache, one forward pass per batch of right-padded
pairs of about the same length, results in input order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from levante.config import EngineConfig
from levante.engine.embedder import SleepsByRebuilding, forward_padded, length_batches
from levante.engine.engine import default_dtype
from levante.errors import InvalidRequest, ModelLoadError
from levante.layers.pooling import DENSE_ACTIVATIONS
from levante.loader import hf
from levante.loader.auto import ModelSource, open_model
from levante.models.bert import position_offset
from levante.models.registry import build_scoring_model, load_weights

SIGMOID = "torch.nn.modules.activation.Sigmoid"
# Qwen3-Reranker's prompt, as its model card writes it: a judging system turn, the pair, an empty thought.
JUDGE_PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
                "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
JUDGE_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
DEFAULT_MAX_LENGTH = 8192  # a yes/no reranker's pairs, prompt included (Qwen3-Reranker's model card)


@dataclass(frozen=True)
class Pair:
    """A pair's token ids; the first `first` are the query's segment (token type 0), the rest type 1."""
    ids: list[int]
    first: int

    @property
    def token_types(self) -> list[int]:
        return [0] * self.first + [1] * (len(self.ids) - self.first)


class Scorer(SleepsByRebuilding):
    def __init__(self, source: ModelSource, dtype: torch.dtype, device: torch.device,
                 max_batch_tokens: int = 16384, max_batch_size: int = 128):
        self.source, self.config, self.device, self.dtype = source, source.config, device, dtype
        self.max_batch_tokens, self.max_batch_size = max_batch_tokens, max_batch_size
        self.tokenizer = source.tokenizer()
        classifier = self.config.architecture.endswith("ForSequenceClassification")
        self.yes_no = None if classifier else _yes_no_tokens(self.tokenizer)
        self.activation = DENSE_ACTIVATIONS[_activation(source) if classifier else SIGMOID]
        self.max_length = self._max_length()
        if classifier:
            self.tokenizer.backend.enable_truncation(self.max_length, strategy="longest_first")
        else:  # the judging prompt around each pair
            self._judge = (self.tokenizer.encode(JUDGE_PREFIX, add_special_tokens=False),
                           self.tokenizer.encode(JUDGE_SUFFIX, add_special_tokens=False))
        self.model = self._build()

    @classmethod
    def load(cls, model: str, config: EngineConfig) -> Scorer:
        """Open `model`: a cross-encoder folder, or any decoder LLM of a family embedding models use
        (Qwen3, Qwen2, Llama), read as a yes/no reranker."""
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        device = torch.device(config.device)
        source = open_model(model)
        if source.format != "hf" or source.task not in ("score", "generate"):
            raise InvalidRequest(f"'{model}' cannot rerank: expected a cross-encoder or a decoder LLM folder")
        return cls(source, config.dtype or default_dtype(device), device)

    def _build(self):
        model = build_scoring_model(self.config, self.yes_no, self.dtype, self.device)
        load_weights(model, model.checkpoint_tensors(self.source.weights()))
        return model.eval()

    def _max_length(self) -> int:
        positions = self.config.max_position_embeddings - position_offset(self.config)
        settings = self.source.path / "tokenizer_config.json"
        declared = hf.read_json(settings).get("model_max_length") if settings.is_file() else None
        default = positions if self.yes_no is None else min(positions, DEFAULT_MAX_LENGTH)
        return int(declared) if isinstance(declared, (int, float)) and 0 < declared < default else default



    # -- inputs -------------------------------------------------------------
    def pairs(self, queries: list[str], documents: list[str], instruction: str | None = None) -> list[Pair]:
        """`queries[i]` paired with `documents[i]`, as the model reads them (cut to its length)."""
        if self.yes_no is not None:
            return [self._judged(query, document, instruction) for query, document in zip(queries, documents)]
        pairs = []
        for encoding in self.tokenizer.backend.encode_batch(list(zip(queries, documents))):
            types = encoding.type_ids
            pairs.append(Pair(list(encoding.ids), types.index(1) if 1 in types else len(types)))
        return pairs

    def _judged(self, query: str, document: str, instruction: str | None) -> Pair:
        prefix, suffix = self._judge
        body = f"<Instruct>: {instruction or DEFAULT_INSTRUCTION}\n<Query>: {query}\n<Document>: {document}"
        room = self.max_length - len(prefix) - len(suffix)
        ids = prefix + self.tokenizer.encode(body, add_special_tokens=False)[:room] + suffix
        return Pair(ids, len(ids))

    # -- forward ------------------------------------------------------------
    @torch.inference_mode()
    def score(self, pairs: list[Pair]) -> torch.Tensor:
        """[len(pairs)] float32 relevance scores on the CPU, in input order."""
        out = torch.empty(len(pairs))
        for batch in length_batches([len(p.ids) for p in pairs], self.max_batch_tokens, self.max_batch_size):
            chosen = [pairs[i] for i in batch]
            types = [p.token_types for p in chosen] if self.yes_no is None else None
            logits = forward_padded(self.model, [p.ids for p in chosen], self.device, types)
            out[batch] = self.activation(logits[:, 0]).cpu()
        return out


def _yes_no_tokens(tokenizer) -> tuple[int, int]:
    yes, no = tokenizer.token_to_id("yes"), tokenizer.token_to_id("no")
    if yes is None or no is None:
        raise ModelLoadError("a decoder LLM reranks by its 'yes' and 'no' tokens, which this tokenizer lacks")
    return yes, no


def _activation(source: ModelSource) -> str:
    """The activation sentence-transformers' CrossEncoder applies by default: the one it saved (in
    config.json or config_sentence_transformers.json), else a sigmoid (one label)."""
    settings = source.path / "config_sentence_transformers.json"
    saved = source.config.raw.get("sentence_transformers", {}).get("activation_fn")
    if saved is None and settings.is_file():
        saved = hf.read_json(settings).get("activation_fn")
    saved = saved or SIGMOID
    if saved not in DENSE_ACTIVATIONS:
        raise ModelLoadError(f"unsupported cross-encoder activation '{saved}'")
    return saved
