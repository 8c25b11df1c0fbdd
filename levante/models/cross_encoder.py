"""Rerankers: a (query, document) pair in, one relevance logit out.

    cross-encoder  BERT / XLM-R `*ForSequenceClassification`, as sentence-transformers' CrossEncoder
                   saves them: [CLS] query [SEP] document [SEP] -> encoder -> the first token ->
                   BERT's pooler or XLM-R's head (dense, tanh) -> classifier
    yes/no         a decoder LLM over a templated pair (Qwen3-Reranker) -> the last token's hidden
                   state -> lm_head[yes] - lm_head[no]: the log-odds of "yes" against "no", which
                   is what a softmax over the two logits turns into its probability of "yes"

Both are an encoder, a pooled token and dense stages (layers/pooling.py), over a right-padded batch
as the embedding models run (engine/embedder.py); the Scorer (engine/scorer.py) applies the activation.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from levante.config import ModelConfig
from levante.errors import ModelLoadError
from levante.layers.pooling import Dense, pool
from levante.models.bert import ROBERTA_TYPES, BertModel

IDENTITY, TANH = "torch.nn.modules.linear.Identity", "torch.nn.modules.activation.Tanh"
# A classifier checkpoint's tensor prefixes -> ours: the encoder's under `model.`, the head's as stages.
_BERT_NAMES = (("bert.pooler.dense.", "head.0.linear."), ("classifier.", "head.1.linear."), ("bert.", "model."))
_ROBERTA_NAMES = (("classifier.dense.", "head.0.linear."), ("classifier.out_proj.", "head.1.linear."),
                  ("roberta.", "model."))
_SKIPPED = ("bert.embeddings.position_ids", "roberta.embeddings.position_ids", "roberta.pooler.", "cls.")


class PairScorer(nn.Module):
    """`forward(input_ids, positions, lengths, token_type_ids)` over a right-padded batch ->
    [pairs, labels] float32 logits."""

    def __init__(self, encoder: nn.Module, pooling: str, head: list[Dense], names: tuple = (),
                 yes_no: tuple[int, int] | None = None, tied: bool = False):
        super().__init__()
        self.model = encoder
        self.pooling = (pooling,)
        self.head = nn.ModuleList(head)
        self.is_causal = encoder.is_causal
        self.packed_modules_mapping = encoder.packed_modules_mapping
        self.names = names  # checkpoint prefixes -> ours (cross-encoders)
        self.yes_no, self.tied = yes_no, tied  # the reranker's two tokens; its head tied to its embeddings

    @property
    def num_labels(self) -> int:
        return self.head[-1].linear.weight.size(0)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if token_type_ids is not None:
            hidden = self.model(input_ids, positions, token_type_ids)
        else:
            hidden = self.model(input_ids, positions)
        vectors = pool(hidden.view(lengths.numel(), -1, hidden.size(-1)), lengths, self.pooling)
        for stage in self.head:
            vectors = stage(vectors)
        return vectors.float()

    def checkpoint_tensors(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Checkpoint names -> ours (see the module docstring); a yes/no reranker's head is the
        difference of the two rows of its LM head (its embedding matrix, when they are tied)."""
        for name, tensor in weights:
            if self.yes_no is not None:
                yield from self._decoder_tensor(name, tensor)
                continue
            if name.startswith(_SKIPPED):
                continue
            for old, new in self.names:
                if name.startswith(old):
                    yield new + name[len(old):], tensor
                    break
            else:
                raise ModelLoadError(f"checkpoint tensor '{name}' has no place in a cross-encoder")

    def _decoder_tensor(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        yes, no = self.yes_no
        if name == "lm_head.weight" or (self.tied and name == "model.embed_tokens.weight"):
            yield "head.0.linear.weight", (tensor[yes].float() - tensor[no].float()).unsqueeze(0)
        if name != "lm_head.weight":
            yield "model." + name.removeprefix("model."), tensor


def cross_encoder(config: ModelConfig) -> PairScorer:
    """BertForSequenceClassification or XLMRobertaForSequenceClassification (and RoBERTa's)."""
    hidden, labels = config.hidden_size, _num_labels(config)
    if config.model_type == "bert":
        head, names = [Dense(hidden, hidden, True, TANH), Dense(hidden, labels, True, IDENTITY)], _BERT_NAMES
    elif config.model_type in ROBERTA_TYPES:
        head, names = [Dense(hidden, hidden, True, TANH), Dense(hidden, labels, True, IDENTITY)], _ROBERTA_NAMES
    else:
        raise ModelLoadError(f"unsupported cross-encoder model type '{config.model_type}' (supported: bert, "
                             f"{', '.join(ROBERTA_TYPES)})")
    return PairScorer(BertModel(config), "cls", head, names)


def yes_no_reranker(config: ModelConfig, encoder: nn.Module, yes: int, no: int) -> PairScorer:
    """A decoder LLM read as a reranker: one logit, lm_head[yes] - lm_head[no], at the last token."""
    return PairScorer(encoder, "lasttoken", [Dense(config.hidden_size, 1, False, IDENTITY)], yes_no=(yes, no),
                      tied=config.tie_word_embeddings)


def _num_labels(config: ModelConfig) -> int:
    labels = config.raw.get("num_labels") or len(config.raw.get("id2label") or {}) or 1
    if labels != 1:
        raise ModelLoadError(f"this classifier has {labels} labels; a reranker gives one relevance score (1 label)")
    return labels
