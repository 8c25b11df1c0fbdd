"""The paged KV cache's bookkeeping: a free list, reference counts and a prefix hash map.

Blocks hold `block_size` token slots. A block whose tokens are all computed gets
a key chained from its predecessor's, so a later sequence with the same prefix
reuses it. Freed blocks keep their key until the free list hands them out again
(least recently freed first), which makes recompute after preemption cheap.

Keys are SHA-256 digests of the parent's key, the block's token ids and the keys of the
images placed in it; the first block's parent is the sequence's root, which names its LoRA
adapter (keys and values computed under an adapter differ from the base model's): prompts from strangers share this cache, and with a weak hash (Python's
`hash` of a tuple is a known function) one could craft a prompt whose blocks collide with
another's and read or poison its KV.
"""
from __future__ import annotations

import hashlib
import itertools
import struct
from dataclasses import dataclass

import numpy as np

from levante.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None  # the block's prefix key (see block_key)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: dict[int, None] = dict.fromkeys(range(num_blocks))  # insertion-ordered set
        self.cached: dict[bytes, int] = {}  # block key -> block id

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - len(self.free) / max(1, len(self.blocks))

    def _block_key(self, parent: bytes | None, seq: Sequence, i: int) -> bytes:
        """The key of block i of `seq`: chained from its parent's, over its token ids and the
        keys of the images placed in it."""
        start, end = i * self.block_size, (i + 1) * self.block_size
        return block_key(parent, seq.token_ids[start:end], seq.image_keys(start, end))

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks that hold a prefix of `seq`, leaving at least its last token to compute."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []
        matched, previous = [], root_key(seq)
        limit = (seq.num_tokens - 1) // self.block_size
        for i in range(limit):
            previous = self._block_key(previous, seq, i)
            block_id = self.cached.get(previous)
            if block_id is None:
                break
            matched.append(block_id)
        return matched

    def blocks_needed(self, seq: Sequence, num_new_tokens: int, prefix: list[int] = ()) -> int:
        """Free blocks taken if `seq` (after claiming `prefix`) computes `num_new_tokens` more."""
        held = len(seq.block_table) or len(prefix)
        computed = seq.num_computed_tokens or len(prefix) * self.block_size
        total = -(-(computed + num_new_tokens) // self.block_size)
        revived = sum(1 for b in prefix if self.blocks[b].ref_count == 0)
        return max(0, total - held) + revived

    def claim_prefix(self, seq: Sequence, prefix: list[int]) -> None:
        for block_id in prefix:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
        seq.block_table = list(prefix)
        seq.num_computed_tokens = seq.num_cached_tokens = len(prefix) * self.block_size

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        while len(seq.block_table) < total:
            block_id = next(iter(self.free))
            del self.free[block_id]
            block = self.blocks[block_id]
            if block.hash is not None and self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash, block.ref_count = None, 1
            seq.block_table.append(block_id)

    def commit(self, seq: Sequence) -> None:
        """Hash the blocks that became full of computed tokens, so others can share them."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        if full == seq.num_hashed_blocks:  # nothing new is full (the blocks held keep their hashes)
            return
        start = max(0, seq.num_hashed_blocks - 1)
        previous = root_key(seq) if start == 0 else None  # past block 0, the loop reads it from the held block
        for i in range(start, full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block.hash = self._block_key(previous, seq, i)
                self.cached.setdefault(block.hash, block.block_id)
            previous = block.hash
        seq.num_hashed_blocks = full

    def free_sequence(self, seq: Sequence) -> None:
        # Reverse order: a sequence's tail is the least likely to be shared, so reuse it first.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0


_ROOT = bytes(32)  # the parent key of a sequence's first block, on the base model


def root_key(seq: Sequence) -> bytes:
    """The parent key of `seq`'s first block: the base model's, or one per LoRA adapter id (never reused)."""
    if seq.lora_id is None:
        return _ROOT
    return hashlib.sha256(b"lora adapter %d" % seq.lora_id).digest()


def prompt_block_keys(token_ids: list[int], block_size: int, root: bytes | None = None) -> list[bytes]:
    """The keys of a prompt's full blocks (no images), as the cache files them: what a data-parallel
    front routes on (engine/prefix_router.py). `root`: the first block's parent (default: the base model's)."""
    keys, parent = [], root or _ROOT
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = block_key(parent, token_ids[start:start + block_size])
        keys.append(parent)
    return keys


def block_key(parent: bytes | None, tokens, images: tuple = ()) -> bytes:
    """SHA-256 over the parent's key, the block's token ids (8 bytes each) and the (key, offset)
    of each image placed in it, every part length-prefixed so no two contents encode alike."""
    digest = hashlib.sha256(parent or _ROOT)
    digest.update(struct.pack(f"<Q{len(tokens)}q", len(tokens), *tokens))
    for key, offset in images:
        encoded = str(key).encode()
        digest.update(len(encoded).to_bytes(8, "little") + encoded + int(offset).to_bytes(8, "little", signed=True))
    return digest.digest()


def fill_tables(table: np.ndarray, block_tables: list[list[int]]) -> None:
    """Write each block table into its row of a zeroed `table` (wide enough). Many rows are filled in
    one masked assignment (row-major order is the tables' concatenation), few row by row."""
    if len(block_tables) <= 8:
        for row, blocks in zip(table, block_tables):
            row[:len(blocks)] = blocks
        return
    lengths = [len(t) for t in block_tables]
    filled = np.arange(table.shape[1]) < np.array(lengths)[:, None]
    table[:len(block_tables)][filled] = np.fromiter(itertools.chain.from_iterable(block_tables), dtype=np.int64,
                                                    count=sum(lengths))
