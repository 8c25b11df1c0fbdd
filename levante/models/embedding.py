"""Sentence embeddings: an encoder, then pooling, dense stages and normalisation.

The encoder is BERT, or a decoder family run once over the whole text with no
KV cache and no head: Gemma 3 with bidirectional attention (EmbeddingGemma),
Qwen3 causal (Qwen3-Embedding, pooled at the last token). The runner reads
`is_causal` to build the attention mask.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace

import torch
from torch import nn

from levante.config import ModelConfig
from levante.layers.pooling import Dense, normalize, pool
from levante.models.gemma3 import Gemma3TextModel
from levante.models.llama import CausalLM, DecoderModel

# Prefixes a task head wraps the encoder in (BertForMaskedLM, Qwen3ForCausalLM).
_WRAPPER_PREFIXES = ("bert.", "model.")


class DecoderEncoder(DecoderModel):
    """A Llama-family decoder (Qwen3, Qwen2, Llama) without its LM head, pooled by the pipeline."""

    is_causal = True
    packed_modules_mapping = CausalLM.packed_modules_mapping
    unused_prefixes = ("lm_head.",)


class Qwen3Encoder(DecoderEncoder):
    def __init__(self, config: ModelConfig):
        super().__init__(config, qk_norm=True)


class Qwen2Encoder(DecoderEncoder):
    def __init__(self, config: ModelConfig):
        super().__init__(config, qkv_bias=True)


class Gemma3Encoder(Gemma3TextModel):
    """Gemma 3 text; EmbeddingGemma sets `use_bidirectional_attention`.

    Bidirectional sliding layers see keys with |query - key| < window // 2 + 1,
    as transformers does (config.json keeps the causal window size).
    """

    packed_modules_mapping = CausalLM.packed_modules_mapping
    unused_prefixes = ("lm_head.",)

    def __init__(self, config: ModelConfig):
        bidirectional = bool(config.raw.get("use_bidirectional_attention"))
        if bidirectional and config.sliding_window:
            config = replace(config, sliding_window=config.sliding_window // 2 + 1)
        super().__init__(config)
        self.is_causal = not bidirectional


class SentenceEmbeddingModel(nn.Module):
    """`forward(input_ids, positions, lengths)` over a right-padded batch -> [texts, dim] float32.

    `input_ids` and `positions` are flat, `[texts * max_len]`; `lengths` [texts] counts real tokens.
    """

    def __init__(self, encoder: nn.Module, pipeline):
        super().__init__()
        self.model = encoder
        self.dense = nn.ModuleList(Dense(d.in_features, d.out_features, d.bias, d.activation)
                                   for d in pipeline.dense)
        self.pooling = tuple(pipeline.pooling)
        self.normalize = pipeline.normalize
        self.is_causal = encoder.is_causal
        self.packed_modules_mapping = encoder.packed_modules_mapping

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids, positions)
        vectors = pool(hidden.view(lengths.numel(), -1, hidden.size(-1)), lengths, self.pooling)
        for stage in self.dense:
            vectors = stage(vectors)
        vectors = vectors.float()
        return normalize(vectors) if self.normalize else vectors

    def checkpoint_tensors(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Checkpoint names -> ours: the encoder's under `model.`, dense stages as they are, heads dropped."""
        for name, tensor in weights:
            if name.startswith("dense."):
                yield name, tensor
                continue
            for prefix in _WRAPPER_PREFIXES:
                if name.startswith(prefix):
                    name = name[len(prefix):]
                    break
            if not name.startswith(self.model.unused_prefixes):
                yield "model." + name, tensor
