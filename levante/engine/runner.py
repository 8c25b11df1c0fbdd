"""Turns a scheduled step into batch tensors, runs the model, returns logits.

Owns the KV cache memory: one preallocated tensor per layer for keys and one for
values, `[num_blocks * block_size, kv_heads, head_dim]`, handed to each
attention layer as views.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch
from torch import nn

from levante.engine.cuda_graph import DecodeGraphs
from levante.engine.encoder_cache import EncoderCache
from levante.engine.kv_cache import fill_tables
from levante.engine.scheduler import ScheduledSequence
from levante.layers.attention import Attention, AttentionMetadata, attention_metadata
from levante.layers.lora import LoraBatch, lora_batch
from levante.layers.moe import SparseMoE
from levante.errors import InvalidRequest
from levante.kernels import native
from levante.quant import kv_int8

logger = logging.getLogger("levante")

# Knobs (CPU): the paged attention path on (1) or off (0), and the padded static-buffer decode path run eagerly.
PAGED_ENV, PADDED_DECODE_ENV = "LEVANTE_PAGED_ATTENTION", "LEVANTE_PADDED_DECODE"


def cache_owning_layers(model: nn.Module) -> list[Attention]:
    """The attention layers that keep a KV cache: all but those reading another layer's (KV sharing)."""
    return [m for m in model.modules() if isinstance(m, Attention) and m.kv_producer is None]


def cache_row(head_dim: int, dtype: torch.dtype) -> int:
    """Values per (slot, KV head) of a cache of `dtype`: an int8 cache's rows carry their scale."""
    return kv_int8.row_bytes(head_dim) if dtype == torch.int8 else head_dim


def kv_bytes_per_token(model: nn.Module, dtype: torch.dtype) -> int:
    """Cache bytes a token takes in a cache of `dtype`: only the layers that own a cache count."""
    return (sum(2 * m.num_kv_heads * cache_row(m.head_dim, dtype) for m in cache_owning_layers(model))
            * torch.empty((), dtype=dtype).element_size())


def long_tensor(values: list[int], device: torch.device | None = None) -> torch.Tensor:
    """int64 tensor of a list of ints, through numpy (about 3x faster than torch.tensor on a list)."""
    tensor = torch.from_numpy(np.array(values, dtype=np.int64))
    return tensor if device is None or device.type == "cpu" else tensor.to(device)


def padded_tables(block_tables: list[list[int]]) -> torch.Tensor:
    """[batch, longest] int64, zero-padded (numpy: several times faster than nested lists)."""
    table = np.zeros((len(block_tables), max(len(t) for t in block_tables)), dtype=np.int64)
    fill_tables(table, block_tables)
    return torch.from_numpy(table)


def _set_key_offsets(model: nn.Module) -> None:
    """Keys go into an int8 cache less the layer's key bias, where the model has one (quant/kv_int8.py)."""
    for module in model.modules():
        if hasattr(module, "key_bias") and isinstance(getattr(module, "attn", None), Attention):
            bias = module.key_bias()
            module.attn.key_offset = None if bias is None else bias.to(module.attn.k_cache.device)


class ModelRunner:
    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device):
        """`dtype`: the KV cache's (EngineConfig.cache.kv_dtype: the model's unless asked otherwise)."""
        self.model = model
        self.block_size = block_size
        self.device = device
        self.attention_layers = cache_owning_layers(model)
        # One spare slot past the blocks: padding rows of CUDA-graph batches write their keys there.
        slots = num_blocks * block_size + 1
        self.scratch_slot = num_blocks * block_size
        # A layer mapped to another device (engine/placement.py) keeps its cache there.
        devices = [torch.device(getattr(m, "cache_device", device)) for m in self.attention_layers]
        if dtype == torch.int8 and any(d.type != "cpu" for d in devices):
            raise InvalidRequest("--kv-cache-dtype int8 runs on the CPU only: use auto, bfloat16 or float16 on "
                                 "CUDA")
        self.kv_cache = [
            tuple(torch.empty(slots, m.num_kv_heads, cache_row(m.head_dim, dtype), dtype=dtype, device=d)
                  for _ in "kv")
            for m, d in zip(self.attention_layers, devices)
        ]
        for layer, (k_cache, v_cache) in zip(self.attention_layers, self.kv_cache):
            layer.k_cache, layer.v_cache = k_cache, v_cache
        if dtype == torch.int8:
            _set_key_offsets(model)
        for layer in model.modules():  # KV sharing: a consumer reads its producer's cache, wherever it is
            if isinstance(layer, Attention) and layer.kv_producer is not None:
                layer.k_cache, layer.v_cache = layer.kv_producer.k_cache, layer.kv_producer.v_cache
        self.uses_mrope = getattr(model, "uses_mrope", False)
        self.takes_images = hasattr(model, "encode_images")
        self.encoder_cache = EncoderCache()
        padded = os.environ.get(PADDED_DECODE_ENV) == "1"
        self.paged = device.type == "cuda" or padded or self._native_attention(dtype)
        self.decode_graphs: DecodeGraphs | None = None
        self._padded_eager = padded

    def _native_attention(self, dtype: torch.dtype) -> bool:
        """Paged attention on the CPU: with the native kernel (kernels/cpu/*_attention.c) where it runs for every
        layer, else the SDPA path. LEVANTE_PAGED_ATTENTION=1 forces the paged path (its PyTorch
        version where the kernel cannot run), 0 the SDPA path."""
        forced = os.environ.get(PAGED_ENV)
        if forced in ("0", "1"):
            return forced == "1"
        return all(native.paged_attention_supported(dtype, m.head_dim) and k.device.type == "cpu"
                   for m, (k, _) in zip(self.attention_layers, self.kv_cache))

    def setup_decode_graphs(self, max_num_seqs: int, max_model_len: int, enforce_eager: bool,
                            max_batch: int = 256) -> None:
        """CUDA graphs for pure-decode steps (padded batch sizes), or, under LEVANTE_PADDED_DECODE=1,
        the same padded static-buffer path run eagerly (CPU tests). Any failure: eager, with a warning."""
        capture = self.device.type == "cuda" and not enforce_eager
        if not (capture or self._padded_eager) or self.uses_mrope:
            return
        if any(k.device != self.device for k, _ in self.kv_cache):
            logger.info("CUDA graphs off: layers are spread over several devices (decode runs eagerly)")
            return
        if capture and any(isinstance(m, SparseMoE) for m in self.model.modules()):
            logger.info("CUDA graphs off: mixture-of-experts layers choose their experts on the host "
                        "(decode runs eagerly)")
            return
        if capture:
            from levante.layers.paged_attention import triton_paged_attention_available
            if not triton_paged_attention_available():
                logger.warning("CUDA graphs off: the Triton paged-attention kernel is unavailable "
                               "(decode runs eagerly)")
                return
        try:
            graphs = DecodeGraphs(self, min(max_num_seqs, max_batch), max_model_len)
            if capture:
                graphs.capture()
            self.decode_graphs = graphs
        except Exception as e:  # noqa: BLE001 - keep serving eagerly
            logger.warning("CUDA graph capture failed, decode runs eagerly: %s: %s", type(e).__name__, e)
            self.decode_graphs = None
            if self.device.type == "cuda":
                torch.cuda.synchronize()

    def _slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]

    def prepare(self, batch: list[ScheduledSequence], all_logits: list[bool]):
        """Build input ids, positions, attention metadata and which rows need logits."""
        paged = self.paged
        if not any(all_logits) and all(item.num_new_tokens == 1 and item.samples for item in batch):
            input_ids, positions, slot_mapping, logits_rows, q_lens, kv_lens, block_tables = \
                self._decode_lists(batch, paged)
        else:
            input_ids, positions, slot_mapping, logits_rows, q_lens, kv_lens, block_tables = \
                self._step_lists(batch, all_logits, paged)
        if paged:
            ids, pos, metadata = self._prepare_paged(input_ids, positions, logits_rows, q_lens, kv_lens, block_tables)
            metadata.key_limits = self._key_limits(batch, metadata)
            return ids, pos, metadata
        dev = self.device
        metadata = self._metadata(q_lens, kv_lens, block_tables, slot_mapping)
        metadata.logits_indices = long_tensor(logits_rows, dev)
        metadata.key_limits = self._key_limits(batch, metadata)
        return long_tensor(input_ids, dev), long_tensor(positions, dev), metadata

    def _decode_lists(self, batch: list[ScheduledSequence], paged: bool):
        """`_step_lists` for a pure-decode step (one token per sequence, each sampled), in comprehensions."""
        bs = self.block_size
        seqs = [item.seq for item in batch]
        positions = [seq.num_computed_tokens for seq in seqs]
        input_ids = [seq.token_ids[p] for seq, p in zip(seqs, positions)]
        block_tables = [seq.block_table for seq in seqs]
        slot_mapping = [] if paged else [t[p // bs] * bs + p % bs for t, p in zip(block_tables, positions)]
        return (input_ids, positions, slot_mapping, list(range(len(batch))), [1] * len(batch),
                [p + 1 for p in positions], block_tables)

    def _step_lists(self, batch: list[ScheduledSequence], all_logits: list[bool], paged: bool):
        input_ids, positions, slot_mapping, logits_rows = [], [], [], []
        q_lens, kv_lens, block_tables = [], [], []
        for item, want_all in zip(batch, all_logits):
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            first_row = len(input_ids)
            drafts = item.drafts
            if drafts:  # speculative decoding: the last known token, then the drafts, each row with logits
                input_ids.extend(seq.token_ids[start:end - len(drafts)])
                input_ids.extend(drafts)
            else:
                input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            if not paged:
                slot_mapping.extend(self._slots(seq.block_table, start, end))
            if want_all:
                logits_rows.extend(range(first_row, first_row + item.num_new_tokens))
            elif drafts:
                logits_rows.extend(range(first_row + item.num_new_tokens - len(drafts) - 1,
                                         first_row + item.num_new_tokens))
            elif item.samples:
                logits_rows.append(first_row + item.num_new_tokens - 1)
            q_lens.append(item.num_new_tokens)
            kv_lens.append(end)
            block_tables.append(seq.block_table)
        return input_ids, positions, slot_mapping, logits_rows, q_lens, kv_lens, block_tables

    def _prepare_paged(self, input_ids, positions, logits_rows, q_lens, kv_lens, block_tables):
        """Paged-attention metadata, vectorised on the host and sent in one copy; the SDPA fields
        (key_slots, masks) are built only if a layer asks (AttentionMetadata.sdpa)."""
        bs = self.block_size
        table = padded_tables(block_tables)
        q = long_tensor(q_lens)
        pos = long_tensor(positions)
        seq_index = torch.repeat_interleave(torch.arange(len(q_lens)), q)
        slots = table[seq_index, pos // bs] * bs + pos % bs
        cu = torch.zeros(len(q_lens) + 1, dtype=torch.long)
        torch.cumsum(q, 0, out=cu[1:])
        ids, pos, slots, logits, cu, kv, table = self._upload([
            long_tensor(input_ids), pos, slots, long_tensor(logits_rows), cu, long_tensor(kv_lens), table])
        metadata = AttentionMetadata(
            slot_mapping=slots, key_slots=None, query_positions=None, kv_lens=kv, query_index=None,
            output_index=None, max_position=max(kv_lens) - 1, logits_indices=logits,
            block_tables=table.to(torch.int32), cu_seqlens_q=cu.to(torch.int32), seq_lens=kv.to(torch.int32),
            max_query_len=max(q_lens), block_size=bs)

        metadata._sdpa_builder = self.sdpa_builder(q_lens, kv_lens, block_tables)
        return ids, pos, metadata

    def sdpa_builder(self, q_lens: list[int], kv_lens: list[int], block_tables: list[list[int]]):
        """The SDPA fields of a paged step, built when a layer asks for them (AttentionMetadata.sdpa)."""
        def sdpa_fields():
            full = self._metadata(q_lens, kv_lens, block_tables, [])
            return {name: getattr(full, name) for name in ("key_slots", "query_positions", "query_index",
                                                            "output_index")}

        return sdpa_fields

    def _upload(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """int64 host tensors -> the device in one non-blocking copy from pinned memory (CUDA); as-is on CPU.

        The pinned buffer comes from PyTorch's caching host allocator each step, which does not hand
        a block out again before the copy reading it has run: a step without sampling has no sync,
        so a buffer reused by hand could be overwritten while its copy is still queued."""
        if self.device.type != "cuda":
            return parts
        sizes = [p.numel() for p in parts]
        host = torch.empty(sum(sizes), dtype=torch.long, pin_memory=True)
        torch.cat([p.reshape(-1) for p in parts], out=host)
        flat = host.to(self.device, non_blocking=True)
        return [t.view(p.shape) for t, p in zip(flat.split(sizes), parts)]

    def _key_limits(self, batch: list[ScheduledSequence], metadata: AttentionMetadata) -> torch.Tensor | None:
        """Queries inside a bidirectional span (MultiModalPrompt.bidirectional_spans) see keys to its end;
        None when no query of the step lies in one. The scheduler keeps each span in one step."""
        limits = None
        if all(item.seq.multimodal is None for item in batch):
            return None
        for b, item in enumerate(batch):
            mm, start = item.seq.multimodal, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            for span_start, span_end in (() if mm is None else mm.bidirectional_spans):
                lo, hi = max(start, span_start), min(end, span_end)
                if lo < hi:
                    if limits is None:
                        limits = metadata.sdpa().query_positions.clone()
                    limits[b, lo - start:hi - start] = span_end - 1
        return limits

    def _metadata(self, q_lens, kv_lens, block_tables, slot_mapping) -> AttentionMetadata:
        dev, bs = self.device, self.block_size
        batch, max_q, max_kv = len(q_lens), max(q_lens), max(kv_lens)
        table = padded_tables(block_tables)
        key_pos = torch.arange(max_kv)
        kv = long_tensor(kv_lens)
        key_slots = table[:, key_pos // bs] * bs + key_pos % bs
        key_slots = torch.where(key_pos < kv.unsqueeze(1), key_slots, 0)
        q = long_tensor(q_lens)
        row = torch.arange(max_q)
        query_positions = (kv - q).unsqueeze(1) + torch.minimum(row, (q - 1).unsqueeze(1))
        query_index = output_index = None
        if any(n != max_q for n in q_lens):
            starts = torch.cumsum(q, 0) - q
            valid = row < q.unsqueeze(1)
            total = int(q.sum())
            query_index = torch.where(valid, starts.unsqueeze(1) + row, total)
            output_index = (torch.arange(batch).unsqueeze(1) * max_q + row)[valid]
        to = (lambda t: t) if dev.type == "cpu" else (lambda t: None if t is None else t.to(dev))  # noqa: E731
        return AttentionMetadata(
            slot_mapping=long_tensor(slot_mapping, dev),
            key_slots=to(key_slots), query_positions=to(query_positions), kv_lens=to(kv),
            query_index=to(query_index), output_index=to(output_index), max_position=max_kv - 1,
        )

    @staticmethod
    def lora_rows(batch: list[ScheduledSequence]) -> list[int | None] | None:
        """The LoRA adapter id of each token row of the step (None: the base model); None when no
        sequence has one."""
        if all(item.seq.lora_id is None for item in batch):
            return None
        return [item.seq.lora_id for item in batch for _ in range(item.num_new_tokens)]

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSequence], all_logits: list[bool]) -> torch.Tensor:
        """Forward one step; logits [rows, vocab] float32 for the rows `prepare` selected, in order."""
        rows = self.lora_rows(batch)
        if rows is not None:  # steps with LoRA adapters run eagerly (the graphs hold no adapter)
            with lora_batch(LoraBatch.from_rows(rows)):
                return self._forward(batch, all_logits)
        if self.decode_graphs is not None and self.decode_graphs.takes(batch, all_logits):
            try:
                return self.decode_graphs.run(batch)
            except Exception as e:  # noqa: BLE001 - the eager forward below redoes the step
                logger.warning("decode graphs off after a failed step, running eagerly: %s: %s", type(e).__name__, e)
                self.decode_graphs = None
        return self._forward(batch, all_logits)

    def _forward(self, batch: list[ScheduledSequence], all_logits: list[bool]) -> torch.Tensor:
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
