"""Attention over the paged KV cache, and the per-step metadata it reads.

The runner fills one `AttentionMetadata` before each forward (as nano-vllm does
with its context object), so `model.forward(input_ids, positions)` stays clean
and no layer imports the engine.

Tokens of a step are packed: `[num_tokens, ...]`, sequences one after another,
each contributing the tokens it computes this step (a prefill chunk or one
decode token). Keys and values are written into the cache at `slot_mapping`,
then attended by one of two roads:

- paged (`layers/paged_attention.py`): each sequence's context is read in place
  through its block table, no gather and no mask: on CUDA (Triton) and on CPUs
  where the native kernel runs (kernels/cpu/*_attention.c);
- SDPA: each sequence's whole context is gathered back through `key_slots` and
  attended with PyTorch SDPA under a causal, sliding-window and padding mask:
  elsewhere, and for what the paged road does not cover (no cache, attention
  both ways, image spans).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from levante.layers.paged_attention import paged_attention
from levante.quant import kv_int8


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] cache slot of each new token
    key_slots: torch.Tensor  # [batch, max_kv] cache slots of each sequence's context (padding: 0)
    query_positions: torch.Tensor  # [batch, max_q] position of each padded query row
    kv_lens: torch.Tensor  # [batch] context length after this step
    # [batch, max_q] row of each packed token, padding pointing at a dummy row; None when
    # every sequence has the same query length (pure decode), so packing is a reshape.
    query_index: torch.Tensor | None
    output_index: torch.Tensor | None  # [num_tokens] row in the padded [batch * max_q] output
    max_position: int
    logits_indices: torch.Tensor | None = None  # hidden-state rows that need logits
    causal: bool = True
    # [batch, max_q] the last key each query may see when it is past the causal limit (tokens of one
    # image attending both ways, Gemma 3); None: the query's own position.
    key_limits: torch.Tensor | None = None
    # Paged attention (the interface in layers/paged_attention.py): set by the runner where that road
    # runs (ModelRunner.paged); then the SDPA fields above may be None until a layer that needs them
    # calls `sdpa()`, which builds them once.
    block_tables: torch.Tensor | None = None  # [batch, width] int32
    cu_seqlens_q: torch.Tensor | None = None  # [batch + 1] int32
    seq_lens: torch.Tensor | None = None  # [batch] int32
    max_query_len: int = 0
    block_size: int = 0
    _sdpa_builder: object = field(default=None, repr=False)
    _masks: dict = field(default_factory=dict, repr=False)
    _copies: dict = field(default_factory=dict, repr=False)

    def to(self, device: torch.device) -> "AttentionMetadata":
        """This step's metadata on `device` (layers mapped to several devices), copied once per step."""
        if self.slot_mapping.device == device:
            return self
        self.sdpa()
        if device not in self._copies:
            values = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
            self._copies[device] = AttentionMetadata(
                **{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in values.items()})
        return self._copies[device]

    def sdpa(self) -> "AttentionMetadata":
        """Fill the SDPA fields if the runner left them to be built on demand."""
        if self._sdpa_builder is not None:
            builder, self._sdpa_builder = self._sdpa_builder, None
            for name, value in builder().items():
                setattr(self, name, value)
        return self

    def uses_paged(self, layer: "Attention") -> bool:
        return (self.block_tables is not None and layer.k_cache is not None and self.causal
                and self.key_limits is None and layer.k_cache.device == self.slot_mapping.device)

    @property
    def batch_size(self) -> int:
        return self.key_slots.size(0) if self.key_slots is not None else self.seq_lens.size(0)

    @property
    def max_q(self) -> int:
        return self.query_positions.size(1)

    def mask(self, sliding_window: int | None) -> torch.Tensor:
        """[batch, 1, max_q, max_kv] bool: which keys each query may attend to (cached per window)."""
        if sliding_window not in self._masks:
            key_pos = torch.arange(self.key_slots.size(1), device=self.key_slots.device)
            q = self.query_positions.unsqueeze(-1)
            allowed = key_pos < self.kv_lens.view(-1, 1, 1)
            if self.causal:
                limit = q if self.key_limits is None else self.key_limits.unsqueeze(-1)
                allowed = allowed & (key_pos <= limit)
            if sliding_window is not None:
                # Keys past the query (bidirectional spans) are not cut by the window, as in transformers.
                allowed = allowed & (q - key_pos < sliding_window)
                if not self.causal:
                    allowed = allowed & (key_pos - q < sliding_window)
            self._masks[sliding_window] = allowed.unsqueeze(1)
        return self._masks[sliding_window]


# Per thread: the engine loop and the embedding batcher may run forwards at the same time.
_local = threading.local()


def get_attention_metadata() -> AttentionMetadata:
    metadata = getattr(_local, "metadata", None)
    if metadata is None:
        raise RuntimeError("attention metadata is not set: run the model through the runner")
    return metadata


@contextmanager
def attention_metadata(metadata: AttentionMetadata):
    previous, _local.metadata = getattr(_local, "metadata", None), metadata
    try:
        yield metadata
    finally:
        _local.metadata = previous


class Attention(nn.Module):
    """Scaled dot-product attention for one layer; owns views of that layer's KV cache.

    KV sharing (Gemma 3n): a layer built with `kv_producer` (an earlier layer's `Attention`)
    computes no keys or values: it is called with k = v = None and reads the producer's cache,
    which the runner hands it (the producer wrote this step's keys earlier in the same forward).
    It owns no cache blocks. When the producer's cache lives on another device than this layer's
    queries (a device map splitting the two, mistral.rs #1653), the keys and values it gathers
    move to the queries' device."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, kv_producer: "Attention | None" = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.__dict__["kv_producer"] = kv_producer  # not a submodule: the producer is its own layer's
        # [num_slots, num_kv_heads, head_dim] (an int8 cache: head_dim + 4, quant/kv_int8.py); None runs
        # without a cache (one-shot encoders).
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        # [num_kv_heads, head_dim]: subtracted from keys before an int8 cache stores them (see
        # quant/kv_int8.py; softmax ignores it); set by the runner from the model's `key_bias()`.
        self.key_offset: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None) -> torch.Tensor:
        """q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim] (None: read the producer's
        cache) -> [tokens, heads * head_dim]."""
        md = get_attention_metadata().to(q.device)
        if md.uses_paged(self):
            return self._paged(q, k, v, md)
        md.sdpa()
        if self.k_cache is not None and md.max_q == 1 and md.query_index is None:
            return self._decode(q, k, v, md)
        keys, values = (t.transpose(1, 2) for t in self._context(k, v, md, q.dtype))  # [batch, kv_heads, max_kv, head_dim]
        queries = self._pad_queries(q, md).transpose(1, 2)  # [batch, heads, max_q, head_dim]
        if self.num_kv_heads != self.num_heads:
            repeat = self.num_heads // self.num_kv_heads
            keys = keys.repeat_interleave(repeat, dim=1)
            values = values.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=md.mask(self.sliding_window), scale=self.scale
        )
        out = out.transpose(1, 2).reshape(-1, self.num_heads * self.head_dim)
        return out if md.output_index is None else out.index_select(0, md.output_index)

    def _paged(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        """Write the step's keys and values, then attend through the block tables (no gather, no mask)."""
        if k is not None:
            self.write_cache(k, v, md.slot_mapping)
        out = paged_attention(q, self.k_cache, self.v_cache, md.block_tables, md.cu_seqlens_q, md.seq_lens,
                              block_size=md.block_size, scale=self.scale, max_q=md.max_query_len,
                              sliding_window=self.sliding_window)
        return out.reshape(-1, self.num_heads * self.head_dim)

    def _decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        """One new token per sequence: the query heads that share a KV head become that head's
        query rows (``[batch, kv_heads, heads / kv_heads, head_dim]``), so grouped-query attention
        needs no copy of the keys per query head; a lone sequence needs no mask either."""
        keys, values = (t.transpose(1, 2) for t in self._context(k, v, md, q.dtype))  # [batch, kv_heads, max_kv, head_dim]
        batch = md.batch_size
        queries = q.view(batch, self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=self._decode_mask(md), scale=self.scale)
        return out.reshape(batch, self.num_heads * self.head_dim)

    def _decode_mask(self, md: AttentionMetadata) -> torch.Tensor | None:
        window = self.sliding_window
        if md.batch_size == 1 and md.causal and (window is None or md.max_position < window):
            return None  # one sequence, every cached key visible
        return md.mask(window)  # [batch, 1, 1, max_kv]: broadcast over the grouped query rows

    def write_cache(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store the step's keys and values at their slots, in the cache's dtype (an int8 cache: quantised)."""
        if self.k_cache.dtype == torch.int8:
            kv_int8.store(self.k_cache, slot_mapping, k, self.key_offset)
            kv_int8.store(self.v_cache, slot_mapping, v)
            return
        self.k_cache.index_copy_(0, slot_mapping, k.to(self.k_cache.dtype))
        self.v_cache.index_copy_(0, slot_mapping, v.to(self.v_cache.dtype))

    def _context(self, k: torch.Tensor, v: torch.Tensor, md: AttentionMetadata, q_dtype: torch.dtype):
        """Each sequence's keys and values, [batch, max_kv, kv_heads, head_dim], as `q_dtype`."""
        if self.k_cache is not None:
            if k is None:
                return self._shared_context(md.key_slots.device, q_dtype)
            self.write_cache(k, v, md.slot_mapping)
            return (kv_int8.cache_values(self.k_cache[md.key_slots], q_dtype),
                    kv_int8.cache_values(self.v_cache[md.key_slots], q_dtype))
        if md.query_index is None:
            # No cache and rows already [batch, max_q] (an encoder's padded batch): the keys are the
            # step's own tokens in place, so views replace the gather.
            shape = (md.batch_size, md.max_q, *k.shape[1:])
            return k.view(shape), v.view(shape)
        return k[md.key_slots], v[md.key_slots]

    def _shared_context(self, device: torch.device, dtype: torch.dtype):
        """A KV-sharing layer's keys and values: gathered from the producer's cache where it lives, then
        moved to this layer's queries (mistral.rs #1653: q on another device than the shared k = v;
        on one device both moves are no-ops)."""
        slots = get_attention_metadata().to(self.k_cache.device).key_slots
        return (kv_int8.cache_values(self.k_cache[slots], dtype).to(device),
                kv_int8.cache_values(self.v_cache[slots], dtype).to(device))

    @staticmethod
    def _pad_queries(q: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        if md.query_index is None:
            return q.view(md.batch_size, md.max_q, *q.shape[1:])
        padded = torch.cat([q, q.new_zeros(1, *q.shape[1:])])
        return padded[md.query_index]
