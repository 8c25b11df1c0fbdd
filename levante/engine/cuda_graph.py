"""Pure-decode steps on static, padded input buffers, replayed as CUDA graphs (as nano-vllm does).

A step in which every sequence computes one token and samples it (no images, no M-RoPE)
is padded up to the next captured batch size (1, 2, 4, 8, then multiples of 16). The
inputs are copied in place into static buffers; padding rows have context length 0 (paged
attention writes zeros for them) and write their key into the cache's spare slot. The graph
covers the whole forward through the logits. Everything the forward reads is recomputed
from the static buffers on each replay; the rotary cos/sin table is sized to the longest
context before capture, so it is never reallocated under a graph.

Without capture (`capture()` not called) the same padded path runs eagerly: CPU tests
compare it with the normal path (LEVANTE_PADDED_DECODE=1).
"""
from __future__ import annotations

import logging
import time

import torch

from levante.engine.kv_cache import fill_tables
from levante.layers.attention import AttentionMetadata, attention_metadata

logger = logging.getLogger("levante")


def graph_batch_sizes(max_batch: int) -> list[int]:
    sizes = [s for s in [1, 2, 4, 8, *range(16, max_batch + 1, 16)] if s <= max_batch]
    return sizes if sizes and sizes[-1] == max_batch else [*sizes, max_batch]


class DecodeGraphs:
    def __init__(self, runner, max_batch: int, max_model_len: int):
        self.runner = runner
        self.model = runner.model
        dev, self.block_size = runner.device, runner.block_size
        self.sizes = graph_batch_sizes(max(1, max_batch))
        self.max_batch = self.sizes[-1]
        self.width = -(-max_model_len // self.block_size)  # blocks of the longest context
        self.max_position = max_model_len - 1
        n = self.max_batch
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((n,), runner.scratch_slot, dtype=torch.long, device=dev)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(n, self.width, dtype=torch.int32, device=dev)
        self.cu_seqlens_q = torch.arange(n + 1, dtype=torch.int32, device=dev)  # one query row each
        # Staging: rows (ids, positions, slots, seq_lens) then the block table, one host->device copy.
        # Reusing the pinned buffer is safe: every step taken here samples, which syncs before the next.
        pin = dev.type == "cuda"
        self._host = torch.zeros(4 * n + n * self.width, dtype=torch.long, pin_memory=pin)
        self._host_np = self._host.numpy()
        self._staging = torch.zeros(self._host.shape, dtype=torch.long, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: torch.Tensor | None = None  # [max_batch, vocab] static output of the graphs
        self.capture_seconds = 0.0

    def takes(self, batch, all_logits) -> bool:
        """A pure-decode step that fits: one sampled token per sequence, no prompt rows, text only."""
        if len(batch) > self.max_batch:
            return False
        for item, want_all in zip(batch, all_logits):
            seq = item.seq
            if (item.num_new_tokens != 1 or not item.samples or want_all or seq.multimodal is not None
                    or seq.num_computed_tokens > self.max_position or len(seq.block_table) > self.width):
                return False
        return True

    def _metadata(self, size: int) -> AttentionMetadata:
        seq_lens = self.seq_lens[:size]
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size], key_slots=None, query_positions=None, kv_lens=seq_lens,
            query_index=None, output_index=None, max_position=self.max_position,
            block_tables=self.block_tables[:size], cu_seqlens_q=self.cu_seqlens_q[:size + 1], seq_lens=seq_lens,
            max_query_len=1, block_size=self.block_size)

    def _forward(self, size: int) -> torch.Tensor:
        with attention_metadata(self._metadata(size)):
            hidden = self.model(self.input_ids[:size], self.positions[:size])
            return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every batch size, largest first, in one shared memory pool."""
        started = time.monotonic()
        pool = None
        for size in reversed(self.sizes):
            logits = self._forward(size)  # warm-up: kernels compiled, rotary table at full length
            if self.logits is None:
                self.logits = torch.empty(self.max_batch, logits.size(-1), dtype=logits.dtype, device=logits.device)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA work of other threads (another engine, the embedder) does not break capture.
            with torch.cuda.graph(graph, pool, capture_error_mode="thread_local"):
                self.logits[:size].copy_(self._forward(size))
            if pool is None:
                pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()
        self.capture_seconds = time.monotonic() - started
        logger.info("captured CUDA graphs for decode batch sizes %s in %.2f s", self.sizes, self.capture_seconds)
        self.verify()

    @torch.inference_mode()
    def verify(self) -> None:
        """Replay against the eager forward on one live row (token 0 at position 0, its key in the
        spare slot, read back through block id `num_blocks`), smallest and largest size; raises on a
        mismatch, so the runner falls back to eager."""
        scratch = self.runner.scratch_slot
        try:
            self.seq_lens[0] = 1
            self.block_tables[0, 0] = scratch // self.block_size  # the spare slot is offset 0 of that block
            for size in sorted({self.sizes[0], self.sizes[-1]}):
                want = self._forward(size).float()
                self.graphs[size].replay()
                got = self.logits[:size].float()
                error = (got - want).abs().max().item()
                if not error <= 1e-2 * (1.0 + want.abs().max().item()):  # also catches NaN
                    raise RuntimeError(f"graph replay differs from the eager forward at batch {size} "
                                       f"(max error {error})")
        finally:
            self.seq_lens[0] = 0
            self.block_tables[0, 0] = 0

    def run(self, batch) -> torch.Tensor:
        """Logits [len(batch), vocab] of the step, rows in batch order (every row samples)."""
        count = len(batch)
        size = next(s for s in self.sizes if s >= count)
        bs, width = self.block_size, max(len(item.seq.block_table) for item in batch)
        used = 4 * size + size * width
        host = self._host_np[:used]  # numpy view of the (pinned) staging buffer
        rows, table = host[:4 * size].reshape(4, size), host[4 * size:].reshape(size, width)
        seqs = [item.seq for item in batch]
        positions = [seq.num_computed_tokens for seq in seqs]
        tables = [seq.block_table for seq in seqs]
        rows[0, :count] = [seq.token_ids[pos] for seq, pos in zip(seqs, positions)]
        rows[1, :count] = positions
        rows[2, :count] = [blocks[pos // bs] * bs + pos % bs for blocks, pos in zip(tables, positions)]
        rows[3, :count] = rows[1, :count] + 1  # context length after this step
        table[:] = 0
        fill_tables(table, tables)
        rows[:, count:] = 0
        rows[2, count:] = self.runner.scratch_slot  # padding rows: length 0, key written to the spare slot
        staged = self._staging[:used]
        staged.copy_(self._host[:used], non_blocking=True)
        rows = staged[:4 * size].view(4, size)
        self.input_ids[:size].copy_(rows[0])
        self.positions[:size].copy_(rows[1])
        self.slot_mapping[:size].copy_(rows[2])
        self.seq_lens[:size].copy_(rows[3])
        self.block_tables[:size, :width].copy_(staged[4 * size:].view(size, width))
        graph = self.graphs.get(size)
        if graph is None:  # eager (CPU tests, or a size that was not captured)
            return self._forward(size)[:count]
        graph.replay()
        return self.logits[:count]
