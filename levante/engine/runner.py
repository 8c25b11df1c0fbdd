"""Turns a scheduled step into batch tensors, runs the model, returns logits.

Owns the KV cache memory: one preallocated tensor per layer for keys and one for
values, `[num_blocks * block_size, kv_heads, head_dim]`, handed to each
attention layer as views.
"""
from __future__ import annotations

import torch
from torch import nn

from levante.engine.encoder_cache import EncoderCache
from levante.engine.scheduler import ScheduledSequence
from levante.layers.attention import Attention, AttentionMetadata, attention_metadata


def kv_bytes_per_token(model: nn.Module, dtype: torch.dtype) -> int:
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    return sum(2 * m.num_kv_heads * m.head_dim for m in layers) * torch.empty((), dtype=dtype).element_size()


class ModelRunner:
    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device):
        self.model = model
        self.block_size = block_size
        self.device = device
        self.attention_layers = [m for m in model.modules() if isinstance(m, Attention)]
        slots = num_blocks * block_size
        # A layer mapped to another device (engine/placement.py) keeps its cache there.
        self.kv_cache = [
            (torch.empty(slots, m.num_kv_heads, m.head_dim, dtype=dtype, device=getattr(m, "cache_device", device)),
             torch.empty(slots, m.num_kv_heads, m.head_dim, dtype=dtype, device=getattr(m, "cache_device", device)))
            for m in self.attention_layers
        ]
        for layer, (k_cache, v_cache) in zip(self.attention_layers, self.kv_cache):
            layer.k_cache, layer.v_cache = k_cache, v_cache
        self.uses_mrope = getattr(model, "uses_mrope", False)
        self.takes_images = hasattr(model, "encode_images")
        self.encoder_cache = EncoderCache()

    def _slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]

    def prepare(self, batch: list[ScheduledSequence], all_logits: list[bool]):
        """Build input ids, positions, attention metadata and which rows need logits."""
        input_ids, positions, slot_mapping, logits_rows = [], [], [], []
        q_lens, kv_lens, block_tables = [], [], []
        for item, want_all in zip(batch, all_logits):
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            first_row = len(input_ids)
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slot_mapping.extend(self._slots(seq.block_table, start, end))
            if want_all:
                logits_rows.extend(range(first_row, first_row + item.num_new_tokens))
            elif item.samples:
                logits_rows.append(first_row + item.num_new_tokens - 1)
            q_lens.append(item.num_new_tokens)
            kv_lens.append(end)
            block_tables.append(seq.block_table)
        dev = self.device
        metadata = self._metadata(q_lens, kv_lens, block_tables, slot_mapping)
        metadata.logits_indices = torch.tensor(logits_rows, dtype=torch.long, device=dev)
        metadata.key_limits = self._key_limits(batch, metadata.query_positions)
        return (torch.tensor(input_ids, dtype=torch.long, device=dev),
                torch.tensor(positions, dtype=torch.long, device=dev), metadata)

    def _key_limits(self, batch: list[ScheduledSequence], query_positions: torch.Tensor) -> torch.Tensor | None:
        """Queries inside a bidirectional span (MultiModalPrompt.bidirectional_spans) see keys to its end;
        None when no query of the step lies in one. The scheduler keeps each span in one step."""
        limits = None
        for b, item in enumerate(batch):
            mm, start = item.seq.multimodal, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            for span_start, span_end in (() if mm is None else mm.bidirectional_spans):
                lo, hi = max(start, span_start), min(end, span_end)
                if lo < hi:
                    if limits is None:
                        limits = query_positions.clone()
                    limits[b, lo - start:hi - start] = span_end - 1
        return limits

    def _metadata(self, q_lens, kv_lens, block_tables, slot_mapping) -> AttentionMetadata:
        dev, bs = self.device, self.block_size
        batch, max_q, max_kv = len(q_lens), max(q_lens), max(kv_lens)
        width = max(len(t) for t in block_tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.long)
        key_pos = torch.arange(max_kv)
        kv = torch.tensor(kv_lens, dtype=torch.long)
        key_slots = table[:, key_pos // bs] * bs + key_pos % bs
        key_slots = torch.where(key_pos < kv.unsqueeze(1), key_slots, 0)
        q = torch.tensor(q_lens, dtype=torch.long)
        row = torch.arange(max_q)
        query_positions = (kv - q).unsqueeze(1) + torch.minimum(row, (q - 1).unsqueeze(1))
        query_index = output_index = None
        if any(n != max_q for n in q_lens):
            starts = torch.cumsum(q, 0) - q
            valid = row < q.unsqueeze(1)
            total = int(q.sum())
            query_index = torch.where(valid, starts.unsqueeze(1) + row, total)
            output_index = (torch.arange(batch).unsqueeze(1) * max_q + row)[valid]
        to = lambda t: None if t is None else t.to(dev)  # noqa: E731
        return AttentionMetadata(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=dev),
            key_slots=to(key_slots), query_positions=to(query_positions), kv_lens=to(kv),
            query_index=to(query_index), output_index=to(output_index), max_position=max_kv - 1,
        )

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSequence], all_logits: list[bool]) -> torch.Tensor:
        """Forward one step; logits [rows, vocab] float32 for the rows `prepare` selected, in order."""
        input_ids, positions, metadata = self.prepare(batch, all_logits)
        if self.uses_mrope:
            positions = self._mrope_positions(batch)
        images = self._image_rows(batch) if self.takes_images else None
        with attention_metadata(metadata):
            if images is None:
                hidden = self.model(input_ids, positions)
            else:
                embeds, extra = self._merge_images(input_ids, *images)
                hidden = self.model(input_ids, positions, inputs_embeds=embeds, **extra)
            return self.model.compute_logits(hidden.index_select(0, metadata.logits_indices))

    # -- vision-language models (multimodal/inputs.py) -----------------------
    def _mrope_positions(self, batch: list[ScheduledSequence]) -> torch.Tensor:
        """[3, tokens]: a prompt's own M-RoPE positions; past them (and for text-only prompts)
        index + delta on all three axes."""
        parts = []
        for item in batch:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            mm = seq.multimodal
            table = None if mm is None else mm.mrope_positions
            known = 0 if table is None else min(end, table.size(1))
            if start < known:
                parts.append(table[:, start:known])
            delta = 0 if mm is None else mm.mrope_position_delta
            if end > max(start, known):
                parts.append(torch.arange(max(start, known), end).expand(3, -1) + delta)
        return torch.cat(parts, dim=1).to(self.device)

    def _image_rows(self, batch: list[ScheduledSequence]):
        """Step rows that are image placeholders and the encoder rows they take; None when there are none.

        Every image of a sequence is encoded (in one batched call for the step) the first time
        any of its span is scheduled, then served from the encoder cache by key."""
        wanted, step_rows, first_row = {}, {}, 0
        spans = []
        for item in batch:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            mm = seq.multimodal
            overlapping = [] if mm is None else [
                img for img in mm.images if img.offset < end and img.offset + img.length > start]
            if overlapping:
                for img in mm.images:
                    if img.key not in step_rows and img.key not in wanted:
                        cached = self.encoder_cache.get(img.key)
                        if cached is None:
                            wanted[img.key] = img
                        else:
                            step_rows[img.key] = cached
                spans.extend((first_row, start, end, img) for img in overlapping)
            first_row += item.num_new_tokens
        if not spans:
            return None
        if wanted:
            encoded = self.model.encode_images(list(wanted.values()))
            self.encoder_cache.num_encoded += len(wanted)
            for key, rows in zip(wanted, encoded):
                self.encoder_cache.put(key, rows)
                step_rows[key] = rows
        token_index, rows = [], []
        for first, start, end, img in spans:
            lo, hi = max(start, img.offset), min(end, img.offset + img.length)
            token_index.append(torch.arange(first + lo - start, first + hi - start))
            rows.append(step_rows[img.key][lo - img.offset:hi - img.offset])
        return torch.cat(token_index).to(self.device), torch.cat(rows)

    def _merge_images(self, input_ids: torch.Tensor, token_index: torch.Tensor, rows: torch.Tensor):
        """inputs_embeds with image rows in place, plus any extra forward arguments the model asks for."""
        embeds = self.model.embed_input_ids(input_ids)
        merge = getattr(self.model, "merge_image_rows", None)
        if merge is not None:
            return merge(embeds, token_index, rows)
        return embeds.index_copy(0, token_index, rows.to(embeds.dtype)), {}
